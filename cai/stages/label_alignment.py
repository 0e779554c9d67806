"""Labeler alignment: how often the AI labeler agrees with human-labeled pairs, and how biased it is.

    python -m cai.stages.label_alignment pairs=FILE.jsonl run_dir=R

``pairs`` is a JSONL file in either format:
- hh-rlhf: ``chosen``/``rejected`` transcripts ("\\n\\nHuman: … \\n\\nAssistant: …"; the human preferred
  ``chosen``). Their shared turns are the context; each transcript's last assistant turn is its response.
- cai's ai_feedback output: ``prompt`` (chat), ``chosen``/``rejected`` (one assistant turn each).

The labeler (``model``) judges every pair exactly as ``ai_feedback`` does (same principles, both orders,
``ai_feedback.n_principles``/``cot``/``few_shot``). Rows it cannot use — a transcript with no Assistant
turn, two identical responses, differing contexts — are skipped and counted.

Writes ``${run_dir}/label_alignment/metrics.json`` (and ``manifest.json``) with
- ``alignment``: share of pairs where the labeler's swap-averaged P(human's choice) > 0.5 (ties count ½);
- ``mean_confidence``: mean of max(p, 1 − p);
- ``position_bias_rate``: share of single-order judgements in which the option shown first wins;
- ``flip_rate``: share of (pair, principle) judgements whose winner changes when the order is swapped;
- ``single_order_alignment``: agreement from the (A)=chosen order alone, to show what swapping buys;
- ``n``, ``skipped``, and ``per_principle`` breakdowns; and prints them as a table.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cai.constitution import load_constitution, resolve_constitution_dir
from cai.data import DataError, parse_hh_transcript
from cai.feedback import Pair, judge_pairs
from cai.runio import atomic_write_json, stage_dir, write_manifest
from cai.stages import CONFIG_PATH, StageInputError, run_stage

STAGE = "label_alignment"


def run(cfg: DictConfig) -> dict:
    start = time.time()
    s = cfg.ai_feedback  # the labeler is configured once, for ai_feedback and for this check
    if not cfg.pairs:
        raise StageInputError("pairs= is required: a JSONL file of human-labeled pairs (hh-rlhf or ai_feedback format)")
    if s.n_principles < 1:
        raise StageInputError(f"ai_feedback.n_principles must be >= 1, got {s.n_principles}")

    # Step 1: read the pairs (response_a = the human's choice) and the constitution.
    pairs, skipped = read_human_pairs(Path(cfg.pairs), cfg.limit)
    if not pairs:
        raise DataError(f"{cfg.pairs}: no usable pairs ({', '.join(f'{k}: {v}' for k, v in skipped.items()) or 'empty file'})")
    constitution = load_constitution(resolve_constitution_dir(cfg.constitution.path))
    principles = constitution.select("comparison", s.principle_ids, "ai_feedback.principle_ids")

    # Step 2: judge every pair (both orders, sampled principles).
    from cai.models import load_policy

    model, tok = load_policy(cfg.model)
    judgements = judge_pairs(model, tok, constitution, pairs, n_principles=s.n_principles, seed=cfg.seed, cot=s.cot,
                             cot_clamp=s.cot_clamp, few_shot=s.few_shot, max_new_tokens=cfg.generation.max_new_tokens,
                             batch_size=cfg.generation.batch_size, progress=cfg.progress, principles=principles)

    # Step 3: the report.
    metrics = alignment_metrics(judgements)
    metrics.update(n=len(pairs), skipped=skipped, pairs_file=str(cfg.pairs), model=str(cfg.model.path),
                   n_principles=s.n_principles, cot=bool(s.cot), seconds=round(time.time() - start, 1))
    out = stage_dir(cfg.run_dir, STAGE)
    atomic_write_json(out / "metrics.json", metrics)
    write_manifest(out, stage=STAGE, cfg=cfg, status="complete", constitution_hash=constitution.hash,
                   counts={"pairs": len(pairs), **{f"skipped_{k}": v for k, v in skipped.items()}},
                   timings={"total_s": metrics["seconds"]})
    print(format_table(metrics))
    print(f"cai {STAGE}: metrics -> {out / 'metrics.json'}")
    return metrics


def read_human_pairs(path: Path, limit: int | None = None) -> tuple[list[Pair], dict]:
    """Pairs with ``response_a`` = the human's choice, and counts of skipped rows by reason."""
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    pairs, skipped = [], defaultdict(int)
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
            raise DataError(f"{path}:{n}: needs 'chosen' and 'rejected' (hh-rlhf transcripts or ai_feedback rows)")
        if isinstance(row["chosen"], str) != isinstance(row["rejected"], str):
            raise DataError(f"{path}:{n}: 'chosen' and 'rejected' must both be transcripts or both be chats")
        if isinstance(row["chosen"], str):
            context, chosen, rejected, reason = _split_transcripts(row["chosen"], row["rejected"])
        else:
            context, chosen, rejected, reason = _split_conversational(row, path, n)
        if reason:
            skipped[reason] += 1
            continue
        pairs.append(Pair(f"{path.name}:{n}", context, chosen, rejected))
        if limit and len(pairs) >= limit:
            break
    return pairs, dict(skipped)


