"""The whole recipe as one command: ``python -m cai.pipeline [key=value ...]``.

Runs the stages listed in ``stages`` in order, each as its own process (``python -m cai.stages.<stage>``,
or, with ``launcher=deepspeed``, every multi-rank stage (``MULTI_RANK``) under the ``deepspeed`` launcher) on the same
``run_dir``, so a crash in one stage never takes the pipeline's state with it. Command-line overrides
are passed on: shared keys (``model=``, ``seed=``, ``debug=tiny``, ...) to every stage, ``<stage>.KEY=...``
only to that stage. The pipeline stops at the first stage that fails and says which.

Skipping. A stage is skipped without starting a process when its manifest says complete with the
config hash this command gives it (which covers the local files its settings name: ``config_hash``) and
the same constitution content, and neither its own nor its upstream stages' manifests (the stage's ``UPSTREAM``) nor,
for training stages, the launcher changed since the pipeline last saw it complete (``pipeline.json``). Otherwise the stage
runs, and its own checks decide between doing nothing, resuming and starting over. So a changed ``ppo.kl_coef``
reruns ppo, then evaluate (its upstream finished later); an edited constitution reruns every stage that
reads it and everything downstream.

Sweeps. Under ``-m`` (Hydra multirun) every job gets its own run directory,
``${run_dir}/jobs/<its overrides>``, and each stage's folder there is a link into ``${run_dir}/shared/``,
named by a key over the stage's config hash, constitution, launcher and its upstream stages' keys: jobs
whose settings agree up to a stage share that stage's folder, so it is computed once. A file lock per
shared folder makes parallel launchers (joblib, submitit) wait for a stage another job is computing.

Iterated rounds (``rounds=R``, ``round_stages``). After the stages of ``stages`` (round 1) and before ``evaluate``,
rounds 2..R each run ``round_stages`` again in ``${run_dir}/round-<r>/``: ``ai_feedback`` samples pairs from the previous
round's policy on fresh prompts (``ai_feedback.round=r``: the r-th block of its prompts) and the labeler labels them,
then the policy is trained again on them from the previous round's policy — by ``dpo``, or by ``pm_finetune`` and
``ppo``. Each round's stages are ordinary stage runs, skipped and resumed like any: the pipeline links into the round's
folder what they read of the rounds before (``round_links``): ``sl_train``, where every stage looks for the policy it
starts from, is the previous round's policy stage; ``pm_pretrain``, where pm_finetune looks for the PM it starts from,
is the previous round's ``pm_finetune``; ``sl_generate`` is round 1's. So a round's manifests record the lineage of the
policy it sampled and trained from, and a rerun of a round reruns the rounds after it and ``evaluate``, whose
``trained`` checkpoints include every round's policy.

At the end: a summary table (status, rows or steps, wall time, key metric per stage),
``${run_dir}/pipeline.json`` and the HTML report ``${run_dir}/report.html`` (``cai report``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cai import roles
from cai.errors import InputError
from cai.files import atomic_write_json, safe_name
from cai.lineage import MANIFEST, read_manifest, resolved_config
from cai.report import key_figures, write_report
from cai.stage_folder import config_hash, round_dir
from cai.stages import CONFIG_PATH, STAGES, run_app


@functools.cache
def facts(stage: str):
    """The stage's module, for the facts it states at its top (``UPSTREAM``, ``HASH_KEYS``, ``MULTI_RANK``, ``SHARDED``)."""
    return importlib.import_module(f"cai.stages.{stage}")


def ranks_matter(stage: str) -> bool:
    """Whether the launcher (its number of ranks) is part of what ``stage`` computes: a training stage's, which
    partitions its batches over the ranks; not a sharded stage's, nor a one-process one's."""
    return facts(stage).MULTI_RANK and not facts(stage).SHARDED

