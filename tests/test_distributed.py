"""The DeepSpeed layer: ZeRO block per world size, resumable checkpoints read with weights_only."""

from __future__ import annotations

import pickle

import pytest
import torch
from omegaconf import OmegaConf

from cai import distributed, training

ZERO2 = {"zero_optimization": {"stage": 2, "contiguous_gradients": True}}


def test_one_fp32_process_runs_zero_1_and_2_as_stage_0():
    assert distributed.zero_for_world(ZERO2, 1, torch.float32) == {"zero_optimization": {"stage": 0}}
    assert distributed.zero_for_world({"zero_optimization": {"stage": 1}}, 1, torch.float32)["zero_optimization"]["stage"] == 0


@pytest.mark.parametrize("zero, world, dtype", [
    (ZERO2, 2, torch.float32),                                                    # ranks to partition over
    (ZERO2, 1, torch.bfloat16),                                                   # DeepSpeed's bf16 optimizer
    ({"zero_optimization": {"stage": 3}}, 1, torch.float32),                      # ZeRO-3 as asked
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, 1, torch.float32),
])
def test_other_zero_blocks_are_kept(zero, world, dtype):
    assert distributed.zero_for_world(zero, world, dtype) == zero


def _engine(zero_file: str, seed: int = 0, compile: bool = False, dtype: str = "float32"):
    from cai.models import load_policy

    torch.manual_seed(seed)
    model, _ = load_policy({"path": "tiny-random", "device": "cpu", "dtype": dtype, "trust_remote_code": False})
    cfg = OmegaConf.create({"deepspeed": OmegaConf.load(f"conf/deepspeed/{zero_file}.yaml")})
    s = OmegaConf.create({"micro_batch_size": 2, "grad_accum": 1, "lr": 1e-2, "warmup_ratio": 0.0, "weight_decay": 0.0,
                          "grad_clip": 1.0, "compile": compile})
    return training.build_engine(model, cfg, s, total_steps=10)[0]


@pytest.mark.parametrize("compile", [False, True])
def test_compile_is_handed_to_the_engine(compile, process_group):
    """``compile: true`` (sl_train.compile) compiles the engine's module; compilation itself waits for the first
    forward, so nothing is compiled here (scripts/gpu_check.py measures what it gives on a GPU)."""
    assert _engine("zero0", compile=compile).is_compiled is compile


def _train_step(engine):
    ids = torch.arange(2 * 12).reshape(2, 12) % 100 + 5
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


def test_bf16_training_on_the_cpu_keeps_fp32_master_weights(process_group):
    """model.dtype=auto picks bf16 on a CPU with bf16 instructions: the engine then steps fp32 master weights and copies
    them into the bf16 model (an update of lr 1e-6 would vanish in bf16's 8-bit mantissa otherwise)."""
    engine = _engine("zero0", dtype="bfloat16")
    masters = [p for group in engine.optimizer.optimizer.param_groups for p in group["params"]]
    assert masters and {p.dtype for p in masters} == {torch.float32}
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    assert not engine.enable_backward_allreduce  # one rank: nothing to average
    def flat_masters():
        return torch.cat([p.detach().float().flatten() for g in engine.optimizer.optimizer.param_groups for p in g["params"]])

    before = flat_masters()
    _train_step(engine)
    after = flat_masters()
    assert not torch.equal(before, after)
    model = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])
    torch.testing.assert_close(model, after.to(torch.bfloat16).float(), rtol=0, atol=0)  # the model is the masters, rounded


@pytest.mark.parametrize("zero_file, stage", [("zero2", 0), ("zero3", 3)])
def test_checkpoint_round_trip_reads_weights_only(zero_file, stage, tmp_path, monkeypatch, process_group):
    monkeypatch.chdir(training.Path(__file__).resolve().parents[1])
    engine = _engine(zero_file)
    assert engine.zero_optimization_stage() == stage
    _train_step(engine)
    distributed.save_checkpoint(engine, tmp_path, 1, {"step": 1, "rng": distributed.rng_state()})

    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    real_load = torch.serialization.load
    fresh = _engine(zero_file, seed=1)
    state = distributed.load_latest_checkpoint(fresh, tmp_path)
    assert state["step"] == 1 and loads and all(w is True for w in loads)
    distributed.set_rng_state(state["rng"])
    with (torch.no_grad(), _gathered(engine, fresh)):
        for a, b in zip(engine.module.parameters(), fresh.module.parameters()):
            assert torch.equal(a, b)
    _train_step(fresh)  # the restored optimizer state steps


def _gathered(*engines):
    import contextlib

    import deepspeed

    stack = contextlib.ExitStack()
    for e in engines:
        if e.zero_optimization_stage() == 3:
            stack.enter_context(deepspeed.zero.GatheredParameters(list(e.module.parameters())))
    return stack


class _Payload:
    def __reduce__(self):
        return (print, ("the payload ran",))


def test_a_pickled_object_in_a_checkpoint_is_refused_not_run(tmp_path, capsys):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "extra": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        distributed.load_weights_only(str(path))
    assert "the payload ran" not in capsys.readouterr().out
