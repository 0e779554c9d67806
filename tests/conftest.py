"""Shared test fixtures. Tests build tiny models in-process; a few marked `slow` load the embedded
SmolLM2 model (converted once into the cache folder). Tests reading ../shared/data skip without it."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = {"path": "tiny-random", "dtype": "float32",  # as conf/model/tiny_random.yaml: the same numbers on every CPU
        "tiny": {"seed": 0, "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4}}

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach for a hub


def _share_the_cores() -> None:
    """Under pytest-xdist (``make test`` runs two workers) each worker, and every process it starts, gets its share of
    the cores for torch's and vLLM's thread pools: two workers whose pools each took every core would fight over them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // workers)
    index = int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw")) % workers
    mine = cores[index * share:(index + 1) * share] or cores[-share:]
    os.environ.setdefault("OMP_NUM_THREADS", str(len(mine)))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, mine)))


_share_the_cores()

# Each test module's seconds in `make test` (measured 2026-12 on 2 cores, -n 2: test_ppo.py's include building the tiny
# sweep and the embedded PM). pytest-xdist gives each worker whole modules (--dist loadfile); ``pytest_xdist_make_scheduler``
# below hands them out longest first, so no long module starts last while the other worker runs out of modules, and the
# first two (test_ppo.py, which builds the sweep, and test_vllm.py, which needs none) keep both workers busy while the
# sweep is built. Modules not listed follow, most tests first (xdist's own order). Only the order matters: re-measure
# when a module's time changes by a minute or more.
MODULE_SECONDS = {
    "test_ppo.py": 630, "test_vllm.py": 440, "test_pipeline.py": 145, "test_pm.py": 110, "test_sl_train.py": 100,
    "test_sl_generate.py": 100, "test_oracles.py": 85, "test_gpu_check.py": 75, "test_dpo.py": 65, "test_ai_feedback.py": 60,
    "test_slurm.py": 65, "test_config.py": 47, "test_rounds.py": 45, "test_stage_folder.py": 40, "test_bad_inputs.py": 30,
    "test_vllm_embedded.py": 25, "test_evaluate.py": 23, "test_logger.py": 11,
}


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the modules handed out longest first (``MODULE_SECONDS``); other modes as xdist has them."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFirst(LoadFileScheduling):
        def _assign_work_unit(self, node) -> None:
            # xdist takes the queue's first module: put the longest left there (ties keep xdist's order)
            longest = max(self.workqueue, key=lambda module: MODULE_SECONDS.get(Path(module).name, 0.0))
            self.workqueue.move_to_end(longest, last=False)
            super()._assign_work_unit(node)

    return LongestFirst(config, log)


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


TINY_SWEEP = ("debug=tiny", "progress=false", "ppo.algorithm=ppo,rloo,grpo,reinforce")


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Path:
    """One tiny 4-job sweep of the whole pipeline (``TINY_SWEEP``), shared by the test modules: its first
    job is ``tiny_run``. The pipeline's own output is kept beside it for the tests of the pipeline itself."""
    def build(root: Path) -> None:
        result = run_module("cai.pipeline", "-m", *TINY_SWEEP, f"run_dir={root / 'sweep'}")
        (root / "pipeline.out").write_text(result.stdout)
        (root / "pipeline.err").write_text(result.stderr)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    return built_once(tmp_path_factory, "tiny-sweep", build) / "sweep"


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder ``name``, filled by ``build(folder)`` once per test run: under pytest-xdist the workers
    share one folder (a file lock makes the others wait for the first), so a session fixture that many
    modules use is not built once per worker. Tests only read it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    folder = base / name
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".built").exists():
            if folder.exists():  # a worker's build that failed: start again
                import shutil

                shutil.rmtree(folder)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_run(tiny_sweep) -> Path:
    """The first job of ``tiny_sweep``: every stage on tiny models, ``ppo.algorithm=ppo`` (copy the stages
    you change; its stage folders are links into the sweep's shared folder)."""
    return sweep_jobs(tiny_sweep)[0]


def sweep_jobs(sweep: Path) -> list[Path]:
    """A sweep's job folders in the order Hydra ran them (its job number is in pipeline.json)."""
    import json

    jobs = [d for d in (sweep / "jobs").iterdir() if (d / "pipeline.json").exists()]
    return sorted(jobs, key=lambda d: json.loads((d / "pipeline.json").read_text())["job_num"])


@pytest.fixture(scope="session")
def embedded_pm(tmp_path_factory) -> Path:
    """The embedded SmolLM2 as labeler (ai_feedback on 6 prompts), then pm_finetune on its labels mixed with
    human pairs, starting from the base model (no PMP); normalised on a two-row reference file. The labeler runs in
    ``model.dtype=auto`` (bf16 on a CPU with bf16 instructions); pm_finetune in fp32, so its centring is checked to 1e-3
    (a bf16 score carries about 1e-2 of rounding)."""
    import json

    def build(run_dir: Path) -> None:
        feedback = run_module("cai.stages.ai_feedback", f"run_dir={run_dir}", "progress=false", "ai_feedback.num_prompts=6",
                              "generation.max_new_tokens=24", "ai_feedback.few_shot=false")
        assert feedback.returncode == 0, feedback.stderr[-2000:]
        reference = run_dir / "reference.jsonl"
        reference.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                                     + "\n" for q, a in [("How do I boil an egg?", "Simmer it for about nine minutes."),
                                                         ("Name a prime number.", "Seven is prime.")]))
        result = run_module("cai.stages.pm_finetune", f"run_dir={run_dir}", "progress=false", "model.dtype=float32",
                            "pm_finetune.micro_batch_size=2",
                            "pm_finetune.max_length=384", f"pm_finetune.reference={reference}", "pm_finetune.eval_fraction=0.34")
        assert result.returncode == 0, result.stderr[-2000:]
        (run_dir / "pm_finetune.stdout").write_text(result.stdout)

    return built_once(tmp_path_factory, "embedded-run", build)


