"""cai.shards: the shard-and-resume loop of sl_generate and ai_feedback, on plain rows (no model)."""

from __future__ import annotations

import json

from datasets import Features, Value

from cai.metrics import read_metrics
from cai.shards import join_shards, run_shards

FEATURES = Features({"id": Value("string"), "n": Value("int64")})
SHARDS = [["a", "b"], [], ["c"]]  # the middle shard produces no rows


def _make(calls):
    def make_rows(k, shard):
        calls.append(k)
        return [{"id": x, "n": k} for x in shard], {"items": len(shard)}
    return make_rows


def test_rows_records_and_metrics_line_up(tmp_path):
    calls = []
    records = run_shards(tmp_path, SHARDS, _make(calls), features=FEATURES, stage="test", progress=False)
    assert calls == [0, 1, 2] and [r["rows"] for r in records] == [2, 0, 1]
    assert not (tmp_path / "shards" / "shard-00001").exists()  # no rows, no dataset: its record alone
    assert [m["shard"] for m in read_metrics(tmp_path)] == [0, 1, 2]
    assert [m["items"] for m in read_metrics(tmp_path)] == [2, 0, 1]
    assert join_shards(tmp_path, records).to_list() == [{"id": "a", "n": 0}, {"id": "b", "n": 0}, {"id": "c", "n": 2}]


def test_a_rerun_does_only_the_unfinished_shards_and_loses_no_metrics_line(tmp_path):
    run_shards(tmp_path, SHARDS, _make([]), features=FEATURES, stage="test", progress=False)
    shards = tmp_path / "shards"
    first = json.loads((shards / "shard-00000.json").read_text())
    # as if killed after shard 2's rows were saved but before its record, and (earlier) between shard 0's record
    # and its metrics line: shard 2 is redone, shard 0's line comes back from its record
    (shards / "shard-00002.json").unlink()
    (tmp_path / "metrics.jsonl").write_text("")
    calls = []
    records = run_shards(tmp_path, SHARDS, _make(calls), features=FEATURES, stage="test", progress=False)
    assert calls == [2]
    assert records[0] == first
    assert [m["shard"] for m in read_metrics(tmp_path)] == [0, 1, 2]
    assert len(join_shards(tmp_path, records)) == 3


def test_a_record_of_the_older_layout_is_redone(tmp_path):
    """Records written before the shared loop (ai_feedback's ``{"pairs", "skipped_identical"}``) do not count as done."""
    run_shards(tmp_path, SHARDS, _make([]), features=FEATURES, stage="test", progress=False)
    (tmp_path / "shards" / "shard-00001.json").write_text(json.dumps({"pairs": 0, "skipped_identical": 0}))
    calls = []
    run_shards(tmp_path, SHARDS, _make(calls), features=FEATURES, stage="test", progress=False)
    assert calls == [1]


def test_no_rows_at_all_joins_to_none(tmp_path):
    records = run_shards(tmp_path, [[], []], _make([]), features=FEATURES, stage="test", progress=False)
    assert join_shards(tmp_path, records) is None


def test_a_rank_that_fails_tells_the_ranks_waiting_for_its_work(tmp_path, monkeypatch):
    """Rank 1 of 2 fails: its first line is written to the stage's folder before it is raised, and a rank waiting for its
    shards (``wait_for``, polling the files) stops in one line naming it instead of waiting forever."""
    import pytest

    from cai.distributed import mine, telling_the_other_ranks, wait_for
    from cai.errors import StageError

    assert [k for k in range(5) if mine(k, 1, 2)] == [1, 3] and all(mine(k, 0, None) for k in range(3))
    done = tmp_path / "done"
    done.write_text("")
    wait_for([done], tmp_path)  # everything there: returns at once
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError), telling_the_other_ranks(tmp_path):
        raise ValueError("labeler.path='/x': model folder does not exist\nsecond line")
    with pytest.raises(StageError, match=r"^rank-1 failed \(labeler.path='/x': model folder does not exist\); this rank "
                                         r"stops too$"):
        wait_for([done, tmp_path / "never"], tmp_path)


def test_groups_of_ranks_make_each_shard_together_and_the_first_of_each_saves_it(tmp_path):
    """Four ranks in groups of two (a vLLM model split over two: ``group_size``), as four threads: group 0 (ranks 0 and 1)
    makes shards 0, 2, 4 and group 1 the others, every rank of a group running each of its shards; only ranks 0 and 2
    save, and every rank returns the records one process writes, with the same rows."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    shards = [["a"], ["b", "c"], [], ["d"], ["e"]]
    calls = {rank: [] for rank in range(4)}

    def rank_(rank):
        def make_rows(k, shard):  # the second rank of a group makes rows of its own, which must not be saved
            calls[rank].append(k)
            time.sleep(0.2 * (rank % 2))  # (and later than the first: a save of them would land last)
            return [{"id": x, "n": k + 100 * (rank % 2)} for x in shard], {"items": len(shard), "by": rank % 2}

        return run_shards(tmp_path / "ranks", shards, make_rows, features=FEATURES, stage="test", progress=False,
                          rank=rank, world=4, group_size=2)

    with ThreadPoolExecutor(4) as pool:
        returned = list(pool.map(rank_, range(4)))
    assert calls == {0: [0, 2, 4], 1: [0, 2, 4], 2: [1, 3], 3: [1, 3]}
    one = run_shards(tmp_path / "one", shards, lambda k, shard: ([{"id": x, "n": k} for x in shard],
                                                                  {"items": len(shard), "by": 0}),
                     features=FEATURES, stage="test", progress=False, group_size=2)
    drop = ("time", "seconds")
    assert all([{key: v for key, v in r.items() if key not in drop} for r in records]
               == [{key: v for key, v in r.items() if key not in drop} for r in one] for records in returned)
    assert join_shards(tmp_path / "ranks", returned[0]).to_list() == join_shards(tmp_path / "one", one).to_list()
    assert [m["shard"] for m in read_metrics(tmp_path / "ranks")] == [0, 1, 2, 3, 4]
