"""The optimisation loop the supervised stages share (sl_train, pm_pretrain, pm_finetune).

A stage prepares its examples and a ``loss_fn`` for one micro-batch; ``fit`` does the rest the same way
for all of them: a seeded row order per epoch (wrapped around so every rank runs the same number of
steps), ``grad_accum`` micro-batches per optimizer step, an all-rank stop on a non-finite loss, a
resumable DeepSpeed checkpoint every ``save_every`` steps, ``metrics.jsonl`` rows and a progress bar.

    engine, scheduler = build_engine(model, cfg, s, plan.total_steps)
    fit(engine, scheduler, plan, out=out, loss_fn=loss_fn, resume=same, ...)

``s`` is the stage's config section; it must carry lr, warmup_ratio, weight_decay, grad_clip, epochs,
micro_batch_size, grad_accum and save_every (documented in each ``conf/stage/<stage>.yaml``).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cai import distributed
from cai.errors import StageError, StageInputError
from cai.files import atomic_write_text
from cai.metrics import MetricsWriter, read_metrics

TRAIN_KEYS = ("lr", "epochs", "micro_batch_size", "grad_accum", "save_every")


def check_train_settings(stage: str, s: DictConfig) -> None:
    """Refuse non-positive optimisation settings (before the stage touches its folder)."""
    for key in TRAIN_KEYS:
        if s[key] is None or s[key] <= 0:
            raise StageInputError(f"{stage}.{key} must be > 0, got {s[key]}")
    if not 0.0 <= s.warmup_ratio < 1.0:
        raise StageInputError(f"{stage}.warmup_ratio must be in [0, 1), got {s.warmup_ratio}")


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------

def encode_chat(tok, prompt_messages: list[dict], reply: str, add_eos: bool = True) -> tuple[list[int], list[int]]:
    """``(prompt_ids, reply_ids)``: the chat template over ``prompt_messages`` with the generation prompt,
    then the reply's tokens and EOS — exactly the tokens a policy sees and produces when it answers."""
    prompt = tok.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tok(reply, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if add_eos else [])
    return prompt_ids, reply_ids


def keep_left(prompt_ids: list[int], reply_len: int, max_length: int) -> tuple[list[int], bool]:
    """The prompt cut from the left (oldest context first) so prompt + reply fit ``max_length``;
    returns (kept prompt ids, whether anything was cut)."""
    keep = max(0, max_length - reply_len)
    if len(prompt_ids) <= keep:
        return prompt_ids, False
    return (prompt_ids[len(prompt_ids) - keep:] if keep else []), True


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, T) padded with PAD on ``side`` ("right" or "left"), attention_mask (B, T))."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Schedule and engine
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How ``rows`` examples become optimizer steps on ``world`` ranks."""
    rows: int
    world: int
    micro_batch_size: int
    grad_accum: int
    epochs: int
    seed: int
    name: str  # seeds the row order, so two stages never share one

    @property
    def rows_per_step(self) -> int:
        return self.world * self.micro_batch_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.rows / self.rows_per_step)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def epoch_order(self, epoch: int) -> list[int]:
        return epoch_order(self.rows, self.steps_per_epoch * self.rows_per_step, f"{self.name}:{self.seed}", epoch)

    def my_rows(self, order: list[int], step_in_epoch: int, micro: int, rank: int) -> list[int]:
        """The rows rank ``rank`` runs in micro-step ``micro`` of step ``step_in_epoch``."""
        start = step_in_epoch * self.rows_per_step + (micro * self.world + rank) * self.micro_batch_size
        return order[start:start + self.micro_batch_size]


def plan_for(stage: str, s: DictConfig, rows: int, world: int, seed: int) -> Plan:
    return Plan(rows=rows, world=world, micro_batch_size=s.micro_batch_size, grad_accum=s.grad_accum, epochs=s.epochs,
                seed=seed, name=f"cai-{stage}")


def epoch_order(n: int, length: int, seed: int | str, epoch: int) -> list[int]:
    """A seeded shuffle of range(n) for ``epoch``, wrapped around to ``length`` entries."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [order[i % n] for i in range(length)]