PIPELINE_KEYS = ("stages", "launcher", "rounds", "round_stages")  # the pipeline's own settings: not passed to stages
RECORD = "pipeline.json"
# what a later round may run (round_stages): label fresh pairs, then train the policy on them by DPO, or by PM + RL
ROUTES = (["ai_feedback", "dpo"], ["ai_feedback", "pm_finetune", "ppo"])


def check_rounds(cfg) -> str | None:
    """The stage that trains each round's policy (dpo or ppo), or None with ``rounds=1``; a bad ``rounds`` or
    ``round_stages`` is refused in one line (SystemExit) naming the key."""
    if not isinstance(cfg.rounds, int) or isinstance(cfg.rounds, bool) or cfg.rounds < 1:
        raise SystemExit(f"cai.pipeline: rounds must be an integer >= 1, got {cfg.rounds!r}")
    if cfg.rounds == 1:
        return None
    stages = list(cfg.round_stages)
    if stages not in ROUTES:
        raise SystemExit(f"cai.pipeline: round_stages={stages}: a round labels fresh pairs and trains the policy on them: "
                         f"{' or '.join('[' + ', '.join(r) + ']' for r in ROUTES)}")
    policy = stages[-1]
    if policy not in cfg.stages:
        raise SystemExit(f"cai.pipeline: rounds={cfg.rounds} trains each round's policy with {policy}, which stages= "
                         f"does not run in round 1 (stages: {list(cfg.stages)})")
    return policy


def schedule(stages: list[str], rounds: int, round_stages: list[str]) -> list[tuple[int, str]]:
    """(round, stage) in the order the pipeline runs them: ``stages`` as round 1, then rounds 2..``rounds`` each running
    ``round_stages``, and evaluate (if in ``stages``) after every round."""
    if rounds == 1:
        return [(1, stage) for stage in stages]
    steps = [(1, stage) for stage in stages if stage != "evaluate"]
    steps += [(r, stage) for r in range(2, rounds + 1) for stage in round_stages]
    return steps + ([(1, "evaluate")] if "evaluate" in stages else [])


def round_links(run_dir: Path, r: int, round_stages, policy_stage: str) -> dict[str, Path]:
    """What round r (>= 2) reads of the rounds before, as ``{name in round r's folder: the folder it stands for}``:
    ``sl_train`` (the policy the round starts from) is the previous round's ``policy_stage``; ``pm_pretrain`` (the PM
    pm_finetune starts from) the previous round's ``pm_finetune`` when the rounds fine-tune the PM; ``sl_generate`` (the
    SL samples a PM's reward is centred on, and dpo's revision pairs) round 1's."""
    previous = round_dir(run_dir, r - 1)
    links = {"sl_train": previous / policy_stage, "sl_generate": run_dir / "sl_generate"}
    if "pm_finetune" in round_stages:
        links["pm_pretrain"] = previous / "pm_finetune"
    return links


def _link(folder: Path, target: Path) -> None:
    """Make ``folder`` a relative link to ``target`` (re-pointed when it names another)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(target, folder.parent)
    if folder.is_symlink() and os.readlink(folder) != relative:
        folder.unlink()
    if not folder.is_symlink():
        if folder.exists():
            raise SystemExit(f"cai.pipeline: {folder} should be a link to {target} (the rounds' lineage), but a folder is "
                             f"there; move it away and rerun")
        folder.symlink_to(relative, target_is_directory=True)


def overrides_for(stage: str, overrides: list[str]) -> list[str]:
    """The command-line overrides that apply to ``stage``: drop the ones addressed to other stages
    and the pipeline's own settings (``stages=``, ``launcher=``)."""
    kept = []
    for override in overrides:
        key = override.lstrip("~+").split("=", 1)[0]
        head = key.split(".", 1)[0]
        if head in PIPELINE_KEYS or (head in STAGES and head != stage):
            continue
        kept.append(override)
    return kept


