"""One file per stage; each is a Hydra app (``python -m cai.stages.<stage> key=value ...``) that reads
its upstream stages' folders in ``run_dir`` and writes only its own (see ``cai.stage_folder``).

Each stage module states its facts side by side at its top, and the pipeline reads them from there:

- ``STAGE``: its name, which is also its folder in ``run_dir`` and its section of the config;
- ``UPSTREAM``: the stages whose folders it reads (a rerun of one of them reruns it);
- ``HASH_KEYS``: the top-level config keys it reads that shape its outputs — its config hash covers exactly
  these, so changing one reruns the stage and changing another never does. The model roles it loads (``policy``,
  ``labeler``, …; ``cai.roles``) are among them, each hashed as the model it resolves to, and its manifest names them.
  Only ``UNHASHED`` keys may be read without being listed (``tests/test_stage_facts.py`` reads each stage's code to
  check both);
- ``MULTI_RANK``: whether a multi-process launcher (``launcher=deepspeed``, torchrun, Slurm) runs it on every rank;
- ``SHARDED``: whether its ranks split its work into units whose outputs do not depend on how many ranks there are
  (the generating stages: shards of prompts, evaluate's checkpoints; ``cai.shards``), so it writes the same folder on
  any number of ranks and resumes or skips under another launcher. A training stage's ranks partition its batches
  and its optimizer state instead: the number of ranks is part of its run.

Each stage's ``run(cfg, stage)`` gets ``stage``, its handle on its folder (``cai.stage_folder.StageRun``), from
``run_stage``: one place says how every stage starts, locks, resumes and ends.

Adding a stage: its file here, its config (``conf/<stage>.yaml`` and ``conf/stage/<stage>.yaml``) and its name in
``STAGES`` and ``conf/pipeline.yaml`` (docs/stages.md, "Adding a stage").
"""

import contextlib
import os
import sys
from pathlib import Path

from cai.errors import InputError, StageError, StageInputError, disk_full, first_line
from cai.metrics import fail_open_runs, logger_backend
from cai.stage_folder import StageRun, hold_stage, stage_dir

# The repository's conf/ folder, as an absolute path so every entry point (stages, pipeline) finds it.
CONFIG_PATH = str(Path(__file__).resolve().parents[2] / "conf")

# The pipeline's stages, in the order it runs them (label_alignment is a stand-alone check, not a pipeline stage).
STAGES = ("sl_generate", "sl_train", "ai_feedback", "dpo", "pm_pretrain", "pm_finetune", "ppo", "evaluate")

# Settings that change where or how a stage runs, never what it computes: no config hash covers them.
UNHASHED = ("run_dir", "progress", "logger", "deterministic")


def run_stage(run, cfg) -> None:
    """Run a stage: ``run(cfg, stage)``, the stage's function, with ``stage`` its handle on its folder
    (``cai.stage_folder.StageRun``, made by ``handle`` from the facts of the module ``run`` is defined in).

    The stage's folder is held for the whole run (``stage_folder.hold_stage``): a second command on the same folder
    is refused in one line naming the process that holds it, and the leftovers of a run killed mid-save are
    cleared first. The expected kinds of bad input end in one-line errors and exit 1, and so does a full disk; what
    was complete before stays readable, since every write is atomic. Anything else is a bug and keeps its traceback.

    A task of a Slurm job (``hydra/launcher=submitit_slurm``) gets its rank from Slurm's variables first
    (``cai.distributed.env_from_slurm``). Of several ranks, a one-process stage (``MULTI_RANK`` False) runs on rank 0;
    the others say so and return.
    """
    facts = sys.modules[run.__module__]
    stage = facts.STAGE
    from cai.distributed import env_from_slurm, telling_the_other_ranks  # here: reading the stage list loads no torch

    try:
        env_from_slurm()
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("RANK", "0")
        if world > 1 and rank != "0" and not facts.MULTI_RANK:
            print(f"cai {stage}: runs as one process, on rank 0 of {world}; rank {rank} has nothing to do "
                  f"(hydra.launcher.tasks_per_node=1 and nodes=1 submit it alone)", flush=True)
            return
        check_types(cfg)
        check_logger(cfg.get("logger"))
        if cfg.get("deterministic"):
            deterministic_kernels()
        # one holder per folder: rank 0 of a multi-process launch holds it (its other ranks write beside it, in the same run)
        other_rank = world > 1 and rank != "0"
        folder = stage_dir(cfg.run_dir, stage)
        with contextlib.nullcontext() if other_rank else hold_stage(folder), telling_the_other_ranks(folder):
            run(cfg, handle(run, cfg))
        _ranks_done()
    except (InputError, StageError) as e:  # StageBusy is a StageError
        fail_open_runs()
        raise SystemExit(f"cai {stage}: {e}") from None
    except Exception as e:
        if not disk_full(e):
            raise
        fail_open_runs()
        raise SystemExit(f"cai {stage}: no space left on the device ({first_line(e)}); the outputs completed before "
                         f"are intact: free some space and run the same command to go on") from None
    finally:
        _close_engines()
        _close_process_group()


