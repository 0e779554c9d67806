"""Preference-model fine-tuning: soft AI harmlessness labels mixed with hard human helpfulness comparisons.

    python -m cai.stages.pm_finetune run_dir=R [pm_finetune.human_fraction=0.5] [pm_finetune.init=base]
    torchrun --nproc_per_node 2 -m cai.stages.pm_finetune run_dir=R

Starts from ``${run_dir}/pm_pretrain/model`` (or, when PMP was skipped, the ``pm_backbone`` role with a fresh head;
``pm_finetune.init``). Trains on the AI-labeled pairs of ``${run_dir}/ai_feedback/dataset`` with soft
targets — binary cross-entropy of sigma(r_chosen - r_rejected) against ``p_chosen`` — mixed with human
comparisons (``pm_finetune.human_source``, default cai's built-in helpfulness pairs) with hard targets,
``human_fraction`` of the mix (as the CAI paper's PM: AI labels for harmlessness, human ones for helpfulness).
``eval_fraction`` of each kind is held out; after every epoch: accuracy (the sign of the score difference
against the label's preferred side; overall, ``_ai`` and ``_human``), mean margin, expected calibration error
(ECE) and a reliability diagram.

With ``normalize`` the reward is shifted so its mean over SL-CAI samples (``${run_dir}/sl_generate``) is
0; the shift is stored as ``cai_reward_shift`` in the checkpoint's config.json and applied by
``cai.preference.score_conversations`` (and by PPO).

Writes ``${run_dir}/pm_finetune/``: ``model/`` (``AutoModelForSequenceClassification`` loads it),
``reliability.png``, ``eval.json``, ``checkpoints/``, ``metrics.jsonl``, ``manifest.json``.
"""

from __future__ import annotations

import random
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from cai import preference, roles, training
from cai.data import read_table
from cai.errors import DataError, StageInputError
from cai.lineage import input_fingerprint, read_manifest
from cai.stage_folder import StageRun, stage_dir, stage_summary
from cai.stages import CONFIG_PATH, run_app, run_stage

# The stage's facts, side by side (cai.stages says what each means; the pipeline reads them)
STAGE = "pm_finetune"
UPSTREAM = ("pm_pretrain", "ai_feedback", "sl_generate")
HASH_KEYS = ("seed", "pm_backbone", "deepspeed", STAGE)
MULTI_RANK = True
SHARDED = False


def run(cfg: DictConfig, stage: StageRun) -> Path:
    from cai import distributed

    s = cfg[STAGE]

    # Step 1: check settings, find the starting PM and read every input before touching the run directory.
    preference.check_pm_settings(STAGE, s)
    if s.human_fraction is None or not 0.0 <= s.human_fraction < 1.0:
        raise StageInputError(f"{STAGE}.human_fraction must be in [0, 1), got {s.human_fraction}")
    if s.normalize and (s.reference_rows is None or s.reference_rows < 1):
        raise StageInputError(f"{STAGE}.reference_rows must be >= 1, got {s.reference_rows}")
    init_model, init_fingerprint = _starting_point(cfg, s, stage)
    ai_path = Path(s.ai_dataset) if s.ai_dataset else stage.upstream("ai_feedback") / "dataset"
    ai, ai_identical = preference.load_comparisons(str(ai_path), "pairs", key=f"{STAGE}.ai_dataset", builtin=ai_path, seed=cfg.seed)
    human, human_identical = [], 0
    if s.human_fraction > 0:
        human, human_identical = preference.load_comparisons(s.human_source, s.human_format, key=f"{STAGE}.human_source",
                                                             builtin=preference.BUILTIN_HUMAN, seed=cfg.seed)
        wanted = round(len(ai) * s.human_fraction / (1.0 - s.human_fraction))
        if wanted > len(human):
            raise StageInputError(f"{STAGE}.human_fraction={s.human_fraction} needs {wanted} human comparisons for "
                                  f"{len(ai)} AI-labeled ones, but {s.human_source or preference.BUILTIN_HUMAN} has {len(human)}")
        human = random.Random(f"cai-{STAGE}-human:{cfg.seed}").sample(human, wanted)
    ai_train, ai_eval = preference.split_holdout(ai, s.eval_fraction, cfg.seed, "ai", f"{STAGE}.eval_fraction")
    human_train, human_eval = (preference.split_holdout(human, s.eval_fraction, cfg.seed, "human", f"{STAGE}.eval_fraction")
                               if human else ([], []))
    reference, reference_fingerprint = _reference_conversations(cfg, s, stage) if s.normalize else ([], None)
    if stage.done("model", init_fingerprint=init_fingerprint, ai_fingerprint=input_fingerprint(ai_path),
                  human_fingerprint=input_fingerprint(s.human_source or preference.BUILTIN_HUMAN) if human else None,
                  reference_fingerprint=reference_fingerprint):
        return stage.out / "model"

    # Step 2: the starting PM and the tokenised pairs (held-out: AI pairs first, then human ones).
    from cai.models import load_preference_model

    torch.manual_seed(cfg.seed)
    model, tok = load_preference_model(init_model)
    train_pairs, train_counts = preference.encode_pairs(tok, ai_train + human_train, s.max_length, f"{STAGE} training pairs")
    ai_eval_pairs, ai_counts = preference.encode_pairs(tok, ai_eval, s.max_length, f"{STAGE} held-out AI pairs")
    human_eval_pairs, human_counts = preference.encode_pairs(tok, human_eval, s.max_length, f"{STAGE} held-out human pairs")
    eval_pairs = ai_eval_pairs + human_eval_pairs
    n_ai = len(ai_eval_pairs)
    counts = {"ai_pairs": len(ai), "human_pairs": len(human), "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
              "identical_dropped": ai_identical + human_identical,
              **{k: train_counts[k] + ai_counts[k] + human_counts[k] for k in train_counts}}

    # Step 3: train (resuming from the newest checkpoint of the same config and inputs), held-out metrics each epoch.
    plan = training.plan_for(STAGE, s, len(train_pairs), stage.world, cfg.seed)
    engine, scheduler = training.build_engine(model, cfg, s, plan.total_steps)
    stage.started(counts={**counts, "total_steps": plan.total_steps}, init=init_model["path"], models={"pm_backbone": init_model})
    evaluate = preference.held_out_evaluator(engine, tok, eval_pairs, s.calibration_bins, stage.out,
                                             title=f"{STAGE}: held-out pairs", main_rank=stage.main,
                                             groups={"ai": list(range(n_ai)), "human": list(range(n_ai, len(eval_pairs)))})
    training.fit(engine, scheduler, plan, stage=STAGE, out=stage.out, save_every=s.save_every, resume=stage.resume, rank=stage.rank,
                 loss_fn=lambda rows: preference.pair_batch_loss(engine.module, [train_pairs[i] for i in rows], tok.pad_token_id, s.margin),
                 after_epoch=evaluate, progress=cfg.progress, logger=cfg.logger)

    # Step 4: reward normalisation: the shift that centres the scores of the SL-CAI samples on 0.
    shift = 0.0
    if reference:
        engine.module.config.update({preference.SHIFT_KEY: 0.0})
        try:
            raw = preference.score_conversations(engine.module, tok, reference, max_length=s.max_length)
        except ValueError as e:  # a reference reply longer than the context
            raise StageInputError(f"{STAGE}.reference: {e}; raise {STAGE}.max_length") from None
        shift = -float(raw.mean())
        if stage.main:
            print(f"cai {STAGE}: reward shift {shift:+.4f} (mean raw score over {len(reference)} SL-CAI samples)")
    engine.module.config.update({preference.SHIFT_KEY: shift})

    # Step 5: the final checkpoint, then the manifest (last).
    distributed.save_final_model(engine, tok, stage.out / "model")
    if stage.main:
        final = {k: training.final_metric(stage.out, k, split="eval")
                 for k in ("accuracy", "accuracy_ai", "accuracy_human", "ece", "mean_margin")}
        stage.complete(stage_summary(f"{plan.total_steps} steps", f"held-out accuracy {final['accuracy']}, ECE {final['ece']}",
                                     **final),
                       counts={**counts, "reference_rows": len(reference), "steps": plan.total_steps},
                       final_loss=training.final_metric(stage.out, "loss"), eval=final, reward_shift=shift)
    return stage.out / "model"


