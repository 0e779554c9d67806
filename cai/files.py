"""Atomic writes: every file and folder a stage writes is written to a hidden temporary name in the same folder, then
renamed, so a crash or a kill never leaves a half-written file under its final name (``clear_leftovers`` tidies
the temporary names a killed write left behind)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
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
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


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
    tmp.chmod(0o777 & ~current_umask())
    for path in tmp.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~current_umask())
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def save_dataset(dataset, path: str | os.PathLike) -> Path:
    """``dataset.save_to_disk`` into ``path`` atomically."""
    import datasets

    datasets.disable_progress_bars()  # a bar per small shard is noise; stages show their own progress
    with atomic_dir(path) as tmp:
        dataset.save_to_disk(str(tmp))
    return Path(path)


def safe_name(text: str) -> str:
    """``text`` as a file or folder name: letters, digits, "-", "_" and "." kept, anything else "_"."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
