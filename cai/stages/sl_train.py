"""SL-CAI training: supervised fine-tuning on the revisions (plus helpful answers) in a DeepSpeed engine.

    python -m cai.stages.sl_train run_dir=R
    torchrun --nproc_per_node 2 -m cai.stages.sl_train run_dir=R
    deepspeed --no_local_rank --num_gpus 2 --module cai.stages.sl_train run_dir=R

Fine-tunes the ``sl_start`` role (``cai.roles``; the policy that wrote the data unless set — the CAI paper
fine-tuned a pretrained LM) on ``${run_dir}/sl_generate/dataset`` (or ``sl_train.dataset``): rows with ``messages`` whose last
turn is the assistant's. With ``sl_train.revisions=every`` (the default; CAI section 3.1 trained on the revisions of every
step) a red-team row gives one training row per revision step (``training_rows``); ``final`` keeps only the last.
Each row becomes the chat template's prompt (every turn before the last, with the generation prompt) followed by
the assistant's text and EOS; the loss covers only those assistant tokens and the EOS — exactly what the model
produces at generation time.

Writes ``${run_dir}/sl_train/``:
- ``checkpoints/`` — resumable DeepSpeed checkpoints every ``sl_train.save_every`` optimizer steps
  (model, optimizer, scheduler, RNG and data position); a rerun of the same command resumes there;
- ``model/`` — the final ``save_pretrained`` checkpoint (safetensors, tokenizer, chat template),
  which ``AutoModelForCausalLM.from_pretrained`` loads unchanged (LoRA adapters merged in);
- ``manifest.json``, ``metrics.jsonl`` (loss, learning rate, tokens/s per step).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cai import roles, training
from cai.errors import StageInputError
from cai.lineage import input_fingerprint
from cai.stage_folder import StageRun, stage_summary
from cai.stages import CONFIG_PATH, run_app, run_stage

# The stage's facts, side by side (cai.stages says what each means; the pipeline reads them)
STAGE = "sl_train"
UPSTREAM = ("sl_generate",)
HASH_KEYS = ("seed", "sl_start", "deepspeed", STAGE)
MULTI_RANK = True
SHARDED = False
IGNORE = -100  # label of positions that carry no loss


def run(cfg: DictConfig, stage: StageRun) -> Path:
    from cai import distributed

    s = cfg[STAGE]

    # Step 1: check settings and inputs before touching the run directory.
    training.check_train_settings(STAGE, s)
    if s.max_length is None or s.max_length < 2:  # room for at least one prompt token and one reply token
        raise StageInputError(f"{STAGE}.max_length must be >= 2, got {s.max_length}")
    data_path = Path(s.dataset) if s.dataset else stage.upstream("sl_generate") / "dataset"
    if s.revisions not in ("every", "final"):
        raise StageInputError(f"{STAGE}.revisions must be every or final, got {s.revisions!r}")
    rows = training_rows(_load_rows(data_path), s.revisions)
    if stage.done("model", dataset_fingerprint=input_fingerprint(data_path)):
        return stage.out / "model"

    from cai.models import load_policy

    torch.manual_seed(cfg.seed)
    model, tok = load_policy(roles.spec(cfg, "sl_start"))
    examples, truncated = [], 0
    for i, row in enumerate(rows):
        if not row["messages"] or not str(row["messages"][-1].get("content", "")).strip():
            raise StageInputError(f"{data_path}: row {i} has an empty final assistant reply")
        # A reply cut off at max_new_tokens did not end: it is trained without EOS, so SL does not learn to stop mid-sentence.
        ids, labels, cut = tokenize_sft(tok, row["messages"], s.max_length, add_eos=bool(row.get("finished", True)))
        examples.append((ids, labels))
        truncated += cut

    # Step 2: the schedule (every rank runs the same number of steps; no row is dropped) and the engine
    # (optionally LoRA adapters only).
    plan = training.plan_for(STAGE, s, len(examples), stage.world, cfg.seed)
    if s.lora:
        model = _add_lora(model, s.lora, cfg)
    engine, scheduler = training.build_engine(model, cfg, s, plan.total_steps)

    # Step 3: train, resuming from the newest checkpoint of the same config.
    stage.started(counts={"rows": len(examples), "total_steps": plan.total_steps})

    def loss_fn(mine: list[int]):
        batch = {key: value.to(engine.device) for key, value in collate([examples[i] for i in mine], tok.pad_token_id).items()}
        return engine(**batch).loss, {"tokens": int(batch["attention_mask"].sum())}

    training.fit(engine, scheduler, plan, stage=STAGE, out=stage.out, save_every=s.save_every, resume=stage.resume, rank=stage.rank,
                 loss_fn=loss_fn, progress=cfg.progress, logger=cfg.logger)

    # Step 4: the final checkpoint, then the manifest (last).
    distributed.save_final_model(engine, tok, stage.out / "model", merge_lora=bool(s.lora))
    if stage.main:
        final_loss = training.final_metric(stage.out, "loss")
        stage.complete(stage_summary(f"{plan.total_steps} steps", f"final loss {final_loss}", final_loss=final_loss),
                       counts={"rows": len(examples), "truncated_rows": truncated, "steps": plan.total_steps},
                       final_loss=final_loss)
    return stage.out / "model"


def training_rows(rows: list[dict], revisions: str) -> list[dict]:
    """The rows SL trains on. ``final``: each row as it is (its ``messages`` end with the last non-empty revision, or the
    answer). ``every``: a row with ``revisions`` gives one row per non-empty revision, the conversation then that
    revision, with ``finished`` from ``revisions_finished`` (data without it: the row's ``finished`` for the last
    revision, True for earlier ones); a row without any stays as it is."""
    if revisions == "final":
        return rows
    out = []
    for row in rows:
        texts = row.get("revisions") or []
        done_flags = row.get("revisions_finished") or [True] * (len(texts) - 1) + [bool(row.get("finished", True))]
        steps = [(text, done) for text, done in zip(texts, done_flags) if text.strip()]
        if not steps:
            out.append(row)
            continue
        out += [{**row, "messages": [*row["messages"][:-1], {"role": "assistant", "content": text}], "finished": done}
                for text, done in steps]
    return out


def tokenize_sft(tok, messages: list[dict], max_length: int, add_eos: bool = True) -> tuple[list[int], list[int], bool]:
    """Token ids and labels for one chat whose last turn is the assistant's.

    ids = chat-template prompt (all earlier turns + generation prompt) + assistant text + EOS (unless
    ``add_eos=False``: a reply that was cut off and never ended);
    labels = IGNORE over the prompt, the ids themselves over the reply and EOS. Too long: the prompt is
    cut from the left (oldest context first); the reply is cut only if it alone exceeds ``max_length``.
    Returns (ids, labels, truncated).
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise StageInputError("every training row's messages must end with an assistant turn")
    prompt_ids, reply_ids = training.encode_chat(tok, messages[:-1], messages[-1]["content"], add_eos=add_eos)
    reply_cut = len(reply_ids) >= max_length
    if reply_cut:
        reply_ids = reply_ids[:max_length - 1]
    prompt_ids, prompt_cut = training.keep_left(prompt_ids, len(reply_ids), max_length)
    return prompt_ids + reply_ids, [IGNORE] * len(prompt_ids) + reply_ids, reply_cut or prompt_cut


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids (B, T) with PAD, labels (B, T) with IGNORE, attention_mask (B, T)."""
    input_ids, mask = training.pad_batch([ids for ids, _ in examples], pad_id)
    labels, _ = training.pad_batch([lab for _, lab in examples], IGNORE)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _load_rows(path: Path) -> list[dict]:
    from datasets import load_from_disk

    if not path.exists():
        raise StageInputError(f"{path}: no dataset here (sl_train.dataset or ${{run_dir}}/sl_generate/dataset)")
    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a folder that is not a dataset
        raise StageInputError(f"{path}: not a dataset saved with save_to_disk ({type(e).__name__})") from None
    if "messages" not in ds.column_names:
        raise StageInputError(f"{path}: no 'messages' column (columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise StageInputError(f"{path}: the dataset is empty")
    return ds.to_list()


def _add_lora(model, lora_cfg, cfg):
    if cfg.deepspeed.zero_optimization.stage == 3:
        raise StageInputError(f"{STAGE}.lora is supported with deepspeed=zero0 or zero2, not ZeRO-3")
    from peft import LoraConfig, get_peft_model

    spec = OmegaConf.to_container(lora_cfg, resolve=True)
    return get_peft_model(model, LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                                            target_modules=list(spec["target_modules"]), task_type="CAUSAL_LM"))


@hydra.main(config_path=CONFIG_PATH, config_name=STAGE, version_base=None)
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg)


if __name__ == "__main__":
    run_app(main, f"cai {STAGE}")