def handle(run, cfg) -> StageRun:
    """The handle on its folder for the stage ``run`` is the function of, from the facts of its module (``STAGE``,
    ``HASH_KEYS``, ``MULTI_RANK``, ``SHARDED``); a multi-rank stage's process group is started here (``cai.distributed``,
    imported here so that reading the stage list loads no torch; a sharded stage in one process needs none). Only rank 0
    shows progress bars."""
    facts = sys.modules[run.__module__]
    rank, world = 0, None
    if facts.MULTI_RANK and (not facts.SHARDED or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        from cai import distributed

        rank, world = distributed.init_distributed()
        if rank != 0:
            cfg.progress = False  # one bar per stage, not one per rank over each other (progress is UNHASHED)
    return StageRun(facts.STAGE, cfg, facts.HASH_KEYS, rank, world, sharded=facts.SHARDED)


def deterministic_kernels() -> None:
    """Make CUDA runs repeat bit for bit: torch's deterministic kernels (where an op has none, torch warns and
    runs the usual one) and the fixed cuBLAS workspace they need, set before CUDA starts. GPU kernels that
    accumulate with atomics (attention backward, scatter-adds) otherwise round differently from run to run."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def run_app(main, who: str) -> None:
    """Call a ``hydra.main`` function (``who``: the name its messages start with). A bad command-line
    override (an unknown key, an unknown group option, a syntax error) ends in one line naming it and
    exit 1, like the stages' own input errors, instead of Hydra's several lines. Other errors keep their traceback.

    Run as ``python -m cai.<module>``, ``main`` is the ``__main__`` module's; the same function of the module imported
    under its own name is called instead, so a launcher that pickles it (hydra/launcher=submitit_*) pickles a reference
    its tasks import, not ``__main__``'s functions, which they cannot load ("Can't get attribute 'facts'")."""
    import importlib

    from hydra.errors import CompactHydraException

    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if main.__module__ == "__main__" and spec is not None and spec.name:
        main = getattr(importlib.import_module(spec.name), main.__name__)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its composition errors instead of printing them
    try:
        main()
    except CompactHydraException as e:
        raise SystemExit(f"{who}: {_one_line(e)}") from None
    facts = sys.modules.get(main.__module__)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and getattr(facts, "MULTI_RANK", False) and not getattr(facts, "SHARDED", True):
        _leave_without_finalizing()


def _leave_without_finalizing() -> None:
    """End a rank of a training stage's multi-process launch (torchrun, ``launcher=deepspeed``) whose command finished:
    flush what it printed and logged, then exit 0 without Python's finalization. A finished rank aborted on its way out
    ("terminate called without an active exception", SIGABRT) three times in fresh-clone CI, each a 2-rank sl_train run
    whose outputs were complete, and torchrun then reported the stage failed; it never repeated in 12 runs of that test
    here. The likely cause: DeepSpeed keeps its process groups in module globals (and ZeRO-3 in every parameter), so
    their gloo backends outlive ``destroy_process_group`` and are torn down during finalization. The generating stages
    (no DeepSpeed engine) keep Python's finalization: there vLLM's C++ destructors unlink a CPU tensor-parallel group's
    shared memory, which a skipped finalization left in /dev/shm for the next run to trip on. A command that fails ends
    as usual (its SystemExit passes by here); a submitit task never comes here."""
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _one_line(e: Exception) -> str:
    """A Hydra composition error in one line: its first line, its cause's and the options it lists, e.g.
    "Could not override 'sl_generate.num_promptz': Key 'num_promptz' is not in struct"."""
    def first(x) -> str:
        return first_line(x).rstrip(".")

    text = first(e) + (f": {first(e.__cause__)}" if e.__cause__ is not None else "")
    if getattr(e, "override", None):  # a syntax error: name the override it is in
        text = f"{e.override}: {text}"
    if getattr(e, "options", None):  # an unknown group option: say which exist
        text += f" (options: {', '.join(e.options)})"
    return text


def check_types(cfg) -> None:
    """Refuse a setting whose value is not of its default's type (``ai_feedback.num_prompts=abc``), naming
    the key. The defaults are the same primary config composed again with the run's config groups and none
    of its values. An integer must stay an integer, a float may be given as an integer, and null (as a
    default or a value) goes with anything; text takes any single value."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():  # called outside a Hydra app: nothing to compose the defaults from
        return
    hc = HydraConfig.get()
    groups = [f"{group}={choice}" for group, choice in hc.runtime.choices.items()
              if choice is not None and not group.startswith("hydra/")]
    defaults = compose(config_name=hc.job.config_name, overrides=groups)
    _check_like(OmegaConf.to_container(defaults, resolve=True), OmegaConf.to_container(cfg, resolve=True), "")


def _check_like(default: dict, given: dict, prefix: str) -> None:
    for key, value in given.items():
        if key not in default or default[key] is None or value is None:
            continue
        want = default[key]
        if isinstance(want, dict) and isinstance(value, dict):
            _check_like(want, value, f"{prefix}{key}.")
            continue
        if isinstance(want, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(want, int):
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(want, float):
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif isinstance(want, (list, dict)):
            ok, kind = isinstance(value, type(want)), "a list" if isinstance(want, list) else "a mapping"
        else:
            ok, kind = not isinstance(value, (list, dict)), "a single value"
        if not ok:
            raise StageInputError(f"{prefix}{key} must be {kind}, got {value!r}")


def _close_engines() -> None:
    """Shut the stage's vLLM engines down while the process group they set up still exists (their own clean-up at
    exit would find it gone and print a traceback after the stage has finished)."""
    if "cai.engines" in sys.modules:
        from cai.engines import close_all

        close_all()


def _ranks_done() -> None:
    """After a stage that finished on this rank, wait for every rank to finish before the group is shut down: a rank
    that tore its gloo group down while another was still completing a collective aborted that one on its way out
    (SIGABRT, "terminate called without an active exception"), seen twice in fresh-clone CI on 2-rank runs. A rank that
    failed skips this, so the others stop at their next collective instead of waiting here."""
    dist = _process_group()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def _close_process_group() -> None:
    """Shut a multi-process group down before the interpreter exits: a gloo group left open can abort a
    rank on its way out ("terminate called without an active exception") after the stage has finished."""
    dist = _process_group()
    if dist is not None:
        dist.destroy_process_group()


def _process_group():
    """``torch.distributed`` when this process has started a group (a stage that never imported it has none), else None."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist
    return None


def check_generation(gen, temperature: float | None = None) -> None:
    """Refuse bad ``generation.*`` values (``generate``'s own rules) before a stage touches its folder."""
    from cai.generation import check_sampling

    try:
        check_sampling(gen.batch_size, gen.max_new_tokens, gen.temperature if temperature is None else temperature, gen.top_p)
    except ValueError as e:
        raise StageInputError(str(e)) from None


def check_logger(logger) -> None:
    """Refuse an unknown ``logger.name`` or a missing TensorBoard/W&B package before a stage touches its folder."""
    if logger is None:
        return
    try:
        logger_backend(logger)
    except (ValueError, ImportError) as e:
        raise StageInputError(str(e)) from None

