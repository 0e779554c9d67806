"""Labeler alignment: how often the AI labeler agrees with human-labeled pairs, and how biased it is.

    python -m cai.stages.label_alignment pairs=FILE.jsonl run_dir=R

``pairs`` is a JSONL file in either format:
- hh-rlhf: ``chosen``/``rejected`` transcripts ("\\n\\nHuman: … \\n\\nAssistant: …"; the human preferred
  ``chosen``). Their shared turns are the context; each transcript's last assistant turn is its response.
- cai's ai_feedback output: ``prompt`` (chat), ``chosen``/``rejected`` (one assistant turn each).

The ``labeler`` role (``cai.roles``) judges every pair exactly as ``ai_feedback`` does (same principles, both orders,
``ai_feedback.n_principles``/``cot``/``few_shot``). Rows it cannot use — a transcript with no Assistant
turn, two identical responses, differing contexts — are skipped and counted.

Writes ``${run_dir}/label_alignment/metrics.json`` (and ``manifest.json``) with
- ``alignment``: share of pairs where the labeler's swap-averaged P(human's choice) > 0.5 (ties count ½);
- ``mean_confidence``: mean of max(p, 1 − p);
- ``position_bias_rate``: share of single-order judgements in which the option shown first wins;
- ``same_position_preferred``: share of (pair, principle) judgements where the same position wins in both orders, so the
  winner changes when the order is swapped (RLAIF's "% same position preferred", Lee et al. 2023);
- ``single_order_alignment``: agreement from the (A)=chosen order alone, to show what swapping buys;
- ``n``, ``skipped``, and ``per_principle`` breakdowns; and prints them as a table.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cai import roles
from cai.constitution import load_constitution, resolve_constitution_dir
from cai.errors import DataError, StageInputError
from cai.feedback import alignment_metrics, judge_pairs, judging, read_human_pairs
from cai.files import atomic_write_json
from cai.stage_folder import StageRun, stage_summary
from cai.stages import CONFIG_PATH, run_app, run_stage

STAGE = "label_alignment"
HASH_KEYS = None  # a stand-alone check: its config hash covers every key
MULTI_RANK = False
SHARDED = False


def run(cfg: DictConfig, stage: StageRun) -> dict:
    start = time.time()
    s = cfg.ai_feedback  # the labeler is configured once, for ai_feedback and for this check
    if not cfg.pairs:
        raise StageInputError("pairs= is required: a JSONL file of human-labeled pairs (hh-rlhf or ai_feedback format)")
    settings = judging(s, cfg)

    # Step 1: read the pairs (response_a = the human's choice) and the constitution.
    pairs, skipped = read_human_pairs(Path(cfg.pairs), cfg.limit)
    if not pairs:
        raise DataError(f"{cfg.pairs}: no usable pairs ({', '.join(f'{k}: {v}' for k, v in skipped.items()) or 'empty file'})")
    constitution = load_constitution(resolve_constitution_dir(cfg.constitution.path))
    principles = constitution.select("comparison", s.principle_ids, "ai_feedback.principle_ids")

    # Step 2: judge every pair (both orders, sampled principles).
    from cai.engines import load_generator

    labeler = roles.spec(cfg, "labeler")
    model, tok = load_generator(labeler)
    judgements = judge_pairs(model, tok, constitution, pairs, principles=principles, **settings)

    # Step 3: the report.
    metrics = alignment_metrics(judgements)
    metrics.update(n=len(pairs), skipped=skipped, pairs_file=str(cfg.pairs), model=roles.label(labeler),
                   n_principles=s.n_principles, cot=bool(s.cot), seconds=round(time.time() - start, 1))
    atomic_write_json(stage.out / "metrics.json", metrics)
    print(format_table(metrics))
    stage.complete(stage_summary(f"{len(pairs)} pairs", f"alignment {metrics['alignment']:.3f}", **{
                       k: metrics[k] for k in ("alignment", "position_bias_rate", "same_position_preferred")}),
                   counts={"pairs": len(pairs), **{f"skipped_{k}": v for k, v in skipped.items()}},
                   constitution_hash=constitution.hash,
                   models={**{role: None for role in roles.ROLES}, "labeler": labeler})  # the only model it loads
    return metrics


def format_table(metrics: dict) -> str:
    head = f"{'principle':<28} {'n':>5} {'align':>6} {'conf':>6} {'pos.bias':>8} {'same pos.':>9}"
    lines = [head, "-" * len(head)]
    for pid, m in metrics["per_principle"].items():
        lines.append(f"{pid:<28} {m['judgements']:>5} {m['alignment']:>6.3f} {m['mean_confidence']:>6.3f} "
                     f"{m['position_bias_rate']:>8.3f} {m['same_position_preferred']:>9.3f}")
    lines.append("-" * len(head))
    lines.append(f"{'all pairs':<28} {metrics['n']:>5} {metrics['alignment']:>6.3f} {metrics['mean_confidence']:>6.3f} "
                 f"{metrics['position_bias_rate']:>8.3f} {metrics['same_position_preferred']:>9.3f}")
    lines.append(f"single-order alignment (no swap): {metrics['single_order_alignment']:.3f}; skipped rows: {metrics['skipped']}")
    return "\n".join(lines)


@hydra.main(config_path=CONFIG_PATH, config_name=STAGE, version_base=None)
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg)


if __name__ == "__main__":
    run_app(main, f"cai {STAGE}")
