"""Atomic writes (cai.files), manifests and config hashes (cai.lineage, cai.stage_folder), metrics (cai.metrics)."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, load_from_disk
from omegaconf import OmegaConf

from cai.files import atomic_dir, atomic_write_json, save_dataset
from cai.lineage import input_fingerprint, lineage, read_manifest, tree_hash
from cai.metrics import MetricsWriter, read_metrics
from cai.stage_folder import config_hash, is_complete, stage_summary, write_manifest


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
    assert is_complete(tmp_path) and is_complete(tmp_path, m["config_hash"]) and not is_complete(tmp_path, "other")
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
