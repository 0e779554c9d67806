"""The thin DeepSpeed layer every training stage shares: process-group set-up, the engine config,
resumable checkpoints and the final ``save_pretrained`` checkpoint; and how a sharded stage's ranks share its work
without a collective (``mine``, ``wait_for``, ``telling_the_other_ranks``).

Launch styles that all work (CPU uses gloo, GPU nccl):

    python -m cai.stages.sl_train ...                                   # one process
    torchrun --nproc_per_node 2 -m cai.stages.sl_train ...
    deepspeed --no_local_rank --num_gpus 2 --module cai.stages.sl_train ...
    python -m cai.stages.sl_train -m hydra/launcher=submitit_slurm hydra.launcher.nodes=2 hydra.launcher.tasks_per_node=8 ...

Ranks read ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` from the environment (never a ``--local_rank``
argument, which Hydra would reject). A single process gets those variables filled in here, and so does each task of
a Slurm job that submitit started (``env_from_slurm``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path

import torch

from cai.errors import StageError, first_line
from cai.files import atomic_dir, atomic_write_json, atomic_write_text

LATEST = "latest.json"


def init_distributed() -> tuple[int, int]:
    """Start (or join) the process group; returns ``(rank, world_size)``."""
    import deepspeed
    import torch.distributed as dist

    env_from_slurm()
    if "WORLD_SIZE" not in os.environ:  # a plain `python -m ...`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    # DeepSpeed JIT-compiles a few C++ ops on first use (docs/stages.md); keep them between runs.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    if torch.cuda.is_available():  # modulo: a Slurm task may see only its own GPU (hydra.launcher.gpus_per_task=1)
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    return dist.get_rank(), dist.get_world_size()


def env_from_slurm() -> None:
    """In a task that submitit started (``hydra/launcher=submitit_slurm``: a Slurm job of ``nodes`` x ``tasks_per_node``
    tasks; ``submitit_local``: that many tasks on this machine), fill in torch's ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` from the job's own variables (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``,
    ``SLURM_JOB_NODELIST``; ``SUBMITIT_LOCAL_*`` for the local executor), read by submitit's ``JobEnvironment``.
    ``MASTER_ADDR`` is the job's first host and ``MASTER_PORT`` is drawn from the job id (or kept when set), so every task
    computes the same address without talking to the others. ``CUDA_VISIBLE_DEVICES`` is left alone: each rank picks
    its GPU by ``LOCAL_RANK`` (``init_distributed``).

    Nothing changes where a launcher set ``WORLD_SIZE`` already (torchrun, deepspeed, ``launcher=deepspeed`` inside a
    Slurm job), outside submitit, or in a job of one task (a stage the pipeline starts in a one-task job is a group of
    one, on a free port). Called by ``run_stage`` before it decides which rank holds the stage's folder."""
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from submitit.helpers import TorchDistributedEnvironment

    job = TorchDistributedEnvironment()
    if job.world_size > 1:
        job.export(set_cuda_visible_devices=False, overwrite=True)  # a MASTER_PORT set by hand is kept (submitit reads it)


def extensions_dir() -> Path:
    """Where DeepSpeed's JIT-compiled C++ ops are kept between runs: one folder per Python environment under cai's
    cache. Their build commands name the environment's own paths, so two environments (two clones) sharing one folder
    rebuilt each other's ops on every switch, about 30 s each on 2 cores."""
    from cai.models import cache_dir

    return cache_dir() / "torch_extensions" / hashlib.sha256(sys.prefix.encode("utf-8")).hexdigest()[:12]


def compile_ops() -> None:
    """Build the C++ op DeepSpeed's CPU process group loads (its shared-memory collectives) now, at set-up (``make setup``
    calls this), instead of inside the first training stage. Nothing to do where the accelerator has no such op."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)
        print(f"cai: DeepSpeed's {builder.NAME} op is built in {os.environ['TORCH_EXTENSIONS_DIR']}")


def is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def mean_over_ranks(value: float) -> float:
    return _all_reduce_sum(value, torch.float64) / world_size()


def sum_over_ranks(value: int) -> int:
    return int(_all_reduce_sum(value, torch.int64))


def gather_objects(value) -> list:
    """``value`` from every rank, in rank order (any picklable object; one rank: ``[value]``)."""
    import torch.distributed as dist

    if world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _all_reduce_sum(value: float, dtype: torch.dtype) -> float:
    import torch.distributed as dist

    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t)
    return t.item()


def zero_for_world(zero: dict, world: int, dtype: torch.dtype) -> dict:
    """The ZeRO block to run with ``world`` ranks. ZeRO-1 and -2 partition optimizer state and gradients
    across ranks; with one rank there is nothing to partition and their bookkeeping only costs time
    (docs/performance.md), so a single fp32 process runs them as stage 0 — the same maths. ZeRO-3, offloading
    and bf16/fp16 (DeepSpeed's mixed-precision optimizers) are kept as asked."""
    block = dict(zero.get("zero_optimization", {}))
    if world == 1 and dtype == torch.float32 and block.get("stage", 0) in (1, 2) and not block.get("offload_optimizer"):
        return {**zero, "zero_optimization": {"stage": 0}}
    return zero


def deepspeed_config(zero: dict, *, micro_batch_size: int, grad_accum: int, lr: float, weight_decay: float,
                     grad_clip: float, dtype: torch.dtype) -> dict:
    """The engine config: the ``deepspeed/`` group's ZeRO block plus the stage's optimisation settings.

    Adam is PyTorch's own (``torch_adam``) and fused: one kernel per step, nothing to compile, several times
    faster than torch's default per-tensor loop (docs/performance.md). ZeRO-Offload needs DeepSpeed's CPU Adam,
    which is compiled on first use.
    """
    offload = bool(zero.get("zero_optimization", {}).get("offload_optimizer"))
    adam = {"lr": lr, "weight_decay": weight_decay} | ({} if offload else {"torch_adam": True, "fused": True})
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "optimizer": {"type": "AdamW", "params": adam},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,  # cai logs its own metrics
        "wall_clock_breakdown": False,
        **zero,
    }
    return config


