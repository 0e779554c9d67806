"""Run-directory conventions shared by every stage.

A stage writes only to ``${run_dir}/<stage>/``:

- ``manifest.json`` — resolved config, config hash, constitution hash, git SHA, counts, timings and
  ``status`` ("running", "complete" or "failed"). A stage is complete only when its manifest says so.
- ``metrics.jsonl`` — one JSON object per line, appended and flushed as the stage goes (and, with
  ``logger=tensorboard|wandb``, mirrored to ``tensorboard/`` or ``wandb/`` beside it).
- its dataset (``save_to_disk``) or checkpoint (``save_pretrained``, safetensors).

Every file write is atomic: written to a temporary name in the same folder, then renamed, so a crash
never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from cai.errors import ManifestError, StageBusy, StageInputError

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"

# Keys that say *where* a run lives, not *what* it computes: left out of the config hash so a
# moved or copied run directory still recognises its finished stages.
_HASH_EXCLUDED_KEYS = ("run_dir",)


def stage_dir(run_dir: str | os.PathLike, stage: str) -> Path:
    """The one folder a stage may write to."""
    return Path(run_dir) / stage


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` in one rename.

    A crash inside the block leaves ``final`` as it was (absent, or the previous complete version).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # mkdtemp makes 0700 and writers that stage files through mkstemp (safetensors via transformers) leave
    # them 0600: give the folder and its files the usual permissions
    tmp.chmod(0o777 & ~_umask())
    for path in tmp.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~_umask())
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def hold_stage(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder`` (a stage's) for the duration: an exclusive lock on ``folder/hydra/stage.lock`` (Hydra's own
    folder, which every invocation writes anyway), released when the holder ends, even by SIGKILL. Raises
    ``StageBusy`` naming the holder's process id when another process holds it. Once held, the hidden
    temporary files and folders a killed save left behind (``atomic_dir``, ``atomic_write_bytes``) are removed."""
    import fcntl

    lock = Path(folder) / "hydra" / "stage.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise StageBusy(f"{folder} is in use by process {holder}, started on the same folder earlier; "
                            f"wait for it to finish (or stop it), then run again") from None
        except OSError as e:  # a filesystem without flock (Lustre mounted without -o flock, some NFS)
            print(f"cai: warning: cannot lock {lock} ({e.strerror}); a second command on this folder will not be refused")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        clear_leftovers(folder)
        yield
    finally:
        os.close(fd)  # releases the lock