def launch_command(stage: str, args: list[str], launcher: DictConfig | dict, one_process: bool = False) -> list[str]:
    """The command that runs ``stage``: one Python process, or for a multi-rank stage (training, generating) under
    ``launcher.name=deepspeed`` the DeepSpeed launcher with ``num_gpus`` ranks per node on ``num_nodes``
    nodes (``hostfile`` for several), unless ``one_process`` (``one_process_stages``)."""
    if launcher["name"] == "deepspeed" and facts(stage).MULTI_RANK and not one_process:
        command = [str(Path(sys.executable).with_name("deepspeed")), "--no_local_rank",
                   "--num_gpus", str(launcher["num_gpus"]), "--num_nodes", str(launcher["num_nodes"])]
        if launcher.get("hostfile"):
            command += ["--hostfile", str(launcher["hostfile"])]
        return [*command, "--module", f"cai.stages.{stage}", *args]
    return [sys.executable, "-m", f"cai.stages.{stage}", *args]


def one_process_stages(cfg: DictConfig, stages) -> dict[str, str]:
    """``{stage: why}`` for the sharded stages of ``stages`` whose roles cannot run on the launcher's ranks (the stage's
    ``ranks_refusal``: e.g. a vLLM judge in evaluate, a vLLM model split over a number of GPUs that does not divide
    the ranks'): the pipeline runs them as one process, as it ran every generating stage before they ran on every
    rank."""
    ranks = cfg.launcher.num_gpus * cfg.launcher.num_nodes if cfg.launcher.name == "deepspeed" else 1
    return {stage: why for stage in dict.fromkeys(stages) if facts(stage).SHARDED
            and (why := facts(stage).ranks_refusal(cfg, ranks))}


def stage_keys(cfg: DictConfig, constitution_hash: str) -> dict[str, dict]:
    """Per stage: the config hash the stage will compute for itself, the constitution hash it records
    (None when it reads no constitution), and a key over those, the launcher and its upstream keys."""
    plan: dict[str, dict] = {}
    for stage in STAGES:
        hash_keys = facts(stage).HASH_KEYS
        own = config_hash(cfg, hash_keys)
        constitution = constitution_hash if "constitution" in hash_keys else None
        launcher = resolved_config(cfg.launcher) if ranks_matter(stage) else None
        upstream = [plan[u]["key"] for u in facts(stage).UPSTREAM]
        blob = json.dumps([stage, own, constitution, launcher, upstream], sort_keys=True).encode("utf-8")
        plan[stage] = {"config_hash": own, "constitution_hash": constitution, "key": hashlib.sha256(blob).hexdigest()}
    return plan


def up_to_date(folder: Path, stage: str, plan: dict, state: dict, seen: dict | None) -> bool:
    """Whether ``stage`` can be skipped without starting it: its manifest says complete with the config and
    constitution hashes of ``plan``, and ``state`` (``stage_state``) is what the pipeline recorded when it last
    saw the stage complete."""
    manifest = read_manifest(folder)
    if not manifest or manifest.get("status") != "complete" or manifest.get("config_hash") != plan["config_hash"]:
        return False
    recorded = manifest.get("constitution_hash")  # None: this run of the stage read no constitution
    if recorded is not None and recorded != plan["constitution_hash"]:
        return False
    return seen == state


def stage_state(cfg: DictConfig, folder: Path, stage: str, rounds: tuple[Path, ...] = ()) -> dict:
    """What must not have changed since a stage was last seen complete: the manifests of the stage and of its
    upstream stages (a rerun of any rewrites its manifest), and for training stages the launcher (the number
    of ranks is part of a training run). Edited input files change the config hash itself (``config_hash``).
    ``rounds``: the later rounds' stage folders a stage that runs after them reads (evaluate)."""
    state = {"manifest_mtime": _mtime(folder / MANIFEST),
             "upstream": {u: _mtime(folder.parent / u / MANIFEST) for u in facts(stage).UPSTREAM},
             "launcher": resolved_config(cfg.launcher) if ranks_matter(stage) else None}
    if rounds:
        state["rounds"] = {str(f.relative_to(folder.parent)): _mtime(f / MANIFEST) for f in rounds}
    return state


