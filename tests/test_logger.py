"""The ``logger=`` group: metrics.jsonl always, each row's numbers mirrored to TensorBoard or W&B (offline)."""

from __future__ import annotations

import json
import struct

import pytest
from conftest import assert_one_line_error, compose_cfg, outputs, run_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cai.metrics import MetricsWriter, read_metrics
from cai.stage_folder import config_hash

TENSORBOARD = {"name": "tensorboard"}
WANDB = {"name": "wandb", "project": "cai-tests", "entity": None, "mode": "offline", "group": None}


def _log_two_steps_and_eval(metrics: MetricsWriter) -> None:
    metrics.log(step=1, epoch=0, loss=0.75, lr=1e-3, note="text is skipped", finished=True)
    metrics.log(step=2, epoch=0, loss=0.5, lr=5e-4)
    metrics.log(step=2, epoch=0, split="eval", loss=0.625, accuracy=0.5)
    metrics.close()


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_jsonl_logger_writes_only_metrics_jsonl(tmp_path):
    _log_two_steps_and_eval(MetricsWriter(tmp_path, logger={"name": "jsonl"}, run_name="sl_train"))
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert len(read_metrics(tmp_path)) == 3


def test_tensorboard_mirrors_numbers_at_their_step(tmp_path):
    _log_two_steps_and_eval(MetricsWriter(tmp_path, logger=TENSORBOARD, run_name="sl_train"))
    rows = read_metrics(tmp_path)
    assert [r.get("note") for r in rows] == ["text is skipped", None, None]  # metrics.jsonl keeps everything
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(1, 0.75), (2, 0.5)]
    assert scalars["eval/loss"] == [(2, 0.625)] and scalars["eval/accuracy"] == [(2, 0.5)]
    assert [s for s, _ in scalars["lr"]] == [1, 2] and scalars["lr"][0][1] == pytest.approx(1e-3)
    # text, booleans and the step itself are not plotted
    assert set(scalars) == {"loss", "lr", "epoch", "eval/loss", "eval/accuracy", "eval/epoch"}


def test_tensorboard_rows_without_a_step_use_their_line_number_across_a_resume(tmp_path):
    metrics = MetricsWriter(tmp_path, logger=TENSORBOARD)
    metrics.log(shard=0, rows=4)
    metrics.log(shard=1, rows=3)
    metrics.close()
    metrics = MetricsWriter(tmp_path, logger=TENSORBOARD)  # a resumed generation stage
    metrics.log(shard=2, rows=2)
    metrics.close()
    assert _scalars(tmp_path / "tensorboard")["rows"] == [(0, 4), (1, 3), (2, 2)]


def test_tensorboard_hides_the_steps_a_resume_redoes(tmp_path):
    metrics = MetricsWriter(tmp_path, logger=TENSORBOARD)
    for step in (1, 2, 3, 4):
        metrics.log(step=step, loss=1.0 / step)
    metrics.close()
    # resumed from the checkpoint at step 2: training drops the later rows, then redoes them
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_metrics(tmp_path)[:2]))
    metrics = MetricsWriter(tmp_path, logger=TENSORBOARD)
    metrics.log(step=3, loss=0.25)
    metrics.close()
    assert _scalars(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_other_ranks_write_nothing(tmp_path):
    MetricsWriter(tmp_path / "ppo", enabled=False, logger=TENSORBOARD).log(step=1, loss=1.0)
    assert not (tmp_path / "ppo").exists()


def test_wandb_offline_run_in_the_stage_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # offline needs no login
    monkeypatch.delenv("WANDB_MODE", raising=False)
    folder = tmp_path / "pm_pretrain"
    _log_two_steps_and_eval(MetricsWriter(folder, logger=WANDB, run_name="pm_pretrain"))
    assert len(read_metrics(folder)) == 3
    [run] = (folder / "wandb").glob("offline-run-*")
    [records] = run.glob("run-*.wandb")
    records = _wandb_records(records)
    [info] = [r.run for r in records if r.HasField("run")]
    assert (info.display_name, info.run_group, info.project) == ("pm_pretrain", tmp_path.name, "cai-tests")
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.HasField("history")]
    assert [(h["_step"], h["loss"]) for h in history] == [(1, 0.75), (2, 0.5)]
    assert history[1]["eval/accuracy"] == 0.5 and "note" not in history[0] and "finished" not in history[0]
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [0]