def _starting_point(cfg: DictConfig, s: DictConfig, stage: StageRun) -> tuple[dict, str]:
    """The model spec to load the starting PM from, and its fingerprint: pm_pretrain's model (``init=auto``: when that
    stage has run here), the ``pm_backbone`` role's own, or a checkpoint folder."""
    if s.init not in ("auto", "pm_pretrain", "base"):
        folder = Path(s.init).expanduser()
        if not (folder / "config.json").exists():
            raise StageInputError(f"{STAGE}.init={s.init!r}: not auto, pm_pretrain, base or a checkpoint folder")
        return roles.spec(cfg, "pm_backbone", at=folder, key=f"{STAGE}.init"), input_fingerprint(folder)
    use_pmp = s.init == "pm_pretrain" or (s.init == "auto" and read_manifest(stage_dir(cfg.run_dir, "pm_pretrain")) is not None)
    if use_pmp:
        return stage.upstream_model("pm_pretrain", "pm_backbone", required=True)
    base, fingerprint = stage.role_model("pm_backbone")
    if s.init == "auto":
        print(f"cai {STAGE}: no pm_pretrain in {cfg.run_dir}; starting from {base['key']}={base['path']} with a fresh head")
    return base, fingerprint


def _reference_conversations(cfg: DictConfig, s: DictConfig, stage: StageRun) -> tuple[list[list[dict]], str]:
    """SL-CAI samples (conversations ending with the model's final answer) to centre the reward on, and their
    fingerprint."""
    path = Path(s.reference) if s.reference else stage_dir(cfg.run_dir, "sl_generate") / "dataset"
    if not s.reference:
        if read_manifest(path.parent) is None:
            raise StageInputError(f"{path.parent}: no sl_generate here for reward normalisation; run that stage, set "
                                  f"{STAGE}.reference=, or {STAGE}.normalize=false")
        stage.upstream("sl_generate")
    table = read_table(str(path), str(path))
    if "messages" not in table.column_names:
        raise DataError(f"{path}: no 'messages' column for {STAGE}.reference (columns: {', '.join(table.column_names)})")
    rows = [m for m in table["messages"] if m and m[-1].get("role") == "assistant" and str(m[-1].get("content", "")).strip()]
    if not rows:
        raise DataError(f"{path}: no conversation ending with an assistant reply to normalise the reward on")
    return rows[:s.reference_rows], input_fingerprint(s.reference or path.parent)


@hydra.main(config_path=CONFIG_PATH, config_name=STAGE, version_base=None)
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg)


if __name__ == "__main__":
    run_app(main, f"cai {STAGE}")
