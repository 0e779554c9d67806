"""What a stage folder guarantees beyond atomic writes: one process at a time, leftovers of a killed save cleared,
and a full disk ending the stage in one line with the completed work kept and resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, assert_one_line_error, outputs, run_module
from datasets import load_from_disk

from cai.errors import StageBusy
from cai.lineage import read_manifest
from cai.stage_folder import hold_stage

TINY = ["debug=tiny", "progress=false"]


def test_a_held_folder_is_refused_naming_the_holder_then_free_again(tmp_path):
    with hold_stage(tmp_path / "sl_train"):
        with pytest.raises(StageBusy, match=f"{tmp_path / 'sl_train'} is in use by process {os.getpid()}"):
            with hold_stage(tmp_path / "sl_train"):
                pass
    with hold_stage(tmp_path / "sl_train"):  # released when its holder is done
        pass


def test_holding_a_folder_clears_what_a_killed_save_left(tmp_path):
    folder = tmp_path / "sl_train"
    (folder / ".model.k2j9.tmp").mkdir(parents=True)                  # atomic_dir's folder, half written
    (folder / ".model.k2j9.tmp" / "model.safetensors").write_bytes(b"half")
    (folder / "shards").mkdir()
    (folder / "shards" / ".shard-00003.json.x81.tmp").write_text("{")  # atomic_write_bytes' file
    (folder / ".model.old-4242").mkdir()                              # the version atomic_dir was replacing, and
    (folder / "manifest.json").write_text("{}")
    (folder / "shards" / "shard-00000.json").write_text("{}")
    (folder / "dataset").mkdir()                                       # ... replacing this one: kept
    (folder / ".dataset.old-4242").mkdir()
    (folder / ".model.old-4242" / "config.json").write_text("{}")     # killed between atomic_dir's two renames: put back
    (folder / ".tokenizer.old-7").mkdir()
    with hold_stage(folder):
        pass
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "hydra" not in p.parts) == \
        ["dataset", "manifest.json", "model", "model/config.json", "shards", "shards/shard-00000.json", "tokenizer"]


def test_a_second_command_on_the_same_stage_folder_is_refused(tmp_path):
    # the holder must still be running when the second command (about 6 s of imports) looks: all 100 red-team prompts
    # at 64 new tokens, work it does not finish (it is killed once the second is refused); with 24 prompts at 12 tokens
    # it once ended first, on a quiet machine in make test
    args = [sys.executable, "-m", "cai.stages.sl_generate", *TINY, f"run_dir={tmp_path}", "data.num_red_team=100",
            "generation.max_new_tokens=64", "sl_generate.shard_size=2"]
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    lock = tmp_path / "sl_generate" / "hydra" / "stage.lock"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
            time.sleep(0.05)
        assert lock.read_text().strip() == str(first.pid)
        second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert_one_line_error(second, f"cai sl_generate: {tmp_path / 'sl_generate'} is in use by process {first.pid}")
        assert first.poll() is None  # the holder goes on, untouched
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


@pytest.fixture
def small_disk(tmp_path):
    """A 160 KiB tmpfs at tmp_path/disk (mounting needs root, which CI has); unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_ends_the_stage_in_one_line_and_a_rerun_goes_on(small_disk):
    args = [*TINY, f"run_dir={small_disk / 'run'}", "data.num_red_team=8", "data.num_helpful=4", "n_revisions=1",
            "sl_generate.shard_size=1"]
    full = run_module("cai.stages.sl_generate", *args)
    assert_one_line_error(full, "no space left on the device")
    shards = small_disk / "run" / "sl_generate" / "shards"
    finished = sorted(shards.glob("shard-*.json"))
    assert 0 < len(finished) < 12 and read_manifest(shards.parent)["status"] == "running"
    for record in finished:  # every shard completed before the disk filled is whole and readable
        assert len(load_from_disk(str(record.with_suffix("")))) == 1
    assert not [p for p in shards.parent.rglob(".*") if p.name.endswith(".tmp")]  # nothing half-written left behind
    before = {k: v for k, v in outputs(small_disk / "run").items() if "/shards/" in k}

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    again = run_module("cai.stages.sl_generate", *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming, {len(finished)}/12 shards already done" in again.stdout
    after = outputs(small_disk / "run")
    assert {k: after[k] for k in before} == before  # the finished shards were kept, not redone
    assert len(load_from_disk(str(shards.parent / "dataset"))) == 12