def test_wandb_run_carries_the_stage_config_and_a_failure_exit_code(tmp_path, monkeypatch):
    """The run's config is the stage's resolved config (from the manifest the stage wrote first); a stage that ends in
    a one-line error (``run_stage`` calls ``fail_open_runs``) is recorded with exit code 1, not 0."""
    from cai.metrics import fail_open_runs
    from cai.stage_folder import write_manifest

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    folder = tmp_path / "ppo"
    write_manifest(folder, stage="ppo", cfg=compose_cfg("ppo", ["debug=tiny"]), status="running")
    metrics = MetricsWriter(folder, logger=WANDB, run_name="ppo")
    metrics.log(step=1, score=0.5)
    fail_open_runs()  # what a stage error does: the writer is never closed
    [run] = (folder / "wandb").glob("offline-run-*")
    [records] = run.glob("run-*.wandb")
    records = _wandb_records(records)
    config = {i.key: json.loads(i.value_json) for r in records if r.HasField("run") for i in r.run.config.update}
    assert config["ppo"]["kl_coef"] == 0.05 and config["model"]["path"] == "tiny-random"
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [1]


def test_unknown_logger_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"logger.name must be one of jsonl, tensorboard, wandb, got 'mlflow'"):
        MetricsWriter(tmp_path, logger={"name": "mlflow"})
    result = run_module("cai.stages.pm_pretrain", f"run_dir={tmp_path}", "debug=tiny", "logger.name=mlflow")
    assert_one_line_error(result, "cai pm_pretrain: logger.name must be one of jsonl, tensorboard, wandb, got 'mlflow'")
    assert outputs(tmp_path) == {}  # refused before the stage touched its folder


def test_missing_package_names_the_key_and_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ImportError) as error:
        MetricsWriter(tmp_path, logger=WANDB)
    assert str(error.value) == "logger.name=wandb needs the wandb package: pip install 'cai[logging]'"


def test_the_logger_is_not_part_of_any_stage_hash():
    """Switching loggers never reruns a finished stage."""
    import importlib

    for stage in ("sl_generate", "sl_train", "ai_feedback", "pm_pretrain", "pm_finetune", "ppo"):
        keys = importlib.import_module(f"cai.stages.{stage}").HASH_KEYS
        hashes = {config_hash(compose_cfg(stage, [f"logger={name}"]), keys) for name in ("jsonl", "tensorboard", "wandb")}
        assert len(hashes) == 1, stage


def test_pm_pretrain_end_to_end_with_tensorboard(tmp_path, process_group):
    """pm_pretrain in this process (as run_stage runs it) with logger=tensorboard."""
    from cai.stages import handle
    from cai.stages.pm_pretrain import run

    cfg = compose_cfg("pm_pretrain", [f"run_dir={tmp_path}", "debug=tiny", "progress=false", "pm_pretrain.epochs=1",
                                      "logger=tensorboard"])
    run(cfg, handle(run, cfg))
    rows = read_metrics(tmp_path / "pm_pretrain")
    train = [(r["step"], r["loss"]) for r in rows if "split" not in r]
    evals = [(r["step"], r["accuracy"]) for r in rows if r.get("split") == "eval"]
    scalars = _scalars(tmp_path / "pm_pretrain" / "tensorboard")
    # (TensorBoard keeps float32)
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in scalars["loss"]] == train and train
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in scalars["eval/accuracy"]] == evals and evals


def _wandb_records(path) -> list:
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then LevelDB-style log records (crc32c,
    length, type; FULL=1 or FIRST/MIDDLE/LAST=2/3/4) in 32 KiB blocks whose last < 7 bytes are padding."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk, records = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return records
