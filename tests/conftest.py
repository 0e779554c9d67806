"""Shared test fixtures. Tests build tiny models in-process; a few marked `slow` load the embedded
SmolLM2 model (converted once into the cache folder). Tests reading ../shared/data skip without it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = {"path": "tiny-random", "tiny": {"seed": 0, "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4}}

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach for a hub


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


@pytest.fixture
def tiny_cfg() -> dict:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}


def run_module(module: str, *args: str, cwd: Path | None = None, timeout: int = 600):
    """Run ``python -m module args`` in the project's interpreter; returns the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def compose_cfg(name: str, overrides: list[str] | None = None):
    """The composed config of a primary config, as a stage would receive it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name=name, overrides=overrides or [])


def tree_bytes(folder: Path) -> dict:
    """Every file below ``folder`` with its bytes: to prove a failed run left earlier outputs untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
