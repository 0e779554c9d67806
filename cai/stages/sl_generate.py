"""SL-CAI data: red-team prompt -> answer -> n_revisions x (sampled principle: critique, revision).

    python -m cai.stages.sl_generate run_dir=R data.num_red_team=8 data.num_helpful=0 n_revisions=2

Models (``cai.roles``): the ``policy`` answers; the ``reviser`` (the policy unless set) critiques and revises.
For each red-team prompt the policy answers; then, for each round, a critique/revision principle is
drawn (seeded per prompt, distinct across rounds), the reviser critiques the latest answer under the
principle's critique request and rewrites it under the revision request. Helpful prompts get a plain
answer, mixed in so SL keeps helpfulness (as in the CAI paper's SL stage).

Writes ``${run_dir}/sl_generate/``:
- ``shards/shard-NNNNN/`` — one dataset per ``sl_generate.shard_size`` prompts, saved as it finishes;
- ``dataset/`` — every row (``save_to_disk``) once all shards are done;
- ``manifest.json``, ``metrics.jsonl``.
Columns: ``id``, ``prompt``, ``messages`` (conversation + final answer, TRL's SFT format),
``initial_response``, ``critiques``, ``revisions``, ``principle_ids``, ``kind`` (red_team | helpful),
``finished`` (the final answer ended with EOS rather than running into max_new_tokens).

Resume: rerunning the same command keeps the finished shards and generates only the missing ones
(a crash loses at most the shard in flight); a changed config or constitution starts over.

Ranks: under ``torchrun`` or ``launcher=deepspeed`` each rank loads its own models and makes its share of the shards
(``cai.shards``; a vLLM model split over T ranks: each group of T makes its share together); the dataset is the one a
single process writes, and a rerun on any number of ranks resumes it.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cai import roles
from cai.constitution import (
    Constitution,
    CritiquePrinciple,
    critique_messages,
    load_constitution,
    resolve_constitution_dir,
    revision_messages,
    sample_principles,
)
from cai.data import PromptItem, load_prompts
from cai.errors import StageInputError
from cai.files import save_dataset
from cai.generation import derive_seed, generate
from cai.shards import join_shards, run_shards
from cai.stage_folder import StageRun, stage_summary
from cai.stages import CONFIG_PATH, check_generation, run_app, run_stage

# The stage's facts, side by side (cai.stages says what each means; the pipeline reads them)
STAGE = "sl_generate"
UPSTREAM = ()
HASH_KEYS = ("seed", "n_revisions", "policy", "reviser", "constitution", "data", "generation", STAGE)
MULTI_RANK = True
SHARDED = True


def run(cfg: DictConfig, stage: StageRun) -> Path:
    settings = cfg[STAGE]

    # Step 1: check the inputs before touching the run directory, so bad input leaves it as it was.
    if cfg.n_revisions < 0:
        raise StageInputError(f"n_revisions must be >= 0, got {cfg.n_revisions}")
    if settings.shard_size < 1:
        raise StageInputError(f"{STAGE}.shard_size must be >= 1, got {settings.shard_size}")
    if not isinstance(settings.helpful_samples, int) or settings.helpful_samples < 1:
        raise StageInputError(f"{STAGE}.helpful_samples must be an integer >= 1, got {settings.helpful_samples!r}")
    if settings.helpful_temperature is not None and not (isinstance(settings.helpful_temperature, (int, float))
                                                         and settings.helpful_temperature >= 0):
        raise StageInputError(f"{STAGE}.helpful_temperature must be >= 0 or null, got {settings.helpful_temperature!r}")
    constitution = load_constitution(resolve_constitution_dir(cfg.constitution.path))
    check_generation(cfg.generation)
    principles = constitution.select("critique_revision", settings.principle_ids, f"{STAGE}.principle_ids")
    items = load_prompts(cfg.data.red_team_path, cfg.data.red_team_column, "red_team", cfg.data.num_red_team,
                         cfg.seed, cfg.data.hh_context, key="data.num_red_team / data.red_team_path")
    items += load_prompts(cfg.data.helpful_path, cfg.data.helpful_column, "helpful", cfg.data.num_helpful,
                          cfg.seed, cfg.data.hh_context, key="data.num_helpful / data.helpful_path")
    if not items:
        raise StageInputError("data.num_red_team and data.num_helpful are both 0: nothing to generate")

    # Step 2: a finished run with the same config and constitution has nothing left to do.
    if stage.done("dataset", constitution_hash=constitution.hash):
        return stage.out / "dataset"

    # Step 3: the models (still before touching the run directory: a bad path changes nothing).
    from cai.engines import load_generator, tensor_parallel

    if reason := ranks_refusal(cfg, stage.world or 1):
        raise StageInputError(reason)
    policy_spec, reviser_spec = roles.spec(cfg, "policy"), roles.spec(cfg, "reviser")
    policy = load_generator(policy_spec, grouped=True)
    reviser = (policy if roles.identity(reviser_spec) == roles.identity(policy_spec)
               else load_generator(reviser_spec, grouped=True))

    # Step 4: resume when the previous attempt had the same config and constitution; else start over (another
    # config's shards and metrics must not be mixed in).
    stage.started(counts={"prompts": len(items)}, fresh=("shards", "metrics.jsonl"))

    # Step 5: generate shard by shard; each shard is saved atomically the moment it is done (cai.shards); on several
    # ranks each makes its share of the shards.
    def make_rows(k: int, shard: list[PromptItem]) -> tuple[list[dict], dict]:
        t0 = time.time()
        rows, n_tokens = generate_rows(shard, policy, reviser, constitution, principles, cfg, derive_seed(cfg.seed, STAGE, k))
        return rows, {"generated_tokens": n_tokens, "tokens_per_s": round(n_tokens / max(time.time() - t0, 1e-9), 2)}

    shards = [items[i:i + settings.shard_size] for i in range(0, len(items), settings.shard_size)]
    records = run_shards(stage.out, shards, make_rows, features=_features(), stage=STAGE, progress=cfg.progress,
                         logger=cfg.logger, rank=stage.rank, world=stage.world,
                         group_size=tensor_parallel([policy_spec, reviser_spec]))
    if not stage.main:
        return stage.out / "dataset"

    # Step 6: rank 0 joins the shards into one dataset; the manifest is written last.
    dataset = join_shards(stage.out, records)
    expected = sum(settings.helpful_samples if it.kind == "helpful" else 1 for it in items)  # rows: one per red-team prompt
    if len(set(dataset["id"])) != len(dataset) or len(dataset) != expected:
        raise RuntimeError(f"{stage.out / 'shards'}: shards hold {len(dataset)} rows where {len(items)} prompts give {expected}; "
                           f"delete the folder and rerun")
    save_dataset(dataset, stage.out / "dataset")
    kinds = dataset["kind"]
    stage.complete(stage_summary(f"{len(dataset)} rows", f"{cfg.n_revisions} revision rounds"),
                   counts={"rows": len(dataset), "red_team": kinds.count("red_team"), "helpful": kinds.count("helpful"),
                           "shards": len(shards), "n_revisions": cfg.n_revisions,
                           # an empty revision keeps the previous answer as the one carried forward
                           "empty_revisions": sum(not r.strip() for revs in dataset["revisions"] for r in revs)})
    return stage.out / "dataset"


def ranks_refusal(cfg: DictConfig, ranks: int) -> str | None:
    """Why this stage's roles cannot run on ``ranks`` ranks, each rank with its own engines (``cai.engines.ranks_refusal``),
    or None; the pipeline asks it before its first stage, and runs the stage as one process then."""
    from cai import engines

    return engines.ranks_refusal([roles.spec(cfg, "policy"), roles.spec(cfg, "reviser")], ranks)


def generate_rows(items: list[PromptItem], policy: tuple, reviser: tuple, c: Constitution, principles: list[CritiquePrinciple],
                  cfg: DictConfig, seed: int) -> tuple[list[dict], int]:
    """Rows for one shard: the red-team prompts answered in one batched call by ``policy`` (model, tokenizer), each
    helpful prompt ``helpful_samples`` times in another (at ``helpful_temperature``), then each revision round's
    critiques and revisions in one call each by ``reviser``. Returns (rows, generated tokens)."""
    s = cfg[STAGE]
    gen = dict(max_new_tokens=cfg.generation.max_new_tokens, temperature=cfg.generation.temperature,
               top_p=cfg.generation.top_p, batch_size=cfg.generation.batch_size, progress=cfg.progress)
    few_shot = bool(s.few_shot)
    conversations = [it.messages() for it in items]
    red = [i for i, it in enumerate(items) if it.kind == "red_team"]
    helpful = [i for i, it in enumerate(items) if it.kind == "helpful"]
    answers = dict(zip(red, generate(*policy, [conversations[i] for i in red], seed=derive_seed(seed, "answer"),
                                     desc="answers", **gen)))
    n = s.helpful_samples
    temperature = cfg.generation.temperature if s.helpful_temperature is None else s.helpful_temperature
    outs = generate(*policy, [conversations[i] for i in helpful for _ in range(n)], seed=derive_seed(seed, "helpful"),
                    desc="helpful answers", **{**gen, "temperature": temperature})
    helpful_answers = {i: outs[j * n:(j + 1) * n] for j, i in enumerate(helpful)}
    n_tokens = sum(len(a.token_ids) for a in [*answers.values(), *outs])

    latest = {i: answers[i].text for i in red}
    latest_finished = {i: answers[i].finished for i in red}
    drawn = {i: sample_principles(principles, cfg.n_revisions, cfg.seed, items[i].id) for i in red}
    critiques: dict[int, list[str]] = {i: [] for i in red}
    revisions: dict[int, list[str]] = {i: [] for i in red}
    revisions_finished: dict[int, list[bool]] = {i: [] for i in red}
    for r in range(cfg.n_revisions):
        chats = [critique_messages(c, conversations[i], latest[i], drawn[i][r], r + 1, few_shot) for i in red]
        outs = generate(*reviser, chats, seed=derive_seed(seed, "critique", r), desc=f"critiques {r + 1}", **gen)
        n_tokens += sum(len(o.token_ids) for o in outs)
        for i, o in zip(red, outs):
            critiques[i].append(o.text)
        chats = [revision_messages(c, conversations[i], latest[i], drawn[i][r], critiques[i][-1], r + 1, few_shot) for i in red]
        outs = generate(*reviser, chats, seed=derive_seed(seed, "revision", r), desc=f"revisions {r + 1}", **gen)
        for i, o in zip(red, outs):
            revisions[i].append(o.text)
            revisions_finished[i].append(o.finished)
            if o.text.strip():  # an empty revision keeps the previous answer as the one to improve
                latest[i], latest_finished[i] = o.text, o.finished
        n_tokens += sum(len(o.token_ids) for o in outs)

    rows = []
    for i, it in enumerate(items):
        if it.kind == "red_team":
            rows.append({
                "id": it.id,
                "prompt": it.prompt,
                "messages": [*conversations[i], {"role": "assistant", "content": latest[i]}],
                "initial_response": answers[i].text,
                "critiques": critiques[i],
                "revisions": revisions[i],
                "revisions_finished": revisions_finished[i],
                "principle_ids": [p.id for p in drawn[i]],
                "kind": it.kind,
                "finished": latest_finished[i],
            })
            continue
        for k, answer in enumerate(helpful_answers[i]):  # the first sample keeps the prompt's id
            rows.append({
                "id": it.id if k == 0 else f"{it.id}:{k + 1}", "prompt": it.prompt,
                "messages": [*conversations[i], {"role": "assistant", "content": answer.text}],
                "initial_response": answer.text, "critiques": [], "revisions": [], "revisions_finished": [],
                "principle_ids": [], "kind": it.kind, "finished": answer.finished,
            })
    return rows, n_tokens


def _features():
    from datasets import Features, List, Value

    text, texts = Value("string"), List(Value("string"))
    return Features({
        "id": text, "prompt": text, "messages": List({"role": text, "content": text}), "initial_response": text,
        "critiques": texts, "revisions": texts, "revisions_finished": List(Value("bool")), "principle_ids": texts,
        "kind": text, "finished": Value("bool"),
    })


@hydra.main(config_path=CONFIG_PATH, config_name=STAGE, version_base=None)
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg)


if __name__ == "__main__":
    run_app(main, f"cai {STAGE}")
