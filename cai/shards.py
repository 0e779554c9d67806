"""Rows generated shard by shard, so that a killed run loses at most the shard it was working on (sl_generate,
ai_feedback).

In ``<stage>/shards/``, ``shard-KKKKK/`` holds shard K's rows (a ``datasets`` dataset, saved atomically; absent
when the shard produced none) and ``shard-KKKKK.json`` its record — the shard's line of ``metrics.jsonl`` —
written after the rows: a shard is finished exactly when its record exists. A rerun skips the finished shards
and first rebuilds ``metrics.jsonl`` from their records, so a kill between a record and its metrics line loses
no line, and no shard is logged twice.

On several ranks (``torchrun``, ``launcher=deepspeed``), rank r makes the shards K with K mod ranks = r
(``cai.distributed.mine``), each with its own engine. A vLLM model split over T ranks (``tensor_parallel_size`` T) is
one engine to a group of T ranks in a row (vLLM's own grouping): group g = r // T of G = ranks / T groups makes the
shards K with K mod G = g, every rank of it runs the shard (the group's first rank's prompts reach the engine:
``VLLMEngine``), and only the first saves it. A shard's rows depend on K alone (its prompts, and a seed derived from K),
so the ranks write exactly the rows one process would, and a rerun on any number of ranks picks up the unfinished
shards. Rank 0 writes ``metrics.jsonl`` (in shard order, once every shard is finished) and logs every shard's record. A
rank that has made its shards waits for the others' files (``cai.distributed.wait_for``), not in a collective, which
would time out on a long shard; a rank that fails says so in the stage's folder
(``cai.distributed.telling_the_other_ranks``), and the waiting ranks stop in one line.

    records = run_shards(out, shards, make_rows, features=..., stage=STAGE, progress=..., logger=cfg.logger,
                         rank=stage.rank, world=stage.world, group_size=tensor_parallel(specs))
    dataset = join_shards(out, records)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from cai.distributed import mine, wait_for
from cai.files import atomic_write_json, atomic_write_text, save_dataset
from cai.metrics import MetricsWriter


def run_shards(out: Path, shards: list[list], make_rows: Callable[[int, list], tuple[list[dict], dict]], *, features,
               stage: str, progress: bool, logger=None, rank: int = 0, world: int | None = None,
               group_size: int = 1) -> list[dict]:
    """Run ``make_rows(k, shard) -> (rows, figures)`` for every shard of this rank (``rank`` of ``world``; None: one
    process) not finished yet, saving its rows and then its record ``{"shard": k, "rows": len(rows), **figures,
    "seconds": ...}``; once every rank's shards are finished, returns every shard's record, in order. ``figures`` are
    the stage's own numbers for the shard (tokens/s, skipped pairs, ...). ``group_size``: how many ranks in a row make
    each shard together (``cai.engines.tensor_parallel``; it must divide ``world``), the first of them saving it."""
    world, main = world or 1, rank == 0
    group_size = group_size if world > 1 else 1  # one process runs a split model on its own (vLLM's workers)
    group, groups, saves = rank // group_size, world // group_size, rank % group_size == 0
    folder = out / "shards"
    records = _finished(folder, len(shards))
    if world > 1:  # every rank has read what was done before any makes a shard
        from cai import distributed

        distributed.barrier()
    if records and main:
        print(f"cai {stage}: resuming, {len(records)}/{len(shards)} shards already done")
    if main:
        _write_metrics(out, records)
    metrics = MetricsWriter(out, enabled=main, logger=logger, run_name=stage)
    todo = [k for k in range(len(shards)) if mine(k, group, groups) and k not in records]
    for k in tqdm(todo, desc=stage, unit="shard", disable=not progress):
        t0 = time.time()
        rows, figures = make_rows(k, shards[k])
        if not saves:  # the group's first rank saves what the group made
            continue
        if rows:  # datasets cannot reload an empty save: a shard without rows has its record alone
            from datasets import Dataset

            save_dataset(Dataset.from_list(rows, features=features), folder / _name(k))
        records[k] = {"time": round(time.time(), 3), "shard": k, "rows": len(rows), **figures,
                      "seconds": round(time.time() - t0, 3)}
        atomic_write_json(_record(folder, k), records[k])
        metrics.log(**_line(records[k]))
    if world > 1:  # the other ranks' shards, by their records
        wait_for([_record(folder, k) for k in range(len(shards))], out)
        others = _finished(folder, len(shards))
        for k in sorted(set(others) - set(records)):  # the other ranks' shards of this run, to the logger
            metrics.log(**_line(others[k]))
        records = others
    metrics.close()
    if main and world > 1:
        _write_metrics(out, records)  # shard order, as one process writes it
    return [records[k] for k in range(len(shards))]


def join_shards(out: Path, records: list[dict]):
    """The rows of every shard that has some, as one dataset in shard order (None when no shard has rows)."""
    from datasets import concatenate_datasets, load_from_disk

    parts = [load_from_disk(str(out / "shards" / _name(r["shard"]))) for r in records if r["rows"]]
    return concatenate_datasets(parts) if parts else None


def _name(k: int) -> str:
    return f"shard-{k:05d}"


def _record(folder: Path, k: int) -> Path:
    return folder / f"{_name(k)}.json"


def _finished(folder: Path, n: int) -> dict[int, dict]:
    """``{k: record}`` of the finished shards among the first ``n`` (a record in an older layout: the shard is redone)."""
    records = {k: json.loads(_record(folder, k).read_text()) for k in range(n) if _record(folder, k).exists()}
    return {k: r for k, r in records.items() if "rows" in r}


def _write_metrics(out: Path, records: dict[int, dict]) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(records[k]) + "\n" for k in sorted(records)))


def _line(record: dict) -> dict:
    """A record as ``MetricsWriter.log`` takes it (it stamps its own time)."""
    return {key: v for key, v in record.items() if key != "time"}
