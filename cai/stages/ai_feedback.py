"""AI feedback: two sampled responses per prompt, principle-sampled multiple-choice comparison, soft labels.

    python -m cai.stages.ai_feedback run_dir=R [ai_feedback.n_principles=4] [ai_feedback.cot=true]

The policy (``${run_dir}/sl_train/model`` when that stage is complete, else the ``policy`` role) samples two
responses to each red-team prompt: the ones after those SL used (``ai_feedback.prompts=after_sl``), or the SL
prompts themselves (``sl``: CAI made a comparison for each SL-CAI prompt); ``ai_feedback.round=r`` takes the r-th block
of ``num_prompts`` from there (the pipeline's iterated rounds: each labels fresh prompts, sampled by the policy of the
round before, which the pipeline links as the round's ``sl_train``). The ``labeler`` role (``cai.roles``; a model
of its own tokenizer and chat template, reading the responses as text) then sees the pair under
``n_principles`` comparison principles, each in both orders,
and its next-token probabilities of "A" vs "B" after the answer cue — one prefill, no decoding — give
P(first shown is better). Orders are averaged (the labeler's position bias cancels), principles
ensembled (mean). With ``cot`` the labeler first writes a rationale; those probabilities are clamped
to ``cot_clamp`` (the CAI paper clamps them to 40–60 %: a rationale makes the labeler overconfident). A labeler that
is a function (``labeler.engine=function``: ``cai.engines.FunctionLabeler``) is asked each pair in both orders instead.

Writes ``${run_dir}/ai_feedback/``: ``shards/``, ``dataset/`` (TRL's conversational preference format
``prompt``/``chosen``/``rejected`` plus ``p_chosen``, ``p_order_ab``, ``p_order_ba``, ``principle_ids``,
``rationale``, ``response_a``, ``response_b``, ``id``), ``manifest.json``, ``metrics.jsonl``.
``p_order_ab[i]`` is P(response_a better) under principle i with response_a shown as (A);
``p_order_ba[i]`` the same with response_a shown as (B). Pairs whose two responses are identical carry
no preference and are skipped (counted in the manifest). Resumable, and run on several ranks, like sl_generate.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cai import roles
from cai.constitution import load_constitution, resolve_constitution_dir
from cai.data import load_prompts
from cai.errors import StageError, StageInputError
from cai.feedback import Pair, judge_pairs, judging
from cai.files import save_dataset
from cai.generation import derive_seed, generate
from cai.shards import join_shards, run_shards
from cai.stage_folder import StageRun, stage_summary
from cai.stages import CONFIG_PATH, check_generation, run_app, run_stage

# The stage's facts, side by side (cai.stages says what each means; the pipeline reads them)
STAGE = "ai_feedback"
UPSTREAM = ("sl_train",)
HASH_KEYS = ("seed", "policy", "sl_start", "labeler", "constitution", "data", "generation", STAGE)
MULTI_RANK = True
SHARDED = True


def run(cfg: DictConfig, stage: StageRun) -> Path:
    s = cfg[STAGE]

    # Step 1: check the inputs before touching the run directory.
    settings = judging(s, cfg)
    if s.shard_size < 1 or s.num_prompts < 1:
        raise StageInputError(f"{STAGE}.num_prompts and {STAGE}.shard_size must be >= 1")
    if s.prompts not in ("after_sl", "sl"):
        raise StageInputError(f"{STAGE}.prompts must be after_sl or sl, got {s.prompts!r}")
    if not isinstance(s.round, int) or s.round < 1:
        raise StageInputError(f"{STAGE}.round must be an integer >= 1, got {s.round!r}")
    constitution = load_constitution(resolve_constitution_dir(cfg.constitution.path))
    check_generation(cfg.generation, temperature=s.temperature)
    principles = constitution.select("comparison", s.principle_ids, f"{STAGE}.principle_ids")
    # after_sl: the prompts after the ones sl_generate used, so RL-CAI data does not repeat SL-CAI prompts; sl: the
    # first ones of the same order, the SL prompts themselves. Round r (the pipeline's rounds) takes the r-th block after.
    first = (cfg.data.num_red_team if s.prompts == "after_sl" else 0) + (s.round - 1) * s.num_prompts
    key = " + ".join([*(["data.num_red_team"] if s.prompts == "after_sl" else []),
                      f"{STAGE}.round x {STAGE}.num_prompts" if s.round > 1 else f"{STAGE}.num_prompts"])
    items = load_prompts(cfg.data.red_team_path, cfg.data.red_team_column, "red_team", first + s.num_prompts,
                         cfg.seed, cfg.data.hh_context, key=key)[first:]

    # Step 2: which policy samples the responses: the SL-CAI model when it exists, else the policy role.
    # (sl_train's model is loaded with the settings of the model SL fine-tuned)
    policy_spec, policy_fingerprint = stage.upstream_model("sl_train", "sl_start") or stage.role_model("policy")
    labeler_spec = roles.spec(cfg, "labeler")
    if stage.done("dataset", constitution_hash=constitution.hash, policy_fingerprint=policy_fingerprint):
        return stage.out / "dataset"

    # Step 3: the models (before touching the run directory).
    from cai.engines import from_the_groups_first_rank, load_generator, ranks_refusal, tensor_parallel

    if reason := ranks_refusal([policy_spec, labeler_spec], stage.world or 1):
        raise StageInputError(reason)

    labeler, tok = load_generator(labeler_spec, grouped=True)
    same_model = roles.identity(policy_spec) == roles.identity(labeler_spec)
    policy, policy_tok = (labeler, tok) if same_model else load_generator(policy_spec, grouped=True)

    # Step 4: resume or start over, as in sl_generate.
    stage.started(counts={"prompts": len(items)}, fresh=("shards", "metrics.jsonl"), policy=str(policy_spec["path"]),
                  models={"policy": policy_spec, "sl_start": None})  # the model that sampled, whichever role it came from

    # Step 5: shard by shard (cai.shards; on several ranks, each its share): sample pairs, judge them, save.
    def make_rows(k: int, shard: list) -> tuple[list[dict], dict]:
        t0 = time.time()
        conversations = [it.messages() for it in shard for _ in range(2)]  # each prompt twice: a pair
        outs = generate(policy, policy_tok, conversations, max_new_tokens=cfg.generation.max_new_tokens,
                        temperature=s.temperature, top_p=cfg.generation.top_p, batch_size=cfg.generation.batch_size,
                        seed=derive_seed(cfg.seed, STAGE, k), progress=cfg.progress, desc="responses")
        outs = from_the_groups_first_rank(labeler, outs)  # a labeler split over ranks judges its group's first rank's pairs
        pairs = [Pair(it.id, it.messages(), outs[2 * j].text, outs[2 * j + 1].text) for j, it in enumerate(shard)]
        kept = [p for p in pairs if p.response_a.strip() != p.response_b.strip()]
        judgements = judge_pairs(labeler, tok, constitution, kept, principles=principles, **settings)
        rows = [preference_row(p, j) for p, j in zip(kept, judgements)]
        asked = sum(2 * len(j.p_order_ab) for j in judgements)  # both orders of each principle (a function: of one)
        rate = asked / max(time.time() - t0, 1e-9)
        return rows, {"skipped_identical": len(pairs) - len(kept), "comparisons_per_s": round(rate, 3)}

    shards = [items[i:i + s.shard_size] for i in range(0, len(items), s.shard_size)]
    records = run_shards(stage.out, shards, make_rows, features=_features(), stage=STAGE, progress=cfg.progress,
                         logger=cfg.logger, rank=stage.rank, world=stage.world,
                         group_size=tensor_parallel([policy_spec, labeler_spec]))
    if not stage.main:
        return stage.out / "dataset"

    # Step 6: rank 0 joins the shards; the manifest is written last.
    dataset = join_shards(stage.out, records)
    if dataset is None:
        raise StageError(f"all {len(items)} response pairs were identical: nothing to label "
                         f"(sample more diversely: {STAGE}.temperature, generation.top_p)")
    skipped = sum(r["skipped_identical"] for r in records)
    if len(set(dataset["id"])) != len(dataset) or len(dataset) + skipped != len(items):
        raise RuntimeError(f"{stage.out / 'shards'}: shards do not add up to {len(items)} prompts; delete the folder and rerun")
    save_dataset(dataset, stage.out / "dataset")
    confident = [max(p, 1 - p) for p in dataset["p_chosen"]]
    mean_confidence = round(sum(confident) / max(len(confident), 1), 4)
    stage.complete(stage_summary(f"{len(dataset)} pairs", f"mean confidence {mean_confidence}", mean_confidence=mean_confidence,
                                 mean_p_chosen=round(sum(dataset["p_chosen"]) / max(len(dataset), 1), 4)),
                   counts={"pairs": len(dataset), "skipped_identical_responses": skipped, "shards": len(shards)})
    return stage.out / "dataset"


def ranks_refusal(cfg: DictConfig, ranks: int) -> str | None:
    """Why this stage's roles cannot run on ``ranks`` ranks (``cai.engines.ranks_refusal``), or None; the pipeline asks
    it before its first stage, and runs the stage as one process then. The pairs' sampler is sl_train's model with
    sl_start's settings once that stage is complete, else the policy role: both are asked about."""
    from cai import engines

    return engines.ranks_refusal([roles.spec(cfg, "policy"), roles.spec(cfg, "sl_start"), roles.spec(cfg, "labeler")], ranks)


