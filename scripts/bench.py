"""Side-by-side benchmarks on the embedded SmolLM2-135M-Instruct model (or any `--model` path).

    .venv/bin/python scripts/bench.py --quick            # a few minutes on a 2-core CPU
    .venv/bin/python scripts/bench.py --repeats 5 -o bench.json

What is compared (each pair alternates A and B in one process; figures are medians over the repeats, and
the ratio of those medians is the result — this machine is shared and noisy, absolute numbers are context):

- generation: `cai.generation.generate` on the same prompts at batch 4 and 16 against one prompt at a time
  (greedy, so all three produce the same tokens); tokens/s.
- labeling: `cai.feedback.judge_pairs` — one prefill per (pair, principle, order) reading the next-token
  log-probabilities of the two option labels, with the shared-prefix KV cache — against a naive labeler that
  generates a few tokens after the same answer cue and parses "A" or "B"; both orders, 2 principles;
  comparisons/s (a comparison = one pair under one principle in one order).

Not here yet (issue #8): PPO against TRL's PPOTrainer, and per-stage pipeline times (the README's demo table has
those from `/usr/bin/time`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def alternate(named: dict, repeats: int) -> dict[str, list[float]]:
    """Run each callable once per repeat, in A, B, C, ... order, and collect wall times."""
    times: dict[str, list[float]] = {name: [] for name in named}
    for _ in range(repeats):
        for name, fn in named.items():
            times[name].append(timed(fn)[0])
    return times


def bench_generation(model, tok, prompts: list[list[dict]], max_new_tokens: int, repeats: int) -> dict:
    from cai.generation import generate

    def run(batch_size: int):
        return lambda: generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size,
                                progress=False)

    outputs = {b: run(b)() for b in (1, 4, 16)}  # warm-up, and the tokens each produced
    tokens = sum(len(c.token_ids) for c in outputs[1])
    same = all([c.token_ids for c in outputs[b]] == [c.token_ids for c in outputs[1]] for b in (4, 16))
    times = alternate({f"batch {b}": run(b) for b in (1, 4, 16)}, repeats)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "tokens": tokens, "same_tokens": same,
            "seconds": medians, "tokens_per_s": {name: tokens / s for name, s in medians.items()},
            "speedup_vs_batch_1": {name: medians["batch 1"] / s for name, s in medians.items()}, "repeats": repeats}


def naive_labels(model, tok, constitution, pairs, *, n_principles: int, seed: int, batch_size: int) -> list[float]:
    """The baseline: for each (pair, principle, order) generate a few tokens after the answer cue and parse the
    label; 1.0 when the first-shown response is picked, 0.0 for the other, 0.5 when neither can be read."""
    from cai.constitution import comparison_messages, sample_principles
    from cai.generation import generate

    prompts, prefixes = [], []
    for pair in pairs:
        for principle in sample_principles(constitution.comparison, n_principles, seed, pair.key):
            for first, second in ((pair.response_a, pair.response_b), (pair.response_b, pair.response_a)):
                messages, prefix = comparison_messages(constitution, pair.conversation, first, second, principle,
                                                       "comparison", False)
                prompts.append(messages)
                prefixes.append(prefix)
    outs = generate(model, tok, prompts, assistant_prefixes=prefixes, max_new_tokens=4, temperature=0.0,
                    batch_size=batch_size, progress=False)
    labels = []
    for o in outs:
        text = o.text.strip().lstrip("(").upper()
        labels.append(1.0 if text.startswith("A") else 0.0 if text.startswith("B") else 0.5)
    return labels


def bench_labeling(model, tok, constitution, pairs, n_principles: int, batch_size: int, repeats: int) -> dict:
    from cai.feedback import judge_pairs

    def ours():
        return judge_pairs(model, tok, constitution, pairs, n_principles=n_principles, seed=0, few_shot=False,
                           batch_size=batch_size, progress=False)

    def naive():
        return naive_labels(model, tok, constitution, pairs, n_principles=n_principles, seed=0, batch_size=batch_size)

    ours()  # warm-up
    unread = naive().count(0.5)  # answers the naive labeler could not parse
    comparisons = len(pairs) * n_principles * 2
    times = alternate({"one prefill (cai)": ours, "generate and parse": naive}, repeats)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return {"pairs": len(pairs), "n_principles": n_principles, "comparisons": comparisons, "seconds": medians,
            "comparisons_per_s": {name: comparisons / s for name, s in medians.items()},
            "speedup": medians["generate and parse"] / medians["one prefill (cai)"], "naive_unparsed": unread,
            "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="cai benchmarks, side by side (see the module docstring)")
    parser.add_argument("--quick", action="store_true", help="fewer prompts, pairs and repeats: a few minutes on a CPU")
    parser.add_argument("--model", default="embedded", help="model.path: embedded (default), a folder or a hub id")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 3; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "runs" / "bench" / "bench.json")
    args = parser.parse_args(argv)

    import torch

    from cai.constitution import load_constitution, resolve_constitution_dir
    from cai.data import load_prompts
    from cai.feedback import Pair
    from cai.models import load_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    n_prompts, max_new_tokens, n_pairs = (16, 32, 8) if args.quick else (32, 64, 24)
    model, tok = load_policy({"path": args.model, "device": "auto", "dtype": "auto", "trust_remote_code": False})
    constitution = load_constitution(resolve_constitution_dir("constitutions/default"))
    prompts = [it.messages() for it in load_prompts(None, "prompt", "red_team", n_prompts, 0)]
    rows = [json.loads(line) for line in (ROOT / "cai" / "prompts" / "helpful_pairs.jsonl").read_text().splitlines()][:n_pairs]
    pairs = [Pair(f"bench-{i}", [{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for i, r in enumerate(rows)]

    results = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "threads": torch.get_num_threads(),
               "device": str(next(model.parameters()).device), "quick": args.quick}
    results["generation"] = bench_generation(model, tok, prompts, max_new_tokens, repeats)
    results["labeling"] = bench_labeling(model, tok, constitution, pairs, 2, 16, repeats)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")

    g, lab = results["generation"], results["labeling"]
    print(f"cai benchmarks: {args.model} on {results['device']}, {results['threads']} threads, median of {repeats}")
    print(f"generation ({g['prompts']} prompts x up to {g['max_new_tokens']} greedy tokens, {g['tokens']} tokens, "
          f"same tokens at every batch size: {g['same_tokens']}):")
    for name, rate in g["tokens_per_s"].items():
        print(f"  {name:<9} {rate:8.1f} tokens/s   {g['speedup_vs_batch_1'][name]:.2f}x one-at-a-time")
    print(f"labeling ({lab['pairs']} pairs x {lab['n_principles']} principles x 2 orders = {lab['comparisons']} comparisons):")
    for name, rate in lab["comparisons_per_s"].items():
        print(f"  {name:<19} {rate:7.2f} comparisons/s")
    print(f"  one-prefill labeling vs generate-and-parse: {lab['speedup']:.2f}x "
          f"(the naive labeler's answer could not be read in {lab['naive_unparsed']} of {lab['comparisons']}; "
          f"cai reads a probability every time)")
    print(f"results -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