def clear_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Tidy what an interrupted atomic write leaves under ``folder``: ``.NAME.*.tmp`` files and folders are removed;
    a ``.NAME.old-PID`` folder (the previous version ``atomic_dir`` was replacing) is removed when ``NAME`` is there,
    and put back as ``NAME`` when the kill came between the two renames. Returns what was removed or put back.
    Only safe while the stage is held (``hold_stage``)."""
    tidied = []
    for path in sorted(Path(folder).rglob(".*"), key=lambda p: len(p.parts)):
        if not path.exists() or not (path.name.endswith(".tmp") or ".old-" in path.name):
            continue
        if ".old-" in path.name and not (original := path.with_name(path.name[1:path.name.index(".old-")])).exists():
            os.replace(path, original)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        tidied.append(path)
    return tidied


def disk_full(e: BaseException) -> bool:
    """Whether ``e``, or an exception it was raised from, says the disk (or the quota) is full."""
    import errno

    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):  # pyarrow and torch name it in their own exception types
            return True
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return False


def save_dataset(dataset, path: str | os.PathLike) -> Path:
    """``dataset.save_to_disk`` into ``path`` atomically."""
    import datasets

    datasets.disable_progress_bars()  # a bar per small shard is noise; stages show their own progress
    with atomic_dir(path) as tmp:
        dataset.save_to_disk(str(tmp))
    return Path(path)


def resolved_config(cfg: DictConfig | dict) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    return dict(cfg)


def config_hash(cfg: DictConfig | dict, keys: tuple[str, ...] | None = None) -> str:
    """sha256 of the resolved config (minus location keys), stable across key order, and of the size and
    modification time of every local file, and every file inside every local folder, that a hashed value
    names (a prompt file, a dataset folder, a model folder): editing an input in place is a change too,
    so a stage and the pipeline both see it. The constitution is left to its own content hash.

    ``keys`` limits the hash to the top-level keys a stage actually reads, so e.g. a DeepSpeed
    setting does not invalidate a generation stage. A model role among them (``cai.roles``) counts as its
    resolved spec: the model it falls back to when unset, not the null keys the config holds.
    """
    from cai import roles

    config = resolved_config(cfg)
    data = {k: v for k, v in config.items() if k not in _HASH_EXCLUDED_KEYS and (keys is None or k in keys)}
    if "model" in config:  # (a hand-made config without models has no roles either)
        data.update({role: roles.identity(roles.spec(config, role)) for role in roles.ROLES if keys is None or role in keys})
    inputs = input_stamps({k: v for k, v in data.items() if k != "constitution"})
    blob = json.dumps([data, inputs] if inputs else data, sort_keys=True, default=_json_default).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def input_stamps(value: Any) -> dict[str, list[int]]:
    """{path: [size, mtime_ns]} for every existing local file named by a string in ``value`` (nested dicts
    and lists), and for every file inside a named folder. Names that are not local paths (hub ids,
    ``embedded``) contribute nothing."""
    stamps: dict[str, list[int]] = {}
    if isinstance(value, dict):
        for v in value.values():
            stamps.update(input_stamps(v))
    elif isinstance(value, list):
        for v in value:
            stamps.update(input_stamps(v))
    elif isinstance(value, str) and value and len(value) < 4096:
        path = Path(value).expanduser()
        with contextlib.suppress(OSError):
            files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else []
            for f in files:
                st = f.stat()
                stamps[str(f)] = [st.st_size, st.st_mtime_ns]
    return stamps


def tree_hash(folder: str | os.PathLike) -> str:
    """sha256 over every file below ``folder`` (relative path and content), in sorted order."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        rel = p.relative_to(folder).as_posix()
        if any(part.startswith(".") or part == "__pycache__" for part in Path(rel).parts):
            continue
        h.update(rel.encode("utf-8") + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def git_sha() -> str | None:
    """The SHA of the cai checkout this code runs from (``-dirty`` when it has local changes)."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def safe_name(text: str) -> str:
    """``text`` as a file or folder name: letters, digits, "-", "_" and "." kept, anything else "_"."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def first_line(e: BaseException) -> str:
    """An exception as one line for a one-line error message: its message's first line, or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def upstream_complete(folder: str | os.PathLike, what: str) -> None:
    """Refuse to read an upstream stage folder whose manifest does not say complete."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise StageInputError(f"{folder}: no {what} here (no manifest.json); run that stage first")
    if manifest.get("status") != "complete":
        raise StageInputError(f"{folder}: the {what} stage is not complete (status {manifest.get('status')!r}); rerun it first")


def stage_summary(amount: str, headline: str, **metrics: Any) -> dict:
    """A complete stage's ``summary``, of one shape for every stage: how much it made (``"8 rows"``, ``"20 steps"``),
    its headline figure as short text, and its key metrics as numbers."""
    return {"amount": amount, "headline": headline, **metrics}


def previous_run(out: str | os.PathLike, *, stage: str, config_hash: str, inputs: dict, product: str,
                 world_size: int | None = None, announce: bool = True) -> tuple[bool, bool]:
    """Reuse, resume or start over: ``(same, done)`` for the stage folder ``out``. ``same``: its manifest was written
    with this config hash, these ``inputs`` (top-level manifest fields: the constitution hash, upstream
    fingerprints) and, for a training stage, this many ranks (its schedule and partitions depend on them), so
    the partial work there may be resumed; otherwise the stage starts over. ``done``: that run also finished —
    status complete and its ``product`` (a file or folder in ``out``) there — so there is nothing to do, which is
    said on stdout when ``announce``."""
    out = Path(out)
    previous = read_manifest(out)
    same = (bool(previous) and previous.get("config_hash") == config_hash and all(previous.get(k) == v for k, v in inputs.items())
            and (world_size is None or previous.get("counts", {}).get("world_size") == world_size))
    done = same and previous["status"] == "complete" and (out / product).exists()
    if done and announce:
        print(f"cai {stage}: already complete in {out} (same config and inputs); nothing to do")
    return same, done


def input_fingerprint(path: str | os.PathLike) -> str:
    """What an input named by a path was made from — the one fingerprint stages record of their inputs. A stage
    folder, or an output inside one (``R/sl_train/model``, ``R/sl_generate/dataset``): that stage's ``lineage``,
    which changes exactly when the stage reran on other settings or inputs. Any other local file or folder: its
    files' relative paths, sizes and modification times (the rule ``config_hash`` applies to the paths it covers).
    Not a local path (a hub id, a dataset name): ``name:<path>``."""
    local = Path(path).expanduser()
    for folder in (local, local.parent):
        if (folder / MANIFEST).is_file():
            return lineage(read_manifest(folder))
    if local.exists():  # input_stamps' sizes and times, by path relative to the input: a copied run keeps them
        stamps = {Path(f).relative_to(local).as_posix(): v for f, v in input_stamps(str(local)).items()}
        return "files:" + hashlib.sha256(json.dumps(stamps, sort_keys=True).encode("utf-8")).hexdigest()
    return f"name:{path}"


def lineage(manifest: dict | None) -> str | None:
    """What a stage's output was made from: a hash of its config hash, constitution hash and every
    ``*_fingerprint`` it recorded of its own inputs. A downstream stage that records this reruns when
    anything upstream of it changed."""
    if not manifest:
        return None
    parts = {k: v for k, v in manifest.items() if k in ("config_hash", "constitution_hash") or k.endswith("_fingerprint")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def is_complete(folder: str | os.PathLike, expected_config_hash: str | None = None) -> bool:
    """True when the stage folder's manifest says complete (and, if given, with that config hash)."""
    manifest = read_manifest(folder)
    if not manifest or manifest.get("status") != "complete":
        return False
    return expected_config_hash is None or manifest.get("config_hash") == expected_config_hash


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def write_manifest(
    folder: str | os.PathLike,
    *,
    stage: str,
    cfg: DictConfig | dict,
    status: str,
    constitution_hash: str | None = None,
    counts: dict | None = None,
    timings: dict | None = None,
    hash_keys: tuple[str, ...] | None = None,
    summary: dict | None = None,
    models: dict[str, dict | None] | None = None,
    **extra: Any,
) -> dict:
    """Write ``manifest.json`` atomically and return what was written (``hash_keys``: see config_hash). A complete
    stage gives its ``summary`` (``stage_summary``), which the pipeline's table and the report read.

    ``roles`` records the model behind each role the stage hashes (``cai.roles.describe``); ``models`` corrects it
    with what the stage really loaded: ``{role: spec}`` for a role played by another model (ppo's policy is
    sl_train's output), ``{role: None}`` for a role the run did not use (ppo's labeler under reward=pm)."""
    if status not in ("running", "complete", "failed"):
        raise ValueError(f"manifest status must be running|complete|failed, got {status!r}")
    if status == "complete" and not {"amount", "headline"} <= set(summary or {}):
        raise ValueError("a complete stage's manifest needs a summary with 'amount' and 'headline' (stage_summary)")
    from cai import roles

    config = resolved_config(cfg)
    # the models this stage read: the roles among its hash keys (or every one, for a stage that hashes everything)
    read = ([r for r in roles.ROLES if hash_keys is None or r in hash_keys] or ["model"]) if "model" in config else []
    used = {r: roles.spec(config, r) for r in read}
    used.update(models or {})
    used = {r: spec for r, spec in used.items() if spec is not None}
    manifest = {
        "stage": stage,
        "status": status,
        "config_hash": config_hash(cfg, hash_keys),
        "constitution_hash": constitution_hash,
        "git_sha": git_sha(),
        "counts": counts or {},
        "timings": timings or {},
        "resources": {"peak_rss_mb": peak_rss_mb()},
        "summary": summary or {},
        # model code from the hub runs only when the config turned this on; said here, not only in the config
        "trust_remote_code": any(bool(spec.get("trust_remote_code")) for spec in used.values()),
        "roles": {r: roles.describe(spec) for r, spec in used.items() if r != "model"},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
        "config": config,
    }
    atomic_write_json(Path(folder) / MANIFEST, manifest)
    return manifest


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
        line = json.dumps({"time": round(time.time(), 3), **values}, default=_json_default)
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


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
