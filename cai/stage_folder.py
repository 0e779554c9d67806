"""A stage's folder, ``${run_dir}/<stage>/``, the only place a stage writes:

- ``manifest.json`` — resolved config, config hash, constitution hash, git SHA, the fingerprints of its inputs, counts,
  timings and ``status`` ("running", "complete" or "failed"). A stage is complete only when its manifest says so.
- ``metrics.jsonl`` (``cai.metrics``);
- its dataset (``save_to_disk``) or checkpoint (``save_pretrained``, safetensors), written atomically (``cai.files``).

``StageRun`` is a stage's one handle on its folder, from start to end (``cai.stages.run_stage`` makes it): whether a
finished run of the same config and inputs is already here (``done``), the running manifest (``started``), the
complete one (``complete``), and which model an upstream stage of the run saved (``upstream_model``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig

from cai import roles
from cai.errors import StageBusy, StageInputError
from cai.files import atomic_write_json, clear_leftovers, current_umask, json_default
from cai.lineage import MANIFEST, git_sha, input_fingerprint, input_stamps, read_manifest, resolved_config

# Keys that say *where* a run lives, not *what* it computes: left out of the config hash so a
# moved or copied run directory still recognises its finished stages.
_HASH_EXCLUDED_KEYS = ("run_dir",)


def stage_dir(run_dir: str | os.PathLike, stage: str) -> Path:
    """The one folder a stage may write to."""
    return Path(run_dir) / stage


@contextlib.contextmanager
def hold_stage(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder`` (a stage's) for the duration: an exclusive lock on ``folder/hydra/stage.lock`` (Hydra's own
    folder, which every invocation writes anyway), released when the holder ends, even by SIGKILL. Raises
    ``StageBusy`` naming the holder's process id when another process holds it. Once held, the hidden
    temporary files and folders a killed save left behind (``atomic_dir``, ``atomic_write_bytes``) are removed."""
    import fcntl

    lock = Path(folder) / "hydra" / "stage.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
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


def config_hash(cfg: DictConfig | dict, keys: tuple[str, ...] | None = None) -> str:
    """sha256 of the resolved config (minus location keys), stable across key order, and of the size and
    modification time of every local file, and every file inside every local folder, that a hashed value
    names (a prompt file, a dataset folder, a model folder): editing an input in place is a change too,
    so a stage and the pipeline both see it. The constitution is left to its own content hash.

    ``keys`` limits the hash to the top-level keys a stage actually reads, so e.g. a DeepSpeed
    setting does not invalidate a generation stage. A model role among them (``cai.roles``) counts as its
    resolved spec: the model it falls back to when unset, not the null keys the config holds.
    """
    config = resolved_config(cfg)
    data = {k: v for k, v in config.items() if k not in _HASH_EXCLUDED_KEYS and (keys is None or k in keys)}
    if "model" in config:  # (a hand-made config without models has no roles either)
        data.update({role: roles.identity(roles.spec(config, role)) for role in roles.ROLES if keys is None or role in keys})
    inputs = input_stamps({k: v for k, v in data.items() if k != "constitution"})
    blob = json.dumps([data, inputs] if inputs else data, sort_keys=True, default=json_default).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def round_dir(run_dir: str | os.PathLike, r: int) -> Path:
    """The folder of the pipeline's iterated round r: the run directory itself for round 1, ``round-<r>/`` in it after."""
    return Path(run_dir) if r == 1 else Path(run_dir) / f"round-{r}"


def round_folders(run_dir: str | os.PathLike) -> dict[int, Path]:
    """``{r: folder}`` of the pipeline's later iterated rounds found in ``run_dir`` (``round_dir``, r >= 2), by round."""
    found = [(int(m.group(1)), d) for d in Path(run_dir).glob("round-*") if (m := re.fullmatch(r"round-(\d+)", d.name))]
    return {r: d for r, d in sorted(found) if r >= 2}


def stage_summary(amount: str, headline: str, **metrics: Any) -> dict:
    """A complete stage's ``summary``, of one shape for every stage: how much it made (``"8 rows"``, ``"20 steps"``),
    its headline figure as short text, and its key metrics as numbers."""
    return {"amount": amount, "headline": headline, **metrics}


def is_complete(folder: str | os.PathLike) -> bool:
    """True when the stage folder's manifest says complete."""
    manifest = read_manifest(folder)
    return bool(manifest) and manifest.get("status") == "complete"


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