def build_engine(model, cfg: DictConfig, s: DictConfig, total_steps: int):
    """A DeepSpeed engine over ``model``'s trainable parameters (ZeRO block from ``cfg.deepspeed``) and
    its LR scheduler (linear warm-up over ``s.warmup_ratio`` of the steps, then linear decay to 0)."""
    import deepspeed

    model.train()
    warmup = int(s.warmup_ratio * total_steps)
    world, dtype = distributed.world_size(), next(model.parameters()).dtype
    zero = distributed.zero_for_world(OmegaConf.to_container(cfg.deepspeed, resolve=True), world, dtype)
    ds_config = distributed.deepspeed_config(zero, micro_batch_size=s.micro_batch_size, grad_accum=s.grad_accum, lr=s.lr,
                                             weight_decay=s.weight_decay, grad_clip=s.grad_clip, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    # DeepSpeed builds the optimizer from ds_config and hands it to this; the scheduler's state is in every checkpoint.
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda i: distributed.warmup_linear_decay(i, warmup, total_steps)),
    )
    if world == 1 and engine.zero_optimization_stage() == 0:
        # one rank: the gradients are already the average (the all-reduce took 5 s of the demo's 160 s bf16 ppo, profiled)
        engine.enable_backward_allreduce = False
    if s.get("compile"):
        engine.compile()  # torch.compile of the model's forward and backward (DeepSpeed's default backend: inductor)
    distributed.weights_only_checkpoints(engine)
    return engine, scheduler


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def fit(engine, scheduler, plan: Plan, *, stage: str, out: Path, save_every: int, resume: bool, rank: int,
        loss_fn: Callable[[list[int]], tuple[torch.Tensor, dict]],
        after_epoch: Callable[[int], dict] | None = None, progress: bool = True, logger: DictConfig | None = None) -> None:
    """Train ``plan.total_steps`` optimizer steps, resuming from ``out/checkpoints`` when ``resume``.

    ``loss_fn(rows)`` -> (loss, stats) for this rank's micro-batch of example indices; ``stats`` values
    are averaged over micro-batches and ranks, except ``tokens`` (summed, logged as tokens_per_s).
    ``after_epoch(epoch)`` runs on every rank after an epoch's last step and returns metrics logged as a
    row with ``split: "eval"`` (before that step's checkpoint, so a resume never loses or repeats it).
    ``logger`` (``cfg.logger``) mirrors the rows to TensorBoard or W&B (see ``MetricsWriter``).
    """
    main_rank = rank == 0
    checkpoints = out / "checkpoints"
    state = resume_or_restart(engine, out, resume, stage=stage, total_steps=plan.total_steps, rank=rank)
    first_step = state["step"] if state else 0
    metrics = MetricsWriter(out, enabled=main_rank, logger=logger, run_name=stage)

    bar = tqdm(total=plan.total_steps, initial=first_step, desc=stage, unit="step", disable=not (progress and main_rank))
    order: list[int] = []
    for step in range(first_step, plan.total_steps):
        t0 = time.time()
        epoch, k = divmod(step, plan.steps_per_epoch)
        if k == 0 or step == first_step:  # a new epoch (or a resume inside one): its row order
            order = plan.epoch_order(epoch)
        lr = scheduler.get_last_lr()[0]
        sums: dict[str, float] = {}
        for micro in range(plan.grad_accum):
            loss, stats = loss_fn(plan.my_rows(order, k, micro, rank))
            # every rank must agree to stop: a rank that stopped alone would leave the others in an all-reduce
            if distributed.sum_over_ranks(int(not torch.isfinite(loss))) > 0:
                raise StageError(f"a non-finite loss at step {step + 1}; stopping. Last good checkpoint: "
                                 f"{latest_tag(checkpoints)} in {checkpoints}")
            engine.backward(loss)
            engine.step()
            for key, value in {"loss": loss.item(), **stats}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        seconds = time.time() - t0
        row = {"step": step + 1, "epoch": epoch, "lr": lr}
        for key, value in sums.items():
            if key == "tokens":
                row["tokens_per_s"] = round(distributed.sum_over_ranks(int(value)) / max(seconds, 1e-9), 1)
            else:
                row[key] = round(distributed.mean_over_ranks(value / plan.grad_accum), 6)
        row["seconds"] = round(seconds, 3)
        metrics.log(**row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if after_epoch is not None and k == plan.steps_per_epoch - 1:
            metrics.log(step=step + 1, epoch=epoch, split="eval", **after_epoch(epoch))
        if (step + 1) % save_every == 0 and step + 1 < plan.total_steps:
            distributed.save_checkpoint(engine, checkpoints, step + 1, {"step": step + 1, "rng": distributed.rng_state()})
    bar.close()
    metrics.close()


def resume_or_restart(engines, out: Path, resume: bool, *, stage: str, total_steps: int, rank: int,
                      logs: tuple[str, ...] = ("metrics.jsonl",)) -> dict | None:
    """Load the newest checkpoint under ``out/checkpoints`` into ``engines`` (one engine or a dict) when
    ``resume``, else delete that folder; restore the RNG; drop log rows of steps about to be redone.
    Returns the checkpoint's client state (None on a fresh start)."""
    checkpoints = out / "checkpoints"
    if rank == 0 and not resume and checkpoints.exists():
        shutil.rmtree(checkpoints)  # another config's checkpoints must not be resumed
    distributed.barrier()
    state = distributed.load_latest_checkpoint(engines, checkpoints) if resume else None
    if state:
        distributed.set_rng_state(state["rng"])
        if rank == 0:
            print(f"cai {stage}: resuming at step {state['step']}/{total_steps}")
    if rank == 0:
        for name in logs:
            drop_metrics_after(out, state["step"] if state else 0, name)
    return state


def final_metric(out: Path, key: str, split: str | None = None):
    """The last logged value of ``key`` (in rows of ``split``), or None."""
    return next((m[key] for m in reversed(read_metrics(out)) if key in m and m.get("split") == split), None)


def latest_tag(folder: Path) -> str:
    latest = folder / "latest.json"
    return json.loads(latest.read_text())["tag"] if latest.exists() else "none (no checkpoint yet)"


def drop_metrics_after(out: Path, step: int, name: str = "metrics.jsonl") -> None:
    """On resume, forget the rows of steps after the checkpoint: they are about to be redone."""
    rows = [m for m in read_metrics(out, name) if m.get("step", 0) <= step]
    atomic_write_text(out / name, "".join(json.dumps(m) + "\n" for m in rows))