@pytest.fixture
def process_group():
    """A process group of one in this (pytest) process, for DeepSpeed engines and multi-rank stages run in-process. It
    stays up (DeepSpeed caches its groups, so it cannot be torn down and made again), but the environment it set is
    restored after each test: stages started later as subprocesses must not inherit its RANK/WORLD_SIZE/MASTER_PORT,
    whose port this process holds."""
    from cai import distributed

    saved = dict(os.environ)
    distributed.init_distributed()
    yield
    os.environ.clear()
    os.environ.update(saved)


def vllm_and_transformers(spec: dict):
    """A module fixture's body: (vLLM engine in this process, transformers model, tokenizer) of one model spec, the
    same weights both ways (fp32 on the CPU, 1 GiB of KV cache, 2048 tokens); the engine is closed after the module.

    The engine's shutdown keeps a process group that was here before it (``VLLMEngine.close``), the ``process_group``
    fixture's of an earlier module in this worker: DeepSpeed keeps its groups, and a later module's training in this
    process would fail on them ("Group ... is not registered")."""
    from cai.engines import load_generator
    from cai.models import load_policy

    spec = {**spec, "device": "cpu", "dtype": "float32"}
    engine, tok = load_generator({**spec, "engine": "vllm", "vllm": {"cpu_kv_cache_gib": 1, "max_model_len": 2048}})
    model, _ = load_policy(spec)
    yield engine, model, tok
    engine.close()


def copy_stages(run_dir: Path, target: Path, stages) -> Path:
    import shutil

    for stage in stages:
        shutil.copytree(run_dir / stage, target / stage)
    return target


def kill_when(args: list[str], ready, timeout: int = 300, rank: int | None = None) -> None:
    """Start ``args`` and SIGKILL its process group as soon as ``ready()`` (polled every 10 ms) is true;
    fails when the command ended before that. With ``rank`` (``args`` a ``torchrun`` command): SIGKILL only that rank's
    process, and wait for torchrun to stop the others, as it does when one of its ranks dies."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():
                if rank is None:  # the command and its children: torchrun starts each rank in a session of its own
                    for child in _children(proc.pid):
                        os.kill(child, signal.SIGKILL)
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    os.kill(_rank_process(proc.pid, rank), signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=max(deadline - time.time(), 1))
    finally:
        if proc.poll() is None or rank is not None:  # nothing of it may outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0 if rank is not None else proc.returncode == -signal.SIGKILL, \
        "the run finished before it could be killed"


def _children(parent: int) -> list[int]:
    """The process ids of ``parent``'s children."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(stat.parent.name))
    return found


def _rank_process(parent: int, rank: int) -> int:
    """The process id of ``parent``'s child whose environment says ``RANK=rank`` (a torchrun worker)."""
    for child in _children(parent):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                return child
    raise AssertionError(f"no rank {rank} among the children of process {parent}")


def torchrun(*command: str, ranks: int = 2) -> list[str]:
    """The command that runs ``command`` (``-m module args``, or ``script.py args``) on ``ranks`` processes (torchrun;
    gloo on the CPU) on a free port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(ranks), "--master_port", str(port),
            *command]


def kill_then_rerun(args: list[str], latest: Path, at_step: int, timeout: int = 300, after_kill=None):
    """Start ``args``, SIGKILL its process group once ``latest`` (a checkpoint's latest.json) names a step
    >= ``at_step``, call ``after_kill()`` (checks on what the kill left), then run the same command to the
    end; returns that rerun's CompletedProcess."""
    import json
    import subprocess

    kill_when(args, lambda: latest.exists() and json.loads(latest.read_text())["step"] >= at_step, timeout)
    if after_kill is not None:
        after_kill()
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def file_stamps(folder: Path, pattern: str = "*") -> dict:
    """(inode, mtime_ns, bytes) of every file matching ``pattern`` below ``folder``: equal stamps mean
    the files were kept, not written again (even with the same bytes)."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob(pattern)) if p.is_file()}


def run_module(module: str, *args: str, cwd: Path | None = None, timeout: int = 600):
    """Run ``python -m module args`` in the project's interpreter; returns the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def run_command(module: str, *args: str):
    """``python -m module args`` run in this process (``runpy``: the module's own ``__main__`` block, so the code of its
    command, Hydra and ``run_app`` included), for a command that stops before it runs any stage (a refusal, or Hydra's
    ``--cfg``). Returns the code of the SystemExit it raised (a message: Python prints it as the last line of stderr and
    exits 1), or None when it returned. Not for a command that reaches ``run_stage``: its end shuts down this process's
    process group (tests use it for in-process stages, and it cannot be made again). What the command changes in
    ``sys.argv``, the environment (``run_app`` sets HYDRA_FULL_ERROR) and the root logger (a Hydra job's log handlers)
    is undone."""
    import logging
    import runpy
    import warnings

    saved_argv, saved_env = sys.argv, dict(os.environ)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    sys.argv = [module, *args]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" (the tests imported it)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
    return None


def command_refuses(module: str, *args: str) -> str:
    """The one-line message ``python -m module args`` stops with, run in this process (``run_command``)."""
    message = run_command(module, *args)
    assert isinstance(message, str) and "\n" not in message, message  # a string: printed to stderr, exit status 1
    return message


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
