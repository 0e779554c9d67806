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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny run of the whole pipeline, shared by the test modules (copy the stages you change).
    The pipeline's own output is kept beside it for the tests of the pipeline itself."""
    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    result = run_module("cai.pipeline", "debug=tiny", "progress=false", f"run_dir={run_dir}")
    (run_dir.parent / "pipeline.out").write_text(result.stdout)
    (run_dir.parent / "pipeline.err").write_text(result.stderr)
    (run_dir.parent / "pipeline.rc").write_text(str(result.returncode))
    for stage in ("sl_generate", "sl_train", "ai_feedback", "pm_pretrain", "pm_finetune", "ppo"):
        assert (run_dir / stage / "manifest.json").exists(), result.stdout[-2000:] + result.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="session")
def embedded_pm(tmp_path_factory) -> Path:
    """The embedded SmolLM2 as labeler (ai_feedback on 6 prompts), then pm_finetune on its labels mixed with
    human pairs, starting from the base model (no PMP); normalised on a two-row reference file."""
    import json

    run_dir = tmp_path_factory.mktemp("embedded-run")
    feedback = run_module("cai.stages.ai_feedback", f"run_dir={run_dir}", "progress=false", "ai_feedback.num_prompts=6",
                          "generation.max_new_tokens=24", "ai_feedback.few_shot=false")
    assert feedback.returncode == 0, feedback.stderr[-2000:]
    reference = run_dir / "reference.jsonl"
    reference.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                                 + "\n" for q, a in [("How do I boil an egg?", "Simmer it for about nine minutes."),
                                                     ("Name a prime number.", "Seven is prime.")]))
    result = run_module("cai.stages.pm_finetune", f"run_dir={run_dir}", "progress=false", "pm_finetune.micro_batch_size=2",
                        "pm_finetune.max_length=384", f"pm_finetune.reference={reference}", "pm_finetune.eval_fraction=0.34")
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir / "pm_finetune.stdout").write_text(result.stdout)
    return run_dir


def copy_stages(run_dir: Path, target: Path, stages) -> Path:
    import shutil

    for stage in stages:
        shutil.copytree(run_dir / stage, target / stage)
    return target


def kill_then_rerun(args: list[str], latest: Path, at_step: int, timeout: int = 300, after_kill=None):
    """Start ``args``, SIGKILL its process group once ``latest`` (a checkpoint's latest.json) names a step
    >= ``at_step``, call ``after_kill()`` (checks on what the kill left), then run the same command to the
    end; returns that rerun's CompletedProcess."""
    import json
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] >= at_step:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    if after_kill is not None:
        after_kill()
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


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


def assert_one_line_error(result, text: str) -> None:
    """A stage refused its input: exit 1 and ``text`` on the last line of stderr."""
    assert result.returncode == 1, result.stdout[-1000:] + result.stderr[-1000:]
    last = result.stderr.strip().splitlines()[-1]
    assert text in last, last


def outputs(run_dir: Path) -> dict:
    """``tree_bytes`` of a run directory without Hydra's own log folders (every run, even a refused one,
    writes its log there)."""
    return {k: v for k, v in tree_bytes(run_dir).items() if "/hydra/" not in k}


def tree_bytes(folder: Path) -> dict:
    """Every file below ``folder`` with its bytes: to prove a failed run left earlier outputs untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
