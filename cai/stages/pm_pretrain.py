"""Preference-model pretraining (PMP): a scalar-head PM on generic comparisons, in a DeepSpeed engine.

    python -m cai.stages.pm_pretrain run_dir=R [pm_pretrain.source=FILE|DIR|NAME] [pm_pretrain.format=hh]
    torchrun --nproc_per_node 2 -m cai.stages.pm_pretrain run_dir=R
    deepspeed --no_local_rank --num_gpus 2 --module cai.stages.pm_pretrain run_dir=R

The PM is the ``pm_backbone`` role's model (``cai.roles``; the policy unless set) with a fresh one-output head
(``...ForSequenceClassification``), dropout off; its score is read at the last real token of "chat prompt +
response + EOS". Comparisons come from ``pm_pretrain.source`` (default: cai's small Stack-Exchange-style set,
answers paired by vote score; see ``cai.preference`` for every format). Loss -log sigmoid(r_good - r_bad - margin).
``pm_pretrain.eval_fraction`` of the pairs are held out and scored after every epoch.

Writes ``${run_dir}/pm_pretrain/``: ``checkpoints/`` (resumable, as in sl_train), ``model/`` (a
``save_pretrained`` PM that ``AutoModelForSequenceClassification`` loads), ``reliability.png``,
``eval.json`` (held-out accuracy, mean margin, ECE, the reliability table), ``metrics.jsonl`` (per
step: loss, batch accuracy, margin, tokens/s; per epoch a ``split: eval`` row) and ``manifest.json``
(with counts of dropped identical pairs, cut contexts and too-long responses).
"""

from __future__ import annotations

import random
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from cai import preference, roles, training
from cai.errors import StageInputError
from cai.lineage import input_fingerprint
from cai.stage_folder import StageRun, stage_summary
from cai.stages import CONFIG_PATH, run_app, run_stage

# The stage's facts, side by side (cai.stages says what each means; the pipeline reads them)
STAGE = "pm_pretrain"
UPSTREAM = ()
HASH_KEYS = ("seed", "pm_backbone", "deepspeed", STAGE)
MULTI_RANK = True
SHARDED = False


def run(cfg: DictConfig, stage: StageRun) -> Path:
    from cai import distributed

    s = cfg[STAGE]

    # Step 1: check settings and read the comparisons before touching the run directory.
    preference.check_pm_settings(STAGE, s)
    if s.pairs_per_question < 1 or s.min_score_gap < 0:
        raise StageInputError(f"{STAGE}.pairs_per_question must be >= 1 and {STAGE}.min_score_gap >= 0")
    comparisons, identical = preference.load_comparisons(s.source, s.format, key=f"{STAGE}.source", builtin=preference.BUILTIN_PRETRAIN,
                                                         seed=cfg.seed, pairs_per_question=s.pairs_per_question,
                                                         min_score_gap=s.min_score_gap)
    if s.max_pairs is not None:
        if s.max_pairs < 2:
            raise StageInputError(f"{STAGE}.max_pairs must be >= 2 (or null), got {s.max_pairs}")
        if len(comparisons) > s.max_pairs:
            comparisons = random.Random(f"cai-{STAGE}:{cfg.seed}").sample(comparisons, s.max_pairs)
    train, held_out = preference.split_holdout(comparisons, s.eval_fraction, cfg.seed, "pretrain", f"{STAGE}.eval_fraction")
    if stage.done("model", data_fingerprint=input_fingerprint(s.source or preference.BUILTIN_PRETRAIN)):
        return stage.out / "model"

    # Step 2: the PM (backbone + fresh scalar head) and the tokenised pairs.
    from cai.models import load_preference_model

    torch.manual_seed(cfg.seed)
    model, tok = load_preference_model(roles.spec(cfg, "pm_backbone"))
    where = str(s.source or preference.BUILTIN_PRETRAIN)
    train_pairs, train_counts = preference.encode_pairs(tok, train, s.max_length, where)
    eval_pairs, eval_counts = preference.encode_pairs(tok, held_out, s.max_length, where)
    counts = {"comparisons": len(comparisons), "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
              "identical_dropped": identical,
              **{k: train_counts[k] + eval_counts[k] for k in train_counts}}

    # Step 3: train (resuming from the newest checkpoint of the same config), held-out metrics each epoch.
    plan = training.plan_for(STAGE, s, len(train_pairs), stage.world, cfg.seed)
    engine, scheduler = training.build_engine(model, cfg, s, plan.total_steps)
    stage.started(counts={**counts, "total_steps": plan.total_steps})
    evaluate = preference.held_out_evaluator(engine, tok, eval_pairs, s.calibration_bins, stage.out,
                                             title=f"{STAGE}: held-out pairs", main_rank=stage.main)
    training.fit(engine, scheduler, plan, stage=STAGE, out=stage.out, save_every=s.save_every, resume=stage.resume, rank=stage.rank,
                 loss_fn=lambda rows: preference.pair_batch_loss(engine.module, [train_pairs[i] for i in rows], tok.pad_token_id, s.margin),
                 after_epoch=evaluate, progress=cfg.progress, logger=cfg.logger)

    # Step 4: the final checkpoint, then the manifest (last).
    distributed.save_final_model(engine, tok, stage.out / "model")
    if stage.main:
        final = training.final_metric(stage.out, "accuracy", split="eval")
        stage.complete(stage_summary(f"{plan.total_steps} steps", f"held-out accuracy {final}", eval_accuracy=final),
                       counts={**counts, "steps": plan.total_steps}, final_loss=training.final_metric(stage.out, "loss"),
                       eval_accuracy=final)
    return stage.out / "model"


@hydra.main(config_path=CONFIG_PATH, config_name=STAGE, version_base=None)
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg)


if __name__ == "__main__":
    run_app(main, f"cai {STAGE}")
