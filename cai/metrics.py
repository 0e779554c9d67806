"""A stage's ``metrics.jsonl``: one JSON object per line, appended and flushed as the stage goes, and mirrored to
TensorBoard or Weights & Biases with ``logger=tensorboard|wandb`` (``<stage>/tensorboard/``, ``<stage>/wandb/``).
metrics.jsonl stays the record the report reads."""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cai.files import json_default
from cai.lineage import read_manifest

METRICS = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and flushes each line.

    Lines are small and written with a single ``write`` on a file opened in append mode, so a crash
    loses at most the line being written; readers skip a torn last line (see ``read_metrics``).

    ``logger`` (the ``logger`` config group) mirrors each row's numbers to TensorBoard or Weights & Biases
    as well; metrics.jsonl stays the record the report reads. Call ``close()`` when the stage's loop ends.
    After a crash: TensorBoard's file is flushed row by row, like metrics.jsonl; W&B's own service process
    writes behind the stage and finishes an unclosed run itself when the process exits.
    """

    def __init__(self, folder: str | os.PathLike, enabled: bool = True, name: str = METRICS,
                 logger: DictConfig | dict | None = None, run_name: str | None = None):
        self.path = Path(folder) / name
        self.enabled = enabled
        self.mirror = None
        self.rows = 0  # rows in the file: the step of a row logged without a ``step`` (so a resume continues)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if logger is not None and logger_backend(logger) != "jsonl":
                steps = [row.get("step", i) for i, row in enumerate(read_metrics(folder, name))]
                self.rows = len(steps)
                self.mirror = _open_mirror(logger, Path(folder), run_name or Path(folder).name,
                                           next_step=max(steps, default=-1) + 1)

    def log(self, **values: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps({"time": round(time.time(), 3), **values}, default=json_default)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
        if self.mirror is not None:
            step = values.get("step", self.rows)
            # eval rows (split="eval") reuse the train rows' keys: their own section keeps the curves apart
            prefix = f"{values['split']}/" if isinstance(values.get("split"), str) else ""
            self.mirror.log({prefix + k: v for k, v in values.items() if k != "step" and _is_scalar(v)}, int(step))
            self.rows += 1

    def close(self) -> None:
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None


def read_metrics(folder: str | os.PathLike, name: str = METRICS) -> list[dict]:
    path = Path(folder) / name
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a killed process
    return rows


LOGGERS = {"jsonl": None, "tensorboard": "tensorboard", "wandb": "wandb"}  # logger.name -> the package it needs


def logger_backend(logger: DictConfig | dict) -> str:
    """``logger.name``, checked: a known backend whose package is installed (found, not imported)."""
    import importlib.util

    name = logger["name"]
    if name not in LOGGERS:
        raise ValueError(f"logger.name must be one of {', '.join(LOGGERS)}, got {name!r}")
    package = LOGGERS[name]
    if package and importlib.util.find_spec(package) is None:
        raise ImportError(f"logger.name={name} needs the {package} package: pip install 'cai[logging]'")
    return name


def _open_mirror(logger: DictConfig | dict, folder: Path, run_name: str, next_step: int):
    if logger["name"] == "tensorboard":
        return _TensorBoard(folder / "tensorboard", next_step)
    return _Wandb(logger, folder, run_name)


class _TensorBoard:
    """Event files in ``<stage>/tensorboard/``: ``tensorboard --logdir RUN_DIR`` shows each stage as a run."""

    def __init__(self, log_dir: Path, next_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the earlier events at steps this run is about to (re)write, as a
        # resume drops those rows from metrics.jsonl (and a fresh start, at step 0, hides all of them)
        self.writer = SummaryWriter(str(log_dir), purge_step=next_step)

    def log(self, scalars: dict, step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # readable now, and a crash loses no more than metrics.jsonl does

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """A W&B run named after the stage in ``<stage>/wandb/``, grouped by run directory (``logger.group``), with the
    stage's resolved config (from the manifest it wrote before logging) as the run's config. A stage that ends in a
    one-line error closes it with exit code 1 (``fail_open_runs``), so W&B does not record the failure as a success."""

    def __init__(self, logger: DictConfig | dict, folder: Path, run_name: str):
        import wandb

        manifest = read_manifest(folder) or {}
        self.run = wandb.init(
            project=logger["project"], entity=logger["entity"], mode=logger["mode"], name=run_name,
            group=logger["group"] or folder.absolute().parent.name, dir=str(folder), config=manifest.get("config"),
            # no console capture: W&B would wrap stdout/stderr (progress bars included) and copy them into the run
            settings=wandb.Settings(console="off", quiet=True),
        )

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # finish() returns before W&B's service has written the run's file; this waits for it


def fail_open_runs() -> None:
    """Finish a W&B run the failing stage left open, with exit code 1 (``run_stage`` calls this on a one-line error;
    W&B's own exit hook would record the SystemExit as a clean exit)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        with contextlib.suppress(Exception):  # the stage's own one-line error is what must reach the user
            wandb.run.finish(exit_code=1)
            wandb.teardown()


def _is_scalar(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
