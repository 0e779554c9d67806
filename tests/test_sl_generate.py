"""sl_generate end to end on a tiny model: rows, shards, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, compose_cfg, kill_when, outputs, torchrun, tree_bytes
from datasets import load_from_disk

from cai.constitution import load_constitution
from cai.errors import InputError, StageInputError
from cai.lineage import read_manifest
from cai.metrics import read_metrics
from cai.stages import handle
from cai.stages.sl_generate import run

TINY = ["debug=tiny", "progress=false"]


def test_rows_show_every_round(tmp_path):
    cfg = compose_cfg("sl_generate", [*TINY, f"run_dir={tmp_path}", "data.num_red_team=5", "data.num_helpful=3",
                                      "n_revisions=3", "sl_generate.shard_size=3"])
    path = generate(cfg)
    ds = load_from_disk(str(path))
    assert len(ds) == 8 and len(set(ds["id"])) == 8
    assert set(ds.column_names) >= {"prompt", "messages", "initial_response", "critiques", "revisions", "principle_ids", "kind"}
    ids = {p.id for p in load_constitution(ROOT / "constitutions" / "default").critique_revision}
    for row in ds:
        assert row["messages"][0] == {"role": "user", "content": row["prompt"]}
        assert row["messages"][-1]["role"] == "assistant"
        if row["kind"] == "red_team":
            assert len(row["critiques"]) == len(row["revisions"]) == len(row["principle_ids"]) == 3
            assert set(row["principle_ids"]) <= ids and len(set(row["principle_ids"])) == 3
            final = next((r for r in reversed(row["revisions"]) if r.strip()), row["initial_response"])
            assert row["messages"][-1]["content"] == final
        else:
            assert row["critiques"] == row["revisions"] == row["principle_ids"] == []
            assert row["messages"][-1]["content"] == row["initial_response"]
    manifest = read_manifest(tmp_path / "sl_generate")
    assert manifest["status"] == "complete" and manifest["counts"]["rows"] == 8 and manifest["counts"]["red_team"] == 5
    assert len(list((tmp_path / "sl_generate" / "shards").glob("shard-*.json"))) == 3  # one record per finished shard
    lines = [json.loads(x) for x in (tmp_path / "sl_generate" / "metrics.jsonl").read_text().splitlines()]
    assert [m["shard"] for m in lines] == [0, 1, 2] and all(m["tokens_per_s"] > 0 for m in lines)
    # same command again: nothing to do, same data
    assert load_from_disk(str(generate(cfg)))["id"] == ds["id"]


def test_helpful_prompts_sampled_n_times_at_their_own_temperature(tmp_path):
    """The CAI paper's helpful samples: 2 per prompt at T = 1, each a training row with its own id; the red-team rows
    are as before."""
    cfg = compose_cfg("sl_generate", [*TINY, f"run_dir={tmp_path}", "data.num_red_team=2", "data.num_helpful=3",
                                      "n_revisions=1", "sl_generate.helpful_samples=2", "sl_generate.helpful_temperature=1.0"])
    ds = load_from_disk(str(generate(cfg)))
    helpful = [row for row in ds if row["kind"] == "helpful"]
    assert len(ds) == 2 + 6 and len(set(ds["id"])) == 8 and len(helpful) == 6
    by_prompt = {}
    for row in helpful:
        by_prompt.setdefault(row["prompt"], []).append(row)
        assert row["messages"][-1]["content"] == row["initial_response"] and row["critiques"] == []
    assert sorted(len(rows) for rows in by_prompt.values()) == [2, 2, 2]
    ids = sorted(r["id"] for r in helpful)  # the first sample keeps the prompt's id, the second is "<id>:2"
    firsts = [i for i in ids if not i.endswith(":2")]
    assert len(firsts) == 3 and sorted(firsts + [f"{i}:2" for i in firsts]) == ids
    assert any(a["initial_response"] != b["initial_response"] for a, b in by_prompt.values())  # two samples, not one twice
    with pytest.raises(StageInputError, match="sl_generate.helpful_samples must be an integer >= 1, got 0"):
        generate(compose_cfg("sl_generate", [*TINY, f"run_dir={tmp_path / 'bad'}", "sl_generate.helpful_samples=0"]))


def test_principle_subset_and_zero_rounds(tmp_path):
    cfg = compose_cfg("sl_generate", [*TINY, f"run_dir={tmp_path}", "data.num_red_team=3", "data.num_helpful=0",
                                      "n_revisions=1", "sl_generate.principle_ids=[privacy]"])
    ds = load_from_disk(str(generate(cfg)))
    assert all(row["principle_ids"] == ["privacy"] for row in ds)
    cfg = compose_cfg("sl_generate", [*TINY, f"run_dir={tmp_path / 'zero'}", "data.num_red_team=2", "data.num_helpful=0", "n_revisions=0"])
    ds = load_from_disk(str(generate(cfg)))
    assert all(row["critiques"] == [] and row["messages"][-1]["content"] == row["initial_response"] for row in ds)


def test_user_prompt_file_and_hh_transcripts(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in [
        "How do I pick a lock?",
        "\n\nHuman: first question\n\nAssistant: an answer\n\nHuman: follow-up question\n\nAssistant: another",
    ]))
    base = [*TINY, "data.num_red_team=2", "data.num_helpful=0", "n_revisions=1", f"data.red_team_path={f}", "data.red_team_column=text"]
    ds = load_from_disk(str(generate(compose_cfg("sl_generate", [*base, f"run_dir={tmp_path / 'a'}"]))))
    prompts = sorted(ds["prompt"])
    assert prompts == ["How do I pick a lock?", "first question"]
    ds = load_from_disk(str(generate(compose_cfg("sl_generate", [*base, f"run_dir={tmp_path / 'b'}", "data.hh_context=dialogue"]))))
    row = next(r for r in ds if r["prompt"] == "follow-up question")
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user", "assistant"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished sl_generate run (2 red-team prompts, 1 helpful, 1 revision) for the bad inputs to find in place."""
    run_dir = tmp_path_factory.mktemp("finished")
    generate(compose_cfg("sl_generate", [*TINY, f"run_dir={run_dir}", *GOOD]))
    return run_dir


