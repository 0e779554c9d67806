"""SL-CAI training: supervised fine-tuning on the final revisions (plus helpful answers) in a DeepSpeed engine.

    python -m cai.stages.sl_train run_dir=R
    torchrun --nproc_per_node 2 -m cai.stages.sl_train run_dir=R
    deepspeed --no_local_rank --num_gpus 2 --module cai.stages.sl_train run_dir=R

Reads ``${run_dir}/sl_generate/dataset`` (or ``sl_train.dataset``): rows with ``messages`` whose last
turn is the assistant's. Each row becomes the chat template's prompt (every turn before the last, with
the generation prompt) followed by the assistant's text and EOS; the loss covers only those assistant
tokens and the EOS — exactly what the model produces at generation time (DESIGN.md §1.2).

Writes ``${run_dir}/sl_train/``:
- ``checkpoints/`` — resumable DeepSpeed checkpoints every ``sl_train.save_every`` optimizer steps
  (model, optimizer, scheduler, RNG and data position); a rerun of the same command resumes there;
- ``model/`` — the final ``save_pretrained`` checkpoint (safetensors, tokenizer, chat template),
  which ``AutoModelForCausalLM.from_pretrained`` loads unchanged (LoRA adapters merged in);
- ``manifest.json``, ``metrics.jsonl`` (loss, learning rate, tokens/s per step).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cai.runio import MetricsWriter, atomic_write_text, config_hash, read_manifest, read_metrics, stage_dir, write_manifest
from cai.stages import CONFIG_PATH, StageError, StageInputError, run_stage

STAGE = "sl_train"
UPSTREAM = "sl_generate"
HASH_KEYS = ("seed", "model", "deepspeed", STAGE)
IGNORE = -100  # label of positions that carry no loss


def run(cfg: DictConfig) -> Path:
    from cai import distributed as D

    start = time.time()
    s = cfg[STAGE]
    rank, world = D.init_distributed()
    main_rank = rank == 0

    # Step 1: check settings and inputs before touching the run directory.
    for key in ("lr", "epochs", "micro_batch_size", "grad_accum", "save_every"):
        if s[key] is None or s[key] <= 0:
            raise StageInputError(f"{STAGE}.{key} must be > 0, got {s[key]}")
    if s.max_length is None or s.max_length < 2:  # room for at least one prompt token and one reply token
        raise StageInputError(f"{STAGE}.max_length must be >= 2, got {s.max_length}")
    out = stage_dir(cfg.run_dir, STAGE)
    data_path = Path(s.dataset) if s.dataset else stage_dir(cfg.run_dir, UPSTREAM) / "dataset"
    if not s.dataset:
        D.upstream_complete(data_path.parent, UPSTREAM)
    rows = _load_rows(data_path)
    fingerprint = config_hash(cfg, HASH_KEYS)
    data_fingerprint = _dataset_fingerprint(data_path)
    previous = read_manifest(out)
    # the schedule and the ZeRO partitioning depend on the number of ranks: resume only with the same
    same = (bool(previous) and previous.get("config_hash") == fingerprint and previous.get("dataset_fingerprint") == data_fingerprint
            and previous.get("counts", {}).get("world_size") == world)
    if same and previous["status"] == "complete" and (out / "model").exists():
        if main_rank:
            print(f"cai {STAGE}: already complete in {out} (same config and data); nothing to do")
        return out / "model"

    from cai.models import load_policy

    torch.manual_seed(cfg.seed)
    model, tok = load_policy(cfg.model)
    examples, truncated = [], 0
    for i, row in enumerate(rows):
        if not row["messages"] or not str(row["messages"][-1].get("content", "")).strip():
            raise StageInputError(f"{data_path}: row {i} has an empty final assistant reply")
        # A reply cut off at max_new_tokens did not end: it is trained without EOS, so SL does not learn to stop mid-sentence.
        ids, labels, cut = tokenize_sft(tok, row["messages"], s.max_length, add_eos=bool(row.get("finished", True)))
        examples.append((ids, labels))
        truncated += cut

    # Step 2: the schedule. Every step consumes world * micro_batch_size * grad_accum rows; an epoch's
    # order is padded by wrapping around, so every rank runs the same number of steps and no row is dropped.
    rows_per_step = world * s.micro_batch_size * s.grad_accum
    steps_per_epoch = math.ceil(len(examples) / rows_per_step)
    total_steps = s.epochs * steps_per_epoch
    warmup = int(s.warmup_ratio * total_steps)

    # Step 3: the engine (optionally LoRA adapters only).
    import deepspeed

    if s.lora:
        model = _add_lora(model, s.lora, cfg)
    model.train()
    ds_config = D.deepspeed_config(OmegaConf.to_container(cfg.deepspeed, resolve=True), micro_batch_size=s.micro_batch_size,
                                   grad_accum=s.grad_accum, lr=s.lr, weight_decay=s.weight_decay, grad_clip=s.grad_clip,
                                   dtype=next(model.parameters()).dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    # DeepSpeed builds the optimizer from ds_config and then calls this with it; the scheduler's
    # state is saved in every checkpoint.
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda i: D.warmup_linear_decay(i, warmup, total_steps)),
    )

    # Step 4: resume from the newest checkpoint of the same config, or start over.
    checkpoints = out / "checkpoints"
    if main_rank:
        if not same and checkpoints.exists():
            shutil.rmtree(checkpoints)  # a different config's checkpoints must not be resumed
        write_manifest(out, stage=STAGE, cfg=cfg, status="running", hash_keys=HASH_KEYS, dataset_fingerprint=data_fingerprint,
                       counts={"rows": len(examples), "world_size": world, "total_steps": total_steps})
    D.barrier()
    state = D.load_latest_checkpoint(engine, checkpoints) if same else None
    first_step = 0
    if state:
        first_step = state["step"]
        D.set_rng_state(state["rng"])
        if main_rank:
            print(f"cai {STAGE}: resuming at step {first_step}/{total_steps}")
    if main_rank:
        _drop_metrics_after(out, first_step)  # steps after the checkpoint (or all, on a fresh start) are redone
    metrics = MetricsWriter(out, enabled=main_rank)

    # Step 5: train. Each optimizer step runs grad_accum micro-batches per rank.
    bar = tqdm(total=total_steps, initial=first_step, desc=STAGE, unit="step", disable=not (cfg.progress and main_rank))
    device = engine.device
    for step in range(first_step, total_steps):
        t0 = time.time()
        epoch, k = divmod(step, steps_per_epoch)
        if k == 0 or step == first_step:  # a new epoch (or a resume inside one): its row order
            order = epoch_order(len(examples), steps_per_epoch * rows_per_step, cfg.seed, epoch)
        step_rows = order[k * rows_per_step:(k + 1) * rows_per_step]
        losses, tokens, lr = [], 0, scheduler.get_last_lr()[0]
        for micro in range(s.grad_accum):
            chunk = step_rows[micro * world * s.micro_batch_size:(micro + 1) * world * s.micro_batch_size]
            mine = chunk[rank * s.micro_batch_size:(rank + 1) * s.micro_batch_size]
            batch = collate([examples[i] for i in mine], tok.pad_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            loss = engine(**batch).loss
            # every rank must agree to stop: a rank that stopped alone would leave the others in an all-reduce
            if D.sum_over_ranks(int(not torch.isfinite(loss))) > 0:
                raise StageError(f"a non-finite loss at step {step + 1}; stopping. Last good checkpoint: "
                                 f"{_latest_tag(checkpoints)} in {checkpoints}")
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
        loss_value = D.mean_over_ranks(sum(losses) / len(losses))
        tokens = D.sum_over_ranks(tokens)
        seconds = time.time() - t0
        metrics.log(step=step + 1, epoch=epoch, loss=round(loss_value, 6), lr=lr,
                    tokens_per_s=round(tokens / max(seconds, 1e-9), 1), seconds=round(seconds, 3))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if (step + 1) % s.save_every == 0 and step + 1 < total_steps:
            D.save_checkpoint(engine, checkpoints, step + 1, {"step": step + 1, "rng": D.rng_state()})
    bar.close()

    # Step 6: the final checkpoint, then the manifest (last).
    D.save_final_model(engine, tok, out / "model", merge_lora=bool(s.lora))
    if main_rank:
        final_loss = next((m["loss"] for m in reversed(read_metrics(out)) if "loss" in m), None)
        write_manifest(out, stage=STAGE, cfg=cfg, status="complete", hash_keys=HASH_KEYS, dataset_fingerprint=data_fingerprint,
                       counts={"rows": len(examples), "truncated_rows": truncated, "world_size": world, "steps": total_steps},
                       timings={"total_s": round(time.time() - start, 2)}, final_loss=final_loss)
        print(f"cai {STAGE}: {total_steps} steps -> {out / 'model'}")
    D.barrier()
    return out / "model"


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
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tok(messages[-1]["content"], add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if add_eos else [])
    truncated = len(prompt_ids) + len(reply_ids) > max_length
    if truncated:
        reply_ids = reply_ids[:max_length - 1] if len(reply_ids) >= max_length else reply_ids
        keep = max_length - len(reply_ids)
        prompt_ids = prompt_ids[-keep:] if keep > 0 else []
    return prompt_ids + reply_ids, [IGNORE] * len(prompt_ids) + reply_ids, truncated


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids (B, T) with PAD, labels (B, T) with IGNORE, attention_mask (B, T)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def epoch_order(n: int, length: int, seed: int, epoch: int) -> list[int]:
    """A seeded shuffle of range(n) for ``epoch``, wrapped around to ``length`` entries."""
    order = list(range(n))
    random.Random(f"cai-sl-train:{seed}:{epoch}").shuffle(order)
    return [order[i % n] for i in range(length)]


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


def _dataset_fingerprint(path: Path) -> str | None:
    """The upstream manifest's config hash (or the dataset's own fingerprint): changes when the data does."""
    manifest = read_manifest(path.parent)
    if manifest and manifest.get("stage") == UPSTREAM:
        return f"{manifest.get('config_hash')}:{manifest.get('constitution_hash')}"
    state = path / "state.json"
    return json.loads(state.read_text()).get("_fingerprint") if state.exists() else None


def _add_lora(model, lora_cfg, cfg):
    if cfg.deepspeed.zero_optimization.stage == 3:
        raise StageInputError(f"{STAGE}.lora is supported with deepspeed=zero0 or zero2, not ZeRO-3")
    from peft import LoraConfig, get_peft_model

    spec = OmegaConf.to_container(lora_cfg, resolve=True)
    return get_peft_model(model, LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                                            target_modules=list(spec["target_modules"]), task_type="CAUSAL_LM"))


def _drop_metrics_after(out: Path, step: int) -> None:
    """On resume, forget metrics of steps after the checkpoint: they are about to be redone."""
    rows = [m for m in read_metrics(out) if m.get("step", 0) <= step]
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in rows))


def _latest_tag(folder: Path) -> str:
    latest = folder / "latest.json"
    return json.loads(latest.read_text())["tag"] if latest.exists() else "none (no checkpoint yet)"


@hydra.main(config_path=CONFIG_PATH, config_name=STAGE, version_base=None)
def main(cfg: DictConfig) -> None:
    run_stage(STAGE, run, cfg)


if __name__ == "__main__":
    main()
