"""Does the reward go up? PPO, RLOO and GRPO from the same SL model against the same PM, on the same fixed prompts,
with the same wall-time budget and the same number of responses a step, two seeds each.

    .venv/bin/python scripts/rl_compare.py                         # runs/demo's SL model and PM (make demo first)
    .venv/bin/python scripts/rl_compare.py --from runs/X --budget 300 --seeds 0 1 2

Each run copies the finished upstream stages of ``--from`` into ``runs/rl-compare/<algorithm>-seed<N>`` and starts the
real stage (``python -m cai.stages.ppo``) with a step count it will not reach; once the steps it logged have used the
budget (the sum of their ``seconds``), the run is stopped and its ``metrics.jsonl`` read: the mean PM score of the first
and last quarter of its steps, and the per-sequence KL to the reference over its last quarter. Runs go one after another,
so each has the machine to itself. The learning rate decays over the unreached step count, so every run sees nearly its
peak rate. Results are printed as a table and written to ``runs/rl-compare/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UPSTREAM = ("sl_generate", "sl_train", "ai_feedback", "pm_pretrain", "pm_finetune")
# The same 8 prompts every step-cycle, 8 responses a step: ppo 8 prompts x 1, the critic-free methods 2 prompts x 4.
COMMON = ("ppo.num_prompts=8", "ppo.num_helpful=0", "ppo.lr=2e-5", "ppo.ppo_epochs=2", "ppo.num_minibatches=2",
          "ppo.max_new_tokens=32", "ppo.temperature=0.7", "ppo.kl_coef=0.05", "ppo.save_every=1000",
          "ppo.log_samples_every=1000", "progress=false")
SHAPES = {"ppo": ("ppo.batch_size=8",), "rloo": ("ppo.batch_size=2", "ppo.samples_per_prompt=4"),
          "grpo": ("ppo.batch_size=2", "ppo.samples_per_prompt=4")}


def run_one(source: Path, run_dir: Path, algorithm: str, seed: int, budget: float) -> dict:
    from cai.metrics import read_metrics

    shutil.rmtree(run_dir, ignore_errors=True)
    for stage in UPSTREAM:  # the stages' outputs without their resumable checkpoints (gigabytes a copy)
        if (source / stage).exists():
            shutil.copytree(source / stage, run_dir / stage, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))
    args = [sys.executable, "-m", "cai.stages.ppo", f"run_dir={run_dir}", f"seed={seed}", f"ppo.algorithm={algorithm}",
            "ppo.steps=1000", *COMMON, *SHAPES[algorithm]]
    log = (run_dir / "stage.log").open("w")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rows: list[dict] = []
    while proc.poll() is None:
        rows = [m for m in read_metrics(run_dir / "ppo") if "score" in m]
        if sum(m["seconds"] for m in rows) >= budget:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            break
        time.sleep(1)
    log.close()
    rows = [m for m in read_metrics(run_dir / "ppo") if "score" in m]
    if not rows or (proc.returncode != 0 and sum(m["seconds"] for m in rows) < budget):  # it failed, not stopped by us
        raise SystemExit(f"{algorithm} seed {seed} stopped after {len(rows)} steps (exit {proc.returncode}) before the "
                         f"budget; see {run_dir / 'stage.log'}")
    quarter = max(1, len(rows) // 4)

    def mean(key, part):
        return round(sum(m[key] for m in part) / len(part), 4)

    return {"algorithm": algorithm, "seed": seed, "steps": len(rows), "seconds": round(sum(m["seconds"] for m in rows), 1),
            "score_first": mean("score", rows[:quarter]), "score_last": mean("score", rows[-quarter:]),
            "kl_last": mean("kl", rows[-quarter:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, default=ROOT / "runs" / "demo",
                        help="a run dir with finished sl_train and pm_finetune (default: make demo's runs/demo)")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds of RL steps per run (default 180)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--algorithms", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "rl-compare")
    args = parser.parse_args(argv)
    for stage in ("sl_train", "pm_finetune"):
        if not (args.source / stage / "model").is_dir():
            raise SystemExit(f"--from {args.source}: no finished {stage} there (run make demo first, or name another run dir)")
    results = []
    for seed in args.seeds:
        for algorithm in args.algorithms:
            results.append(run_one(args.source, args.out / f"{algorithm}-seed{seed}", algorithm, seed, args.budget))
            r = results[-1]
            print(f"{r['algorithm']:<5} seed {r['seed']}: {r['steps']:3d} steps in {r['seconds']:6.1f} s, mean PM score "
                  f"{r['score_first']:+.3f} -> {r['score_last']:+.3f} (first -> last quarter), KL {r['kl_last']:.3f}",
                  flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