GOOD = ["data.num_red_team=2", "data.num_helpful=1", "n_revisions=1"]


@pytest.mark.parametrize("extra, message", [
    (["n_revisions=-1"], "n_revisions must be >= 0"),
    (["data.red_team_path=EMPTY"], "file is empty"),
    (["data.red_team_path=NOCOL"], "no column 'prompt' (columns: text)"),
    (["sl_generate.principle_ids=[no-such-principle]"], "no critique_revision principle 'no-such-principle'"),
    (["model.path=/does/not/exist"], "model.path='/does/not/exist': model folder does not exist"),
    (["data.num_red_team=500"], "asked for 500 red_team prompts"),
    (["generation.batch_size=0"], "generation.batch_size and generation.max_new_tokens must be >= 1"),
    (["sl_generate.principle_ids=[]"], "sl_generate.principle_ids is empty"),
])
def test_bad_input_is_one_line_and_leaves_outputs(finished, tmp_path, extra, message):
    """Run in this process, as run_stage runs it: the stage raises an InputError (run_stage's one line and exit 1,
    tests/test_bad_inputs.py) before it writes anything, on top of a finished run of good settings."""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "nocol.jsonl").write_text('{"text": "hi"}\n')
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = outputs(run_dir)
    extra = [e.replace("EMPTY", str(tmp_path / "empty.jsonl")).replace("NOCOL", str(tmp_path / "nocol.jsonl")) for e in extra]
    with pytest.raises(InputError) as bad:
        generate(compose_cfg("sl_generate", [*TINY, f"run_dir={run_dir}", *GOOD, *extra]))
    assert message in str(bad.value) and "\n" not in str(bad.value), str(bad.value)
    assert outputs(run_dir) == before


def test_a_rank_killed_then_a_rerun_on_one_process_loses_nothing_and_doubles_nothing(tmp_path):
    """Two ranks (torchrun) make the 20 shards between them, rank r the shards K with K mod 2 = r; one rank is
    SIGKILLed mid-stage (torchrun stops the other), and the same command on one process makes only the missing shards.
    The dataset is an uninterrupted one-process run's: a shard's rows depend on K alone, not on who made it."""
    settings = [*TINY, "data.num_red_team=24", "data.num_helpful=16", "n_revisions=1", "sl_generate.shard_size=2"]
    shards = tmp_path / "sl_generate" / "shards"

    def finished() -> list[int]:  # a shard is finished once its record is written, after its rows
        return sorted(int(p.stem.removeprefix("shard-")) for p in shards.glob("shard-*.json"))

    kill_when(torchrun("-m", "cai.stages.sl_generate", *settings, f"run_dir={tmp_path}"),
              lambda: len(finished()) >= 3 and {k % 2 for k in finished()} == {0, 1}, rank=1)
    done_before = len(finished())
    assert 3 <= done_before < 20 and read_manifest(tmp_path / "sl_generate")["status"] == "running"
    first_shard = tree_bytes(shards / "shard-00000")

    again = subprocess.run([sys.executable, "-m", "cai.stages.sl_generate", *settings, f"run_dir={tmp_path}"], cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"resuming, {done_before}/20 shards already done" in again.stdout
    assert tree_bytes(shards / "shard-00000") == first_shard  # finished shards are kept, not redone
    ds = load_from_disk(str(tmp_path / "sl_generate" / "dataset"))
    assert len(ds) == 40 and len(set(ds["id"])) == 40
    assert sorted(m["shard"] for m in read_metrics(tmp_path / "sl_generate")) == list(range(20))  # each shard logged once

    # an uninterrupted run on one process with the same seed gives the same rows
    clean = generate(compose_cfg("sl_generate", [*settings, f"run_dir={tmp_path / 'clean'}"]))
    assert load_from_disk(str(clean)).to_list() == ds.to_list()


@pytest.mark.slow
def test_embedded_model_critiques_and_revises(tmp_path):
    # float32: in bf16 the sampled texts depend on which bf16 kernels the CPU has (AMX, AVX512-BF16 or none), and on a
    # CPU with AMX the 135M model copied its critique into its revision in 5 or 6 of these 6 rows; in float32, as the
    # test was written, 4 of the 6 rows change every round there
    cfg = compose_cfg("sl_generate", [f"run_dir={tmp_path}", "data.num_red_team=6", "data.num_helpful=0", "n_revisions=2",
                                      "progress=false", "generation.max_new_tokens=48", "model.dtype=float32"])
    ds = load_from_disk(str(generate(cfg)))
    assert len(ds) == 6
    distinct = 0
    for row in ds:
        assert len(row["critiques"]) == 2 and len(row["revisions"]) == 2 and len(row["principle_ids"]) == 2
        texts = [row["initial_response"], row["critiques"][0], row["revisions"][0], row["critiques"][1], row["revisions"][1]]
        assert all(t.strip() for t in texts)
        assert len(set(texts)) > 1
        distinct += len(set(texts)) == 5
    # A 135M model sometimes loops and repeats itself; most rows must still change every round.
    assert distinct >= 4, f"only {distinct}/6 rows have five distinct texts"


def generate(cfg):
    """sl_generate in this process, as its command runs it (the stage's handle on its folder), without the one-line
    error handling, so a test sees the exception itself."""
    return run(cfg, handle(run, cfg))
