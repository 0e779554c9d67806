"""Pairs whose true label is length: hh-rlhf transcripts re-labelled so that ``chosen`` is the one whose final reply is
shorter, keeping only pairs where it is at most ``--ratio`` of the other's length (in characters), so the answer is
plain. ``label_alignment`` on them measures whether a labeler can tell the shorter reply at all::

    .venv/bin/python scripts/length_pairs.py ../shared/data/hh-rlhf/harmless-base-test-first300.jsonl /tmp/length.jsonl
    .venv/bin/python -m cai.stages.label_alignment pairs=/tmp/length.jsonl constitution.path=constitutions/brevity \\
        run_dir=runs/length

Prints how many pairs it kept; the figures in docs/stages.md ("Online DPO") come from here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cai.data import parse_hh_transcript


def length_pairs(rows: list[dict], ratio: float) -> list[dict]:
    """The rows (hh-rlhf ``chosen``/``rejected`` transcripts) whose two final replies differ enough in length, with
    ``chosen`` the transcript of the shorter reply."""
    kept = []
    for row in rows:
        replies = [parse_hh_transcript(row[k]) for k in ("chosen", "rejected")]
        if not all(r and r[-1]["role"] == "assistant" for r in replies):
            continue
        a, b = (len(r[-1]["content"].strip()) for r in replies)
        if min(a, b) == 0 or min(a, b) > ratio * max(a, b):
            continue
        shorter, longer = ("chosen", "rejected") if a < b else ("rejected", "chosen")
        kept.append({"chosen": row[shorter], "rejected": row[longer]})
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="hh-rlhf JSONL (chosen/rejected transcripts)")
    parser.add_argument("out", type=Path, help="where to write the length-labelled JSONL")
    parser.add_argument("--ratio", type=float, default=0.67, help="the shorter reply at most this share of the longer")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.source.read_text().splitlines() if line.strip()]
    kept = length_pairs(rows, args.ratio)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    print(f"{len(kept)} of {len(rows)} pairs kept (shorter reply at most {args.ratio} of the longer) -> {args.out}")


if __name__ == "__main__":
    main()
