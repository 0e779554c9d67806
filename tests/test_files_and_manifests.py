"""Atomic writes (cai.files), manifests and config hashes (cai.lineage, cai.stage_folder), metrics (cai.metrics)."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, load_from_disk
from omegaconf import OmegaConf

from cai.errors import StageInputError
from cai.files import atomic_dir, atomic_write_json, save_dataset
from cai.lineage import input_fingerprint, lineage, read_manifest, tree_hash
from cai.metrics import MetricsWriter, read_metrics
from cai.stage_folder import StageRun, config_hash, is_complete, stage_summary, write_manifest


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert (tmp_path / "a.json").stat().st_mode & 0o044  # readable by others, like any file (mkstemp makes 0600)


def test_atomic_dir_keeps_previous_version_on_crash(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text("half")
            raise RuntimeError("killed")
    assert (target / "f").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)


def test_atomic_dir_gives_files_the_usual_permissions(tmp_path):
    """A file staged through mkstemp (0600, as transformers writes model.safetensors) ends up readable like any other."""
    import os
    import tempfile

    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            fd, name = tempfile.mkstemp(dir=tmp)
            os.close(fd)
            os.replace(name, tmp / "model.safetensors")
            (tmp / "sub").mkdir()
            (tmp / "sub" / "x").write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model" / "sub" / "x").stat().st_mode & 0o777 == 0o644


def test_save_dataset_round_trips(tmp_path):
    ds = Dataset.from_list([{"prompt": "p", "messages": [{"role": "user", "content": "p"}]}])
    save_dataset(ds, tmp_path / "data")
    assert load_from_disk(str(tmp_path / "data"))[0]["messages"] == [{"role": "user", "content": "p"}]


def test_config_hash_ignores_location_and_order():
    a = OmegaConf.create({"run_dir": "r1", "seed": 0, "model": {"path": "x", "dtype": "auto"}})
    b = OmegaConf.create({"model": {"dtype": "auto", "path": "x"}, "seed": 0, "run_dir": "elsewhere"})
    c = OmegaConf.create({"run_dir": "r1", "seed": 1, "model": {"path": "x", "dtype": "auto"}})
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_manifest_records_status_and_config(tmp_path):
    cfg = OmegaConf.create({"run_dir": str(tmp_path), "seed": 3, "x": "${seed}"})
    write_manifest(tmp_path, stage="s", cfg=cfg, status="running", counts={"rows": 0})
    assert not is_complete(tmp_path)
    done = stage_summary("4 rows", "final loss 0.5", final_loss=0.5)
    m = write_manifest(tmp_path, stage="s", cfg=cfg, status="complete", counts={"rows": 4}, timings={"total_s": 1.5}, summary=done)
    assert is_complete(tmp_path) and m["config_hash"] == read_manifest(tmp_path)["config_hash"]
    saved = read_manifest(tmp_path)
    assert saved["config"]["x"] == 3 and saved["counts"] == {"rows": 4} and "git_sha" in saved
    assert saved["resources"]["peak_rss_mb"] > 10 and saved["trust_remote_code"] is False  # a Python process with torch
    cfg.model = {"path": "x", "trust_remote_code": True}
    assert write_manifest(tmp_path, stage="s", cfg=cfg, status="complete", summary=done)["trust_remote_code"] is True
    with pytest.raises(ValueError):
        write_manifest(tmp_path, stage="s", cfg=cfg, status="done")
    # every complete stage gives a summary of one shape: what the pipeline's table and the report read
    assert saved["summary"] == {"amount": "4 rows", "headline": "final loss 0.5", "final_loss": 0.5}
    with pytest.raises(ValueError, match="summary with 'amount' and 'headline'"):
        write_manifest(tmp_path, stage="s", cfg=cfg, status="complete")


def test_metrics_skip_a_torn_last_line(tmp_path):
    w = MetricsWriter(tmp_path)
    w.log(step=1, loss=0.5)
    w.log(step=2, loss=0.25)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_tree_hash_follows_content(tmp_path):
    (tmp_path / "a.j2").write_text("x")
    h = tree_hash(tmp_path)
    (tmp_path / "a.j2").write_text("y")
    assert tree_hash(tmp_path) != h


def test_an_input_is_fingerprinted_by_the_stage_that_made_it_or_by_its_files(tmp_path):
    stage = tmp_path / "run" / "sl_generate"
    cfg = OmegaConf.create({"seed": 1})
    manifest = write_manifest(stage, stage="sl_generate", cfg=cfg, status="running")
    (stage / "dataset").mkdir()
    # a stage folder and anything inside it: that stage's lineage, whatever the files' times
    assert input_fingerprint(stage) == input_fingerprint(stage / "dataset") == lineage(manifest)
    own = tmp_path / "pairs.jsonl"
    own.write_text('{"a": 1}\n')
    first = input_fingerprint(own)
    assert first.startswith("files:") and input_fingerprint(own) == first
    own.write_text('{"a": 22}\n')  # edited
    assert input_fingerprint(own) != first
    assert input_fingerprint("org/some-dataset") == "name:org/some-dataset"  # not a local path: a hub name


def test_a_stage_run_starts_resumes_and_completes_through_its_handle(tmp_path, capsys):
    """The life every stage shares (``StageRun``): nothing done yet; a running manifest with its inputs; resumed by the
    same config and inputs (its partial work kept), started over by other inputs (the paths named fresh removed); and,
    once complete, done for the same config and inputs, with the ranks of a multi-rank stage part of its identity."""
    cfg = OmegaConf.create({"run_dir": str(tmp_path), "seed": 0, "x": {"steps": 2}})
    first = StageRun("x", cfg, ("seed", "x"), world=2)
    assert not first.done("model", data_fingerprint="d1") and not first.resume
    first.started(counts={"rows": 4}, fresh=("shards",), note="kept")
    (first.out / "shards").mkdir()
    running = read_manifest(first.out)
    assert running["status"] == "running" and running["data_fingerprint"] == "d1" and running["note"] == "kept"
    assert running["counts"] == {"rows": 4, "world_size": 2}

    again = StageRun("x", cfg, ("seed", "x"), world=2)
    assert not again.done("model", data_fingerprint="d1") and again.resume  # same config and inputs: go on
    again.started(counts={"rows": 4}, fresh=("shards",))
    assert (again.out / "shards").is_dir()
    other = StageRun("x", cfg, ("seed", "x"), world=2)
    assert not other.done("model", data_fingerprint="d2") and not other.resume  # other inputs: start over
    with pytest.raises(ValueError, match="given to done"):  # an input is stated once, to done()
        other.started(data_fingerprint="d3")
    other.started(counts={"rows": 4}, fresh=("shards",))
    assert not (other.out / "shards").exists()

    (other.out / "model").mkdir()
    other.complete(stage_summary("2 steps", "final loss 0.5"), counts={"steps": 2}, final_loss=0.5)
    done = read_manifest(other.out)
    assert done["status"] == "complete" and done["counts"] == {"steps": 2, "world_size": 2} and done["final_loss"] == 0.5
    assert done["data_fingerprint"] == "d2" and done["timings"]["total_s"] >= 0
    assert f"cai x: 2 steps, final loss 0.5 -> {other.out / 'model'}" in capsys.readouterr().out
    assert StageRun("x", cfg, ("seed", "x"), world=2).done("model", data_fingerprint="d2")
    assert not StageRun("x", cfg, ("seed", "x"), world=1).done("model", data_fingerprint="d2")  # other ranks
    assert not StageRun("x", cfg, ("seed", "x"), world=2).done("model", data_fingerprint="d1")
    # another rank writes nothing
    StageRun("x", cfg, ("seed", "x"), rank=1, world=2).complete(stage_summary("0 steps", "none"))
    assert read_manifest(other.out)["summary"]["amount"] == "2 steps"


def test_a_stage_run_finds_upstream_models(tmp_path):
    """``upstream_model``: a complete upstream stage's model as the role's spec at that folder, fingerprinted by the
    stage's lineage; None while the stage is missing or unfinished, refused in one line when required."""
    cfg = OmegaConf.create({"run_dir": str(tmp_path), "seed": 0, "model": {"path": "tiny-random", "dtype": "float32"},
                            "policy": None, "sl_start": None})
    stage = StageRun("ppo", cfg, ("seed",))
    assert stage.upstream_model("sl_train", "sl_start") is None
    with pytest.raises(StageInputError, match="no sl_train here"):
        stage.upstream_model("sl_train", "sl_start", required=True)
    upstream = StageRun("sl_train", cfg, ("seed",))
    upstream.done("model")
    upstream.started()
    (upstream.out / "model").mkdir(parents=True)
    assert stage.upstream_model("sl_train", "sl_start") is None  # still running
    with pytest.raises(StageInputError, match="not complete"):
        stage.upstream_model("sl_train", "sl_start", required=True)
    upstream.complete(stage_summary("1 step", "done"))
    spec, fingerprint = stage.upstream_model("sl_train", "sl_start")
    assert spec["path"] == str(upstream.out / "model") and spec["dtype"] == "float32"
    assert fingerprint == input_fingerprint(upstream.out / "model")
    base, role_fingerprint = stage.role_model("policy")
    assert base["path"] == "tiny-random" and role_fingerprint.startswith("role:")
