"""What a stage's output was made from: its manifest as read back, the stamps and fingerprints of the inputs it names,
its ``lineage`` (which a downstream stage records, so it reruns exactly when something upstream changed), and the
content hash of a folder (the constitution's)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cai.errors import ManifestError

MANIFEST = "manifest.json"


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def resolved_config(cfg: DictConfig | dict) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    return dict(cfg)


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