def warmup_linear_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up from 0 over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def rng_state() -> dict:
    """Every RNG a stage draws from, as plain numbers and tensors (loadable with ``weights_only=True``)."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, folder: Path, step: int, client_state: dict) -> None:
    """A resumable checkpoint (model, optimizer, scheduler from DeepSpeed; step, data position and RNG in
    ``client_state``). ``engine`` may be a dict ``{name: engine}`` (PPO's policy and value): each is saved
    under ``folder/name``. ``latest.json`` is replaced atomically only after every rank wrote every part,
    so a crash mid-save leaves the previous checkpoint as the one to resume from."""
    tag = f"step-{step:08d}"
    engines = engine if isinstance(engine, dict) else {"": engine}
    for name, e in engines.items():
        e.save_checkpoint(str(folder / name), tag=tag, client_state=client_state, save_latest=False)
    barrier()
    if is_main():
        atomic_write_json(folder / LATEST, {"tag": tag, "step": step})
        for name in engines:
            for old in (folder / name).iterdir():
                if old.is_dir() and old.name.startswith("step-") and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
    barrier()


def weights_only_checkpoints(engine) -> None:
    """Make ``engine`` read its resumable checkpoints with ``load_weights_only`` (DeepSpeed's own torch
    checkpoint engine unpickles them with ``weights_only=False``)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"cai expects DeepSpeed's torch checkpoint engine, got {type(engine.checkpoint_engine).__name__}")
    engine.checkpoint_engine.load = load_weights_only


def load_weights_only(path: str, map_location=None):
    """``torch.load(weights_only=True)``: tensors, containers and numbers, plus the few DeepSpeed records a
    checkpoint holds (loss scaler, ZeRO stage, fragment addresses); never an arbitrary pickled object."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_latest_checkpoint(engine, folder: Path) -> dict | None:
    """Restore the newest complete checkpoint into ``engine`` (or each of a dict of engines, as saved by
    ``save_checkpoint``); returns its client state (or None)."""
    latest = folder / LATEST
    if not latest.exists():
        return None
    import json

    tag = json.loads(latest.read_text())["tag"]
    client_state = None
    for name, e in (engine if isinstance(engine, dict) else {"": engine}).items():
        path, client_state = e.load_checkpoint(str(folder / name), tag=tag)
        if path is None:
            raise RuntimeError(f"{folder / name / tag}: checkpoint named in {latest} could not be loaded")
    return client_state


def save_final_model(engine, tokenizer, folder: Path, merge_lora: bool = False) -> None:
    """``save_pretrained`` (safetensors) + tokenizer + chat template, written atomically by rank 0.

    Under ZeRO-3 the partitioned weights are gathered first (every rank must call this).
    """
    zero3 = engine.zero_optimization_stage() == 3
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
    if is_main():
        model = engine.module
        if merge_lora:
            model = model.merge_and_unload()
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


POLL_S = 2.0  # how often a rank that has made its share of a stage's work looks whether the others have made theirs
FAILED = "failed_ranks"  # in a stage's folder: a file per rank that failed, with its error's first line


def mine(k: int, rank: int, world: int | None) -> bool:
    """Whether the k-th unit of work (a shard, a checkpoint) is rank ``rank``'s of ``world`` (None: one process, all)."""
    return k % (world or 1) == rank


def wait_for(paths: list[Path], out: Path) -> None:
    """Return once every file of ``paths`` exists (the other ranks' work); stop in one line (StageError) when a rank
    has failed instead (``telling_the_other_ranks``: its file in ``out``)."""
    while not all(path.exists() for path in paths):
        failed = sorted((out / FAILED).glob("rank-*"))
        if failed:
            raise StageError(f"{failed[0].name} failed ({failed[0].read_text().strip()}); this rank stops too")
        time.sleep(POLL_S)


@contextlib.contextmanager
def telling_the_other_ranks(out: Path):
    """On several ranks, a failure of this rank is written to ``out/failed_ranks/rank-<r>`` (its first line) before it is
    raised, so ranks waiting for its work (``wait_for``) stop instead of waiting forever (a launcher that stops every
    rank when one dies, as torchrun does, need not). ``StageRun.started`` clears the folder."""
    try:
        yield
    except BaseException as e:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            with contextlib.suppress(OSError):
                atomic_write_text(out / FAILED / f"rank-{os.environ.get('RANK', '0')}", first_line(e) or type(e).__name__)
        raise