def preference_row(pair: Pair, judgement) -> dict:
    """One TRL conversational preference row with the labeler's evidence."""
    a_better = judgement.p_a >= 0.5
    chosen, rejected = (pair.response_a, pair.response_b) if a_better else (pair.response_b, pair.response_a)
    return {
        "id": pair.key,
        "prompt": pair.conversation,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "p_chosen": judgement.p_a if a_better else 1.0 - judgement.p_a,
        "p_order_ab": judgement.p_order_ab,
        "p_order_ba": judgement.p_order_ba,
        "principle_ids": judgement.principle_ids,
        "rationale": judgement.rationales,
        "response_a": pair.response_a,
        "response_b": pair.response_b,
    }


def _features():
    from datasets import Features, List, Value

    chat = List({"role": Value("string"), "content": Value("string")})
    return Features({
        "id": Value("string"), "prompt": chat, "chosen": chat, "rejected": chat, "p_chosen": Value("float64"),
        "p_order_ab": List(Value("float64")), "p_order_ba": List(Value("float64")),
        "principle_ids": List(Value("string")), "rationale": List(Value("string")),
        "response_a": Value("string"), "response_b": Value("string"),
    })


@hydra.main(config_path=CONFIG_PATH, config_name=STAGE, version_base=None)
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg)


if __name__ == "__main__":
    run_app(main, f"cai {STAGE}")
