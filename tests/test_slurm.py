"""Slurm through Hydra: hydra/launcher=submitit_slurm's tasks get torch's ranks from Slurm's variables
(cai.distributed.env_from_slurm), and submitit's local executor runs a training stage as a 2-task job on this machine,
and the pipeline as a 1-task job."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch
from conftest import run_module
from safetensors.torch import load_file

from cai import distributed
from cai.lineage import read_manifest
from cai.metrics import read_metrics

TORCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Task 9 of 16: the 2nd on the 2nd of 2 nodes of 8 GPUs
SLURM_TASK = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
              "SLURM_NODEID": "1", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
              "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
# The same conversation 8 times: a step of 2 ranks x 2 rows is then exactly the step of 1 rank x 4 rows
CHAT = [{"role": "user", "content": "How do I boil an egg?"}, {"role": "assistant", "content": "Simmer it for nine minutes."}]
ARGS = ["debug=tiny", "progress=false", "sl_train.epochs=1"]


@pytest.fixture
def slurm_env():
    """This process as task 9 of SLURM_TASK's job, without torch's variables; the environment is restored after."""
    saved = dict(os.environ)
    for key in TORCH_VARS:
        os.environ.pop(key, None)
    os.environ.update(SLURM_TASK)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def _torch_env() -> dict:
    return {k: os.environ[k] for k in TORCH_VARS if k in os.environ}


def test_a_slurm_task_gets_its_rank_and_every_task_the_same_master(slurm_env):
    distributed.env_from_slurm()
    env = _torch_env()
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "gpu07"}
    assert slurm_env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"  # each rank picks its GPU by LOCAL_RANK
    for key in TORCH_VARS:  # task 0, on the other node, computes the same address from the same job
        slurm_env.pop(key)
    slurm_env.update(SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0")
    distributed.env_from_slurm()
    assert (_torch_env()["MASTER_ADDR"], _torch_env()["MASTER_PORT"]) == (env["MASTER_ADDR"], env["MASTER_PORT"])


@pytest.mark.parametrize("case", ["launcher", "one task", "not submitit"])
def test_nothing_changes_under_another_launcher_in_a_one_task_job_or_outside_submitit(slurm_env, case):
    if case == "launcher":  # torchrun or deepspeed (launcher=deepspeed inside a Slurm job) set them already
        slurm_env.update(RANK="3", WORLD_SIZE="8")
    elif case == "one task":  # e.g. the pipeline's stages in a one-task job: a group of one on a free port
        slurm_env["SLURM_NTASKS"] = "1"
    else:
        del slurm_env["SUBMITIT_EXECUTOR"]
    before = _torch_env()
    distributed.env_from_slurm()
    assert _torch_env() == before


def test_a_one_process_stage_runs_on_rank_0_only(slurm_env, monkeypatch, tmp_path, capsys):
    """A stage with MULTI_RANK False (label_alignment) in a job of several tasks: rank 0 runs it, the others return."""
    from cai import stages

    module = types.ModuleType("one_process_stage")
    module.STAGE, module.MULTI_RANK = "one_process_stage", False
    monkeypatch.setitem(sys.modules, module.__name__, module)
    ran = []

    def run(cfg, stage):
        ran.append(stage)

    run.__module__ = module.__name__
    monkeypatch.setattr(stages, "_close_process_group", lambda: None)  # this process's group, if any, stays
    stages.run_stage(run, {"run_dir": str(tmp_path)})
    assert ran == [] and list(tmp_path.iterdir()) == []
    assert "runs as one process, on rank 0 of 16; rank 9 has nothing to do" in capsys.readouterr().out


def _submit(module: str, run_dir, *args: str):
    """``python -m module -m hydra/launcher=submitit_local args run_dir=...``; asserts it succeeded, with its tasks' logs."""
    result = run_module(module, "-m", "hydra/launcher=submitit_local", *args, f"run_dir={run_dir}")
    logs = "".join(p.read_text() for p in sorted((run_dir / "multirun" / ".submitit").glob("*/*_log.*")))
    assert result.returncode == 0, result.stderr[-3000:] + logs[-3000:]


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """sl_train as a 2-task job of submitit's local executor (hydra/launcher=submitit_local) on a tiny dataset; and the
    pipeline as a 1-task job, whose sl_train runs in one process on the same rows at twice the micro-batch."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("slurm")
    data = f"sl_train.dataset={root / 'data'}"
    Dataset.from_list([{"messages": CHAT}] * 8).save_to_disk(str(root / "data"))
    _submit("cai.stages.sl_train", root / "run", "hydra.launcher.tasks_per_node=2", *ARGS, data)
    _submit("cai.pipeline", root / "pipeline", "stages=[sl_train]", *ARGS, data, "sl_train.micro_batch_size=4")
    return root


def test_submitit_local_runs_a_two_task_training_stage_and_the_pipeline(two_tasks):
    """Both tasks train in one process group on the one run_dir: the stage completes with world_size 2, each task
    writes its own Hydra log, and its model is the one a single process trains on the same rows (its micro-batch the
    two ranks' together) — that one trained by the pipeline, whose task loads it by reference (cai.stages.run_app)."""
    out = two_tasks / "run" / "sl_train"
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["counts"]["world_size"] == 2
    assert manifest["counts"]["steps"] == 2  # 8 rows / (2 ranks x 2 rows)
    (job,) = (two_tasks / "run" / "multirun" / ".submitit").glob("[0-9]*")  # submitit's folder: one job, two tasks
    assert sorted(p.name.split("_")[1] for p in job.glob("*_result.pkl")) == ["0", "1"]
    logs = sorted(p.name for p in (two_tasks / "run" / "multirun" / "0").glob("*.log"))
    assert logs == ["sl_train.rank0.log", "sl_train.rank1.log"]  # the rank a task has before run_stage sets RANK

    (job,) = (two_tasks / "pipeline" / "jobs").iterdir()  # the sweep's one job
    assert [(r["stage"], r["status"]) for r in json.loads((job / "pipeline.json").read_text())["stages"]] == [("sl_train", "ran")]
    one = job / "sl_train"
    assert read_manifest(one)["counts"]["world_size"] == 1
    weights = [load_file(str(d / "model" / "model.safetensors")) for d in (one, out)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-6)
    losses = [[m["loss"] for m in read_metrics(d)] for d in (one, out)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5), json.dumps(losses)