def _split_transcripts(chosen: str, rejected: str):
    a, b = parse_hh_transcript(chosen), parse_hh_transcript(rejected)
    if not a or not b or a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
        return None, None, None, "no_assistant_turn"
    if a[:-1] != b[:-1]:
        return None, None, None, "different_contexts"
    if not a[:-1] or a[-2]["role"] != "user":
        return None, None, None, "no_human_turn"
    if a[-1]["content"].strip() == b[-1]["content"].strip():
        return None, None, None, "identical_responses"
    return a[:-1], a[-1]["content"], b[-1]["content"], None


def _split_conversational(row: dict, path: Path, n: int):
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if not isinstance(prompt, list) or not isinstance(chosen, list) or not isinstance(rejected, list):
        raise DataError(f"{path}:{n}: conversational rows need list-valued 'prompt', 'chosen' and 'rejected'")
    if not chosen or not rejected or chosen[-1].get("role") != "assistant" or rejected[-1].get("role") != "assistant":
        return None, None, None, "no_assistant_turn"
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        return None, None, None, "identical_responses"
    return prompt, chosen[-1]["content"], rejected[-1]["content"], None


def alignment_metrics(judgements) -> dict:
    """Agreement and bias figures from judgements whose response_a is the human's choice."""
    def agree(p: float) -> float:
        return 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0

    def summarise(js) -> dict:
        singles = [(ab, ba) for j in js for ab, ba in zip(j.p_order_ab, j.p_order_ba)]
        first_wins = [ab > 0.5 for ab, _ in singles] + [ba < 0.5 for _, ba in singles]  # (A) won in each order
        return {
            "alignment": _mean([agree(j.p_a) for j in js]),
            "mean_confidence": _mean([max(j.p_a, 1 - j.p_a) for j in js]),
            "position_bias_rate": _mean(first_wins),
            "flip_rate": _mean([(ab > 0.5) != (ba > 0.5) for ab, ba in singles]),
            "single_order_alignment": _mean([agree(ab) for ab, _ in singles]),
            "judgements": len(singles),
        }

    metrics = summarise(judgements)
    by_principle = defaultdict(list)
    for j in judgements:
        for pid, ab, ba in zip(j.principle_ids, j.p_order_ab, j.p_order_ba):
            by_principle[pid].append(type(j)((ab + ba) / 2, [ab], [ba], [pid]))
    metrics["per_principle"] = {pid: summarise(js) for pid, js in sorted(by_principle.items())}
    return metrics


def format_table(metrics: dict) -> str:
    head = f"{'principle':<28} {'n':>5} {'align':>6} {'conf':>6} {'pos.bias':>8} {'flip':>6}"
    lines = [head, "-" * len(head)]
    for pid, m in metrics["per_principle"].items():
        lines.append(f"{pid:<28} {m['judgements']:>5} {m['alignment']:>6.3f} {m['mean_confidence']:>6.3f} "
                     f"{m['position_bias_rate']:>8.3f} {m['flip_rate']:>6.3f}")
    lines.append("-" * len(head))
    lines.append(f"{'all pairs':<28} {metrics['n']:>5} {metrics['alignment']:>6.3f} {metrics['mean_confidence']:>6.3f} "
                 f"{metrics['position_bias_rate']:>8.3f} {metrics['flip_rate']:>6.3f}")
    lines.append(f"single-order alignment (no swap): {metrics['single_order_alignment']:.3f}; skipped rows: {metrics['skipped']}")
    return "\n".join(lines)


def _mean(values) -> float:
    values = [float(v) for v in values]
    return round(sum(values) / len(values), 4) if values else float("nan")


@hydra.main(config_path=CONFIG_PATH, config_name=STAGE, version_base=None)
def main(cfg: DictConfig) -> None:
    run_stage(STAGE, run, cfg)


if __name__ == "__main__":
    main()
