"""Rows generated shard by shard, so that a killed run loses at most the shard it was working on (sl_generate,
ai_feedback).

In ``<stage>/shards/``, ``shard-KKKKK/`` holds shard K's rows (a ``datasets`` dataset, saved atomically; absent
when the shard produced none) and ``shard-KKKKK.json`` its record — the shard's line of ``metrics.jsonl`` —
written after the rows: a shard is finished exactly when its record exists. A rerun skips the finished shards
and first rebuilds ``metrics.jsonl`` from their records, so a kill between a record and its metrics line loses
no line, and no shard is logged twice.

    records = run_shards(out, shards, make_rows, features=..., stage=STAGE, progress=..., logger=cfg.logger)
    dataset = join_shards(out, records)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from cai.files import atomic_write_json, atomic_write_text, save_dataset
from cai.metrics import MetricsWriter


def run_shards(out: Path, shards: list[list], make_rows: Callable[[int, list], tuple[list[dict], dict]], *, features,
               stage: str, progress: bool, logger=None) -> list[dict]:
    """Run ``make_rows(k, shard) -> (rows, figures)`` for every shard not finished yet, saving its rows and then
    its record ``{"shard": k, "rows": len(rows), **figures, "seconds": ...}``; returns every shard's record, in
    order. ``figures`` are the stage's own numbers for the shard (tokens/s, skipped pairs, ...)."""
    folder = out / "shards"
    records = {k: json.loads(_record(folder, k).read_text()) for k in range(len(shards)) if _record(folder, k).exists()}
    records = {k: r for k, r in records.items() if "rows" in r}  # a record in an older layout: the shard is redone
    if records:
        print(f"cai {stage}: resuming, {len(records)}/{len(shards)} shards already done")
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(records[k]) + "\n" for k in sorted(records)))
    metrics = MetricsWriter(out, logger=logger, run_name=stage)
    for k, shard in enumerate(tqdm(shards, desc=stage, unit="shard", disable=not progress)):
        if k in records:
            continue
        t0 = time.time()
        rows, figures = make_rows(k, shard)
        if rows:  # datasets cannot reload an empty save: a shard without rows has its record alone
            from datasets import Dataset

            save_dataset(Dataset.from_list(rows, features=features), folder / _name(k))
        records[k] = {"time": round(time.time(), 3), "shard": k, "rows": len(rows), **figures,
                      "seconds": round(time.time() - t0, 3)}
        atomic_write_json(_record(folder, k), records[k])
        metrics.log(**{key: v for key, v in records[k].items() if key != "time"})
    metrics.close()
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
