"""The whole recipe as one command: ``python -m cai.pipeline [key=value ...]``.

Runs the stages listed in ``stages`` in order, each as its own process (``python -m cai.stages.<stage>``)
on the same ``run_dir``, so a training stage can later be started under a multi-process launcher and a
crash in one stage never takes the pipeline's state with it. Command-line overrides are passed on:
shared keys (``model=``, ``run_dir=``, ``debug=tiny``, ...) to every stage, ``<stage>.KEY=...`` only to
that stage. The pipeline stops at the first stage that fails and says which.
"""

from __future__ import annotations

import subprocess
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cai.stages import CONFIG_PATH

STAGES = ("sl_generate", "sl_train", "ai_feedback", "pm_pretrain", "pm_finetune", "ppo", "evaluate")


def overrides_for(stage: str, overrides: list[str]) -> list[str]:
    """The command-line overrides that apply to ``stage``: drop the ones addressed to other stages
    and the pipeline's own ``stages=`` list."""
    kept = []
    for override in overrides:
        key = override.lstrip("~+").split("=", 1)[0]
        head = key.split(".", 1)[0]
        if head == "stages" or (head in STAGES and head != stage):
            continue
        kept.append(override)
    return kept


@hydra.main(config_path=CONFIG_PATH, config_name="pipeline", version_base=None)
def main(cfg: DictConfig) -> None:
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"cai.pipeline: stages= names unknown stage(s) {unknown} (known: {', '.join(STAGES)})")
    overrides = list(HydraConfig.get().overrides.task)
    if not any(o.startswith("run_dir=") for o in overrides):
        overrides.append(f"run_dir={cfg.run_dir}")  # every stage must agree on the run directory
    summary = []
    for stage in cfg.stages:
        command = [sys.executable, "-m", f"cai.stages.{stage}", *overrides_for(stage, overrides)]
        print(f"\n=== cai.pipeline: {stage} ===", flush=True)
        start = time.time()
        code = subprocess.call(command)
        summary.append((stage, "ok" if code == 0 else f"failed (exit {code})", time.time() - start))
        if code != 0:
            _print_summary(summary)
            raise SystemExit(f"cai.pipeline: stage '{stage}' failed (exit {code}); see the message above. "
                             f"Finished stages are kept in {cfg.run_dir}.")
    _print_summary(summary)


def _print_summary(rows: list[tuple[str, str, float]]) -> None:
    print("\nstage           status              wall")
    for stage, status, seconds in rows:
        print(f"{stage:<15} {status:<19} {seconds:7.1f}s")


if __name__ == "__main__":
    main()
