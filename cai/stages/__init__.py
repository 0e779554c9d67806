"""One file per stage; each is a Hydra app (``python -m cai.stages.<stage> key=value ...``) that reads
its upstream stage's folder in ``run_dir`` and writes only its own (see ``cai.runio``)."""

from pathlib import Path

# The repository's conf/ folder, as an absolute path so every entry point (stages, pipeline) finds it.
CONFIG_PATH = str(Path(__file__).resolve().parents[2] / "conf")


def run_stage(stage: str, fn, cfg) -> None:
    """Run a stage body; turn the expected kinds of bad input into one-line errors and exit 1.

    Anything else is a bug and keeps its traceback.
    """
    from cai.constitution import ConstitutionError
    from cai.data import DataError
    from cai.feedback import LabelerError
    from cai.models import ModelLoadError

    try:
        check_logger(cfg.get("logger"))
        fn(cfg)
    except (ConstitutionError, DataError, LabelerError, ModelLoadError, StageInputError, StageError) as e:
        raise SystemExit(f"cai {stage}: {e}") from None
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Shut a multi-process group down before the interpreter exits: a gloo group left open can abort a
    rank on its way out ("terminate called without an active exception") after the stage has finished."""
    import sys

    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def check_generation(gen, temperature: float | None = None) -> None:
    """Refuse bad ``generation.*`` values (``generate``'s own rules) before a stage touches its folder."""
    from cai.generation import check_sampling

    try:
        check_sampling(gen.batch_size, gen.max_new_tokens, gen.temperature if temperature is None else temperature, gen.top_p)
    except ValueError as e:
        raise StageInputError(str(e)) from None


def check_logger(logger) -> None:
    """Refuse an unknown ``logger.name`` or a missing TensorBoard/W&B package before a stage touches its folder."""
    from cai.runio import logger_backend

    if logger is None:
        return
    try:
        logger_backend(logger)
    except (ValueError, ImportError) as e:
        raise StageInputError(str(e)) from None


class StageInputError(ValueError):
    """A bad config value or a missing/incomplete upstream stage; the message names the key or folder."""


class StageError(RuntimeError):
    """A stage had to stop (e.g. a non-finite loss); the message says where and what survives."""