def check_loadable(cfg, names) -> None:
    """Load the tokenizer of each named role (a tiny-random one is built in-process: nothing to check), so a missing
    folder or a tokenizer without a chat template is refused in one line naming the role's key before the pipeline's
    first stage, not when the stage that reads the role is reached. A function role (``engine=function``) has no
    tokenizer: it is imported and asked its probe pair instead (``cai.engines.FunctionLabeler``)."""
    from cai.engines import FunctionLabeler
    from cai.models import load_tokenizer

    checked = []
    for name in names:
        model_spec = roles.spec(cfg, name)
        if model_spec.get("engine") == roles.FUNCTION:
            FunctionLabeler(model_spec)
        elif model_spec["path"] != roles.TINY_RANDOM and model_spec["path"] not in checked:
            load_tokenizer(model_spec)
            checked.append(model_spec["path"])


@hydra.main(config_path=CONFIG_PATH, config_name="pipeline", version_base=None)
def main(cfg: DictConfig) -> None:
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"cai.pipeline: stages= names unknown stage(s) {unknown} (known: {', '.join(STAGES)})")
    policy_stage = check_rounds(cfg)
    if cfg.launcher.name not in ("python", "deepspeed"):
        raise SystemExit(f"cai.pipeline: launcher.name must be python or deepspeed, got {cfg.launcher.name!r}")
    from cai.constitution import ConstitutionError, load_constitution, resolve_constitution_dir

    try:
        constitution_hash = load_constitution(resolve_constitution_dir(cfg.constitution.path)).hash
    except ConstitutionError as e:
        raise SystemExit(f"cai.pipeline: {e}") from None
    hc = HydraConfig.get()
    overrides = [o for o in hc.overrides.task if not o.startswith("run_dir=")]
    sweep = hc.mode == RunMode.MULTIRUN
    run_dir = Path(cfg.run_dir) / "jobs" / _job_name(hc.job.override_dirname) if sweep else Path(cfg.run_dir)
    try:  # a malformed model role, or one that cannot load, is refused before any stage starts (cai.roles)
        plan = stage_keys(cfg, constitution_hash)
        check_loadable(cfg, [r for r in roles.ROLES if any(r in facts(s).HASH_KEYS for s in cfg.stages)])
        one_process = one_process_stages(cfg, [*cfg.stages, *(cfg.round_stages if cfg.rounds > 1 else ())])
    except InputError as e:
        raise SystemExit(f"cai.pipeline: {e}") from None
    for stage, why in one_process.items():
        print(f"cai.pipeline: {stage} runs as one process under launcher=deepspeed: {why}")
    run_dir.mkdir(parents=True, exist_ok=True)
    # a sweep job links every stage, not only the ones it runs: a stage reads its upstream through these links
    shares = {stage: _share(run_dir / stage, Path(cfg.run_dir) / "shared", stage, plan[stage]["key"])
              for stage in STAGES} if sweep else {}
    record_path = run_dir / RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    seen = record.get("seen", {})  # stage (round r's: round-<r>/stage) -> stage_state when last seen complete
    summary = []
    steps = schedule(list(cfg.stages), cfg.rounds, list(cfg.round_stages))
    later = tuple(round_dir(run_dir, r) / stage for r, stage in steps if r > 1)  # what evaluate reads of the rounds
    failed = None
    for r, stage in steps:
        where = round_dir(run_dir, r)
        folder, name = where / stage, (stage if r == 1 else f"round-{r}/{stage}")
        lock, seen_file = shares.get(stage, (contextlib.nullcontext(), None)) if r == 1 else (contextlib.nullcontext(), None)
        after_rounds = later if stage == "evaluate" else ()
        args = [*overrides_for(stage, overrides), f"run_dir={where}"]
        if r > 1:
            for link, target in round_links(run_dir, r, cfg.round_stages, policy_stage).items():
                _link(where / link, target)
            if stage == "ai_feedback":
                args.append(f"ai_feedback.round={r}")
        stage_plan = plan[stage] if r == 1 else stage_keys(_in_round(cfg, r), constitution_hash)[stage]
        start = time.time()
        with lock:
            if seen_file is not None:  # in a sweep, whichever job last completed the shared folder recorded it
                seen[name] = json.loads(seen_file.read_text()) if seen_file.exists() else None
            if up_to_date(folder, stage, stage_plan, stage_state(cfg, folder, stage, after_rounds), seen.get(name)):
                summary.append(_summary_row(name, folder, "skipped", time.time() - start))
                continue
            print(f"\n=== cai.pipeline: {name} ===", flush=True)
            before = _mtime(folder / MANIFEST)
            seen.pop(name, None)
            code = subprocess.call(launch_command(stage, args, cfg.launcher, one_process=stage in one_process))
            if code == 0:
                seen[name] = stage_state(cfg, folder, stage, after_rounds)
                if seen_file is not None:
                    atomic_write_json(seen_file, seen[name])
        if code != 0:
            summary.append(_summary_row(name, folder, f"failed ({code})", time.time() - start))
            failed = (name, code)
            break
        after = _mtime(folder / MANIFEST)  # a stage that found itself complete leaves its manifest alone
        summary.append(_summary_row(name, folder, "ran" if after != before else "up to date", time.time() - start))
    atomic_write_json(record_path, {"stages": summary, "seen": seen, "overrides": overrides,
                                    "job_num": hc.job.num if sweep else None,
                                    "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    print(format_summary(summary))
    if failed:
        raise SystemExit(f"cai.pipeline: stage '{failed[0]}' failed (exit {failed[1]}); see the message above. "
                         f"Finished stages are kept in {run_dir}.")
    print(f"cai.pipeline: report -> {write_report(run_dir)}")


def _in_round(cfg: DictConfig, r: int) -> DictConfig:
    """The config round r's stages run with (``ai_feedback.round=r``), for the config hashes the pipeline compares."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg, {"ai_feedback": {"round": r}})


def _share(folder: Path, shared: Path, stage: str, key: str):
    """Make ``folder`` a link to the shared folder of this stage key. Returns the lock to hold while the
    stage runs there, and the file where the pipeline records what it saw when the stage last completed
    there (``stage_state``), so the sweep's other jobs skip it without starting a process."""
    from filelock import FileLock

    target = shared / f"{stage}-{key[:16]}"
    target.mkdir(parents=True, exist_ok=True)
    if folder.is_symlink() and folder.resolve() != target.resolve():
        folder.unlink()  # the job's settings changed since it last ran: point it at the matching folder
    if not folder.exists():
        folder.symlink_to(os.path.relpath(target, folder.parent), target_is_directory=True)
    return FileLock(str(target) + ".lock"), Path(str(target) + ".seen.json")


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def _job_name(override_dirname: str) -> str:
    # "ppo.kl_coef=0.01,seed=1" -> "ppo.kl_coef-0.01_seed-1": no "=" or "," (they would break the run_dir= override);
    # a long name is cut and keeps a hash of the whole, so two jobs never share a folder
    name = safe_name(override_dirname.replace("=", "-").replace(",", "_"))
    if len(name) > 120:
        name = f"{name[:103]}_{hashlib.sha256(override_dirname.encode()).hexdigest()[:16]}"
    return name or "default"


def _summary_row(stage: str, folder: Path, status: str, seconds: float) -> dict:
    manifest = read_manifest(folder)
    amount, metric = key_figures(manifest or {})
    return {"stage": stage, "status": status, "amount": amount, "seconds": round(seconds, 1), "metric": metric}


def format_summary(rows: list[dict]) -> str:
    width = max([13, *(len(r["stage"]) for r in rows)])
    lines = [f"\n{'stage':<{width}} {'status':<11} {'amount':<13} {'wall':>8}  key metric"]
    for r in rows:
        lines.append(f"{r['stage']:<{width}} {r['status']:<11} {r['amount']:<13} {r['seconds']:>7.1f}s  {r['metric']}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_app(main, "cai.pipeline")