class StageRun:
    """A stage's run in its folder, from start to end: the one handle ``cai.stages.run_stage`` gives a stage's
    ``run(cfg, stage)``, so every stage starts, resumes and ends the same way::

        if stage.done("model", data_fingerprint=...):   # this config and these inputs already finished here
            return stage.out / "model"
        stage.started(counts=...)                        # the running manifest; stage.resume: go on from partial work
        ...                                              # the stage's own work
        stage.complete(stage_summary(...), ...)          # the complete manifest, written last

    A run's identity is its config hash (the stage's ``HASH_KEYS``) and the fingerprints of its inputs given to ``done``
    (the constitution hash, upstream models and datasets; all recorded in the manifest), and, for a multi-rank training
    stage, the number of ranks (its schedule and partitions depend on it; a ``sharded`` stage's outputs do not). Only
    the main rank (rank 0) writes the manifest.
    """

    def __init__(self, stage: str, cfg: DictConfig, hash_keys: tuple[str, ...] | None, rank: int = 0,
                 world: int | None = None, sharded: bool = False):
        self.name, self.cfg, self.hash_keys = stage, cfg, hash_keys
        self.out = stage_dir(cfg.run_dir, stage)
        self.rank, self.world = rank, world  # world: the ranks of a multi-rank stage; None for a one-process stage
        self.sharded = sharded  # its ranks split units of work that do not depend on their number (cai.stages: SHARDED)
        self.main = rank == 0
        self.resume = False  # the partial work in ``out`` is this config's and these inputs': go on from it
        self.inputs: dict[str, Any] = {}
        self.product: str | None = None
        self._fields: dict[str, Any] = {}
        self._counts: dict[str, Any] = {}
        self._start = time.time()

    def done(self, product: str, **inputs: Any) -> bool:
        """Whether a complete run of this config and these ``inputs`` (top-level manifest fields: ``constitution_hash``,
        ``*_fingerprint``s of what the stage reads) already made ``product`` (a file or folder in ``out``): then there
        is nothing to do, as said on stdout. Otherwise ``resume`` says whether the partial work there may be resumed
        (a manifest of the same config and inputs, and of the same number of ranks unless ``sharded``) or the stage
        starts over."""
        self.product, self.inputs = product, inputs
        previous = read_manifest(self.out)
        self.resume = (bool(previous) and previous.get("config_hash") == config_hash(self.cfg, self.hash_keys)
                       and all(previous.get(k) == v for k, v in inputs.items())
                       and (self.world is None or self.sharded or previous.get("counts", {}).get("world_size") == self.world))
        finished = self.resume and previous["status"] == "complete" and (self.out / product).exists()
        if finished and self.main:
            print(f"cai {self.name}: already complete in {self.out} (same config and inputs); nothing to do")
        return finished

    def started(self, counts: dict | None = None, fresh: tuple[str, ...] = (), **fields: Any) -> None:
        """The work begins: unless it resumes, the paths ``fresh`` names in ``out`` (another config's partial work:
        shards, replies, metrics) are removed; then the running manifest, with ``counts`` and ``fields`` (kept for the
        complete one). Every rank calls it, and none goes on before rank 0 has cleared the folder (another rank's first
        shard must not be removed as the previous config's) and the failures of an earlier run's ranks
        (``cai.distributed.telling_the_other_ranks``)."""
        self._counts, self._fields = dict(counts or {}), fields
        if self.main:
            from cai.distributed import FAILED

            for name in (FAILED, *(() if self.resume else fresh)):
                path = self.out / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            self._write("running", self._counts)
        if self.world is not None and self.world > 1:
            from cai import distributed

            distributed.barrier()

    def complete(self, summary: dict, counts: dict | None = None, **fields: Any) -> None:
        """The work is done: the complete manifest (``summary``: ``stage_summary``; ``counts`` replace the running
        manifest's; ``fields`` add to its), the total time, and one line on stdout saying what was made and where."""
        if not self.main:
            return
        self._write("complete", counts if counts is not None else self._counts, summary=summary,
                    timings={"total_s": round(time.time() - self._start, 2)}, **fields)
        made = self.out / self.product if self.product else self.out
        print(f"cai {self.name}: {summary['amount']}, {summary['headline']} -> {made}")

    def upstream(self, stage: str) -> Path:
        """The folder of ``stage`` in this run, refused in one line unless that stage is complete."""
        folder = stage_dir(self.cfg.run_dir, stage)
        manifest = read_manifest(folder)
        if manifest is None:
            raise StageInputError(f"{folder}: no {stage} here (no manifest.json); run that stage first")
        if manifest.get("status") != "complete":
            raise StageInputError(f"{folder}: the {stage} stage is not complete (status {manifest.get('status')!r}); "
                                  f"rerun it first")
        return folder

    def upstream_model(self, stage: str, role: str, required: bool = False) -> tuple[dict, str] | None:
        """The model ``stage`` saved in this run (``<stage>/model``), as ``role``'s spec at that folder (loaded with the
        role's device, dtype and trust_remote_code), and its fingerprint (that stage's lineage). None when the stage
        has no complete model here; with ``required``, that is refused in one line instead."""
        if required:  # complete, or refused in one line
            folder = self.upstream(stage)
            if not (folder / "model").is_dir():
                raise StageInputError(f"{folder}: the {stage} run is complete but holds no model/; rerun {stage}")
        else:
            folder = stage_dir(self.cfg.run_dir, stage)
            if not (is_complete(folder) and (folder / "model").is_dir()):
                return None
        return roles.spec(self.cfg, role, at=folder / "model"), input_fingerprint(folder)

    def role_model(self, role: str) -> tuple[dict, str]:
        """``role``'s own model, when no upstream stage's stands in for it, and its fingerprint."""
        model_spec = roles.spec(self.cfg, role)
        return model_spec, "role:" + roles.fingerprint(model_spec)

    def _write(self, status: str, counts: dict, **more: Any) -> None:
        fields = {**self._fields, **more}
        if clash := set(self.inputs) & set(fields):  # an input's fingerprint is given to done() only
            raise ValueError(f"{self.name}: {sorted(clash)} given to done() and again to started() or complete()")
        if self.world is not None:
            counts = {**counts, "world_size": self.world}
        write_manifest(self.out, stage=self.name, cfg=self.cfg, status=status, hash_keys=self.hash_keys, counts=counts,
                       **self.inputs, **fields)
