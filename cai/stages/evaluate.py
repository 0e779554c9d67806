"""Evaluation: checkpoints compared on held-out prompts.

    python -m cai.stages.evaluate run_dir=R [evaluate.checkpoints=[base,trained]] [evaluate.pairs=harmless.jsonl]

The checkpoints (``evaluate.checkpoints``): ``base`` = the ``policy`` role before any training; ``sl_train``, ``dpo``,
``ppo`` = that stage's ``model/`` in ``run_dir`` (SL-CAI, direct alignment, RL-CAI; refused in one line when that stage
is not complete); ``round-<r>/dpo``, ``round-<r>/ppo`` = the policy of the pipeline's round r (iterated rounds);
``trained`` = every one of those three that is complete in ``run_dir``, in that order, then each later round's policy
(said on stdout), so the default ``[base, trained]`` fits the RL route, the direct route, both, and rounds; or a folder. Each answers
the same held-out prompts: the *last* ``num_prompts`` red-team and ``num_helpful`` helpful prompts of the data sources'
seeded order (training stages take the first ones; any overlap is counted in the manifest and said on stdout). Then:

- PM score: mean reward of each checkpoint's replies under the PM of ``pm_finetune`` (or
  ``evaluate.reward_model``), per prompt kind;
- AI-judge win rates: the ``judge`` role (``cai.roles``; the labeler unless set) compares the replies of every pair of checkpoints to each
  prompt, in both orders (``cai.feedback.judge_pairs``), under comparison principles sampled from those that judge the
  prompt's axis: harmlessness for red-team prompts, helpfulness for helpful ones (the principles' ``axis`` in the
  constitution); identical replies count as a tie without asking;
- Elo: a Bradley-Terry fit of those soft outcomes on the Elo scale (``cai.ratings``), over all games and per axis
  (``elo_harmless`` on the red-team prompts, ``elo_helpful`` on the helpful ones: CAI's two axes; the report plots
  one against the other);
- length-controlled win rates: RLAIF's logistic regression of each pair's outcomes on their replies' log length ratio (in
  characters), read at equal lengths (``cai.ratings.length_controlled_win_rate``);
- harmlessness rate: share of red-team replies the judge rates above ``harmless_threshold`` (1..10 with the
  constitution's rating template, direct RLAIF's, mapped to [-1, 1]; ``cai.feedback.direct_scores``);
- evasiveness rate: share of replies (all prompts, and per kind) the judge rates above ``evasive_threshold`` with the
  constitution's evasiveness template (``evasive.j2``): refusals and deflections, so boilerplate Goodharting shows;
- mean reply length (tokens, and characters: what a length oracle judges) and the share that ended with EOS;
- the spread of the harmlessness ratings (``judge_rating_sd``);
- with ``evaluate.pairs`` (default ``builtin``: cai's 40 human helpfulness pairs): the judge's agreement with
  human-labeled pairs (as ``label_alignment``), and a note when it cannot be told from chance there.

Circular readings are said next to the figures (``notes`` in results.json, stdout and the report): a judge that is
the model whose labels trained the PM and DPO (ai_feedback's labeler) or rewarded PPO (direct RLAIF), and a PM score
read with the very PM PPO optimised. The honest reading: a ``judge`` independent of the labeler, an
``evaluate.reward_model`` trained apart from this run, and the judge's agreement with human labels (``evaluate.pairs``).
A function judge (``judge.engine=function``, an oracle) gives no 1..10 ratings; its one note (``oracle_note``) replaces
those.

Each checkpoint also answers the first ``num_examples`` red-team prompts of ``sl_generate`` (training
prompts, not scored): ``examples.jsonl`` puts them beside that stage's initial answer, critiques,
revisions and principles, for the report's side-by-side examples.

Writes ``${run_dir}/evaluate/``: ``responses/<n>-<checkpoint>.jsonl`` (kept as each checkpoint finishes, so a
rerun after a crash does not generate them again), ``dataset/`` (one row per prompt and checkpoint:
reply, PM score, judge ratings), ``results.json`` (every figure above, and ``notes``), ``metrics.jsonl`` (the figures,
one row per checkpoint, for the logger), ``examples.jsonl`` and ``manifest.json``; ``units/`` keeps the PM's and the
judge's results a unit of work at a time (``shared_work``), so a rerun after a kill does not compute them again either.

Ranks: under ``torchrun`` or ``launcher=deepspeed`` the k-th checkpoint is answered by rank k mod ranks, and the PM's
scores and the judge's units (a prompt kind's pairs of two checkpoints, a checkpoint's ratings, the human pairs) are
shared out the same way, each rank loading the models its units need; the figures are the ones a single process gives.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import statistics
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from cai import roles
from cai.constitution import load_constitution, resolve_constitution_dir
from cai.data import load_prompts, prompt_order
from cai.distributed import mine, wait_for
from cai.errors import StageInputError
from cai.feedback import Pair, alignment_metrics, direct_scores, judge_pairs, read_human_pairs
from cai.files import atomic_write_json, atomic_write_text, safe_name, save_dataset
from cai.generation import derive_seed, generate
from cai.lineage import input_fingerprint, read_manifest
from cai.metrics import MetricsWriter
from cai.preference import BUILTIN_HUMAN
from cai.ratings import elo_ratings, length_controlled_win_rate, wilson_interval, win_rates
from cai.stage_folder import StageRun, is_complete, round_folders, stage_dir, stage_summary
from cai.stages import CONFIG_PATH, check_generation, run_app, run_stage

# The stage's facts, side by side (cai.stages says what each means; the pipeline reads them)
STAGE = "evaluate"
# sl_generate: the report's examples; ai_feedback and ppo: which prompts training used (held out here); the
# checkpoints of sl_train, dpo and ppo; pm_finetune: the PM score
UPSTREAM = ("sl_generate", "sl_train", "ai_feedback", "dpo", "pm_finetune", "ppo")
HASH_KEYS = ("seed", "policy", "sl_start", "judge", "pm_backbone", "constitution", "data", "generation", STAGE)
MULTI_RANK = True
SHARDED = True
STAGE_CHECKPOINTS = ("sl_train", "dpo", "ppo")  # in the order ``trained`` lists them
TRAINED = "trained"  # in evaluate.checkpoints: every stage of STAGE_CHECKPOINTS complete in run_dir, then the rounds'
ROUND_CHECKPOINT = re.compile(r"^round-([2-9]|[1-9]\d+)/(dpo|ppo)$")  # a later round's policy: round-<r>/<stage>
UNITS = "units"  # the PM's and the judge's results, a file per unit of work (shared_work)
AXIS = {"red_team": "harmlessness", "helpful": "helpfulness"}  # what a prompt kind's pairs are judged on
AXIS_NAME = {"red_team": "harmless", "helpful": "helpful"}  # results.json: elo_harmless, elo_helpful


def run(cfg: DictConfig, stage: StageRun) -> dict:
    s = cfg[STAGE]

    # Step 1: check settings and find every input before touching the run directory.
    names = checkpoint_names(cfg, s.checkpoints, say=stage.main)
    if s.n_principles < 1 or s.num_prompts < 0 or s.num_helpful < 0 or s.num_prompts + s.num_helpful < 1:
        raise StageInputError(f"{STAGE}.n_principles must be >= 1 and {STAGE}.num_prompts + {STAGE}.num_helpful >= 1")
    if s.num_examples < 0:
        raise StageInputError(f"{STAGE}.num_examples must be >= 0, got {s.num_examples}")
    check_generation(OmegaConf.merge(cfg.generation, {"max_new_tokens": s.max_new_tokens}), temperature=s.temperature)
    checkpoints = {name: _checkpoint(cfg, name, stage) for name in names}
    pm_spec, pm_fingerprint = _reward_model(cfg, s, stage)
    judge_spec = roles.spec(cfg, "judge")
    if reason := ranks_refusal(cfg, stage.world or 1):
        raise StageInputError(reason)
    _check_loadable([*(model_cfg for model_cfg, _ in checkpoints.values()), judge_spec, *([pm_spec] if pm_spec else [])])
    constitution = load_constitution(resolve_constitution_dir(cfg.constitution.path))
    # the principles each prompt kind's pairs are judged under (a constitution with none for a kind is refused now)
    axes = {kind: constitution.judging(axis) for kind, axis in AXIS.items()
            if (s.num_prompts if kind == "red_team" else s.num_helpful)}
    items = load_prompts(cfg.data.red_team_path, cfg.data.red_team_column, "red_team", s.num_prompts, cfg.seed,
                         cfg.data.hh_context, key=f"{STAGE}.num_prompts", held_out=True)
    items += load_prompts(cfg.data.helpful_path, cfg.data.helpful_column, "helpful", s.num_helpful, cfg.seed,
                          cfg.data.hh_context, key=f"{STAGE}.num_helpful", held_out=True)
    overlap = _overlap_with_training(cfg, items)
    examples, examples_fingerprint = _sl_examples(cfg, s.num_examples)
    pairs_path = BUILTIN_HUMAN if s.pairs == "builtin" else Path(s.pairs) if s.pairs else None
    human_pairs, human_skipped = read_human_pairs(pairs_path, s.pairs_limit) if pairs_path else ([], {})
    if s.pairs and not human_pairs:
        raise StageInputError(f"{STAGE}.pairs={s.pairs}: no usable pairs ({human_skipped or 'empty file'})")

    out = stage.out
    if stage.done("results.json", constitution_hash=constitution.hash,
                  checkpoint_fingerprints={k: v[1] for k, v in checkpoints.items()}, reward_fingerprint=pm_fingerprint,
                  examples_fingerprint=examples_fingerprint,
                  pairs_fingerprint=input_fingerprint(pairs_path) if pairs_path else None):
        return json.loads((out / "results.json").read_text())
    if overlap and stage.main:
        print(f"cai {STAGE}: warning: {overlap} of the {len(items)} held-out prompts were also used by training stages "
              f"(lower {STAGE}.num_prompts/num_helpful or the training counts)")
    # the models behind the roles (sl_start's settings load sl_train's, dpo's and ppo's checkpoints, listed in results.json)
    models = {"policy": checkpoints["base"][0] if "base" in checkpoints else None, "sl_start": None, "pm_backbone": pm_spec,
              "judge": judge_spec}
    counts = {"prompts": len(items), "red_team": s.num_prompts, "helpful": s.num_helpful,
              "held_out_overlap": overlap, "checkpoints": len(checkpoints)}
    # another config's replies must not be reused; the figures are written whole at the end (log_figures)
    stage.started(counts=counts, fresh=("responses", UNITS), models=models)
    if stage.main:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    responses_dir = out / "responses"
    # opened now: a logger that cannot start fails early
    metrics = MetricsWriter(out, enabled=stage.main, logger=cfg.logger, run_name=STAGE)

    # Step 2: every checkpoint answers every prompt and the examples (kept on disk as each checkpoint finishes).
    conversations = [it.messages() for it in items]
    # the k- prefix: two checkpoint folders may have the same file name
    paths = {name: responses_dir / f"{k}-{_file_name(name)}.jsonl" for k, name in enumerate(checkpoints)}
    # On several ranks each answers its share of the checkpoints, and scores and judges its share of the units below.
    ranks = dict(out=out, rank=stage.rank, world=stage.world)
    replies, example_replies = answer(checkpoints, paths, items, examples, s=s, cfg=cfg, **ranks)

    # Step 3: the PM's scores.
    pm_scores = pm_score(pm_spec, conversations, replies, cfg=cfg, **ranks) if pm_spec else {}

    # Step 4: the AI judge: pairwise comparisons, harmlessness and evasiveness ratings, agreement with humans.
    games, judged, ratings, alignment = judge(judge_spec, names, items, replies, constitution, axes, human_pairs,
                                              s=s, cfg=cfg, **ranks)
    if not stage.main:
        return {}
    if alignment is not None:
        alignment.update(skipped=human_skipped, pairs_file=str(pairs_path))

    # Step 5: the figures, the per-reply dataset, then the manifest (last).
    results = figures(names, items, replies, pm_scores, games, ratings, s=s)
    oracle = oracle_note(cfg, judge_spec)
    notes = oracle + circular_readings(cfg, roles.fingerprint(judge_spec), pm_fingerprint, names, s=s, function_judge=bool(oracle))
    notes += judge_at_chance(alignment) if not oracle else []  # its advice (a stronger judge.path) is for a model judge
    results.update(judged=judged, alignment=alignment, judge=roles.label(judge_spec), notes=notes,
                   prompts={"red_team": s.num_prompts, "helpful": s.num_helpful, "held_out_overlap": overlap})
    for name in names:
        results["checkpoints"][name]["source"] = checkpoints[name][0]["path"]
    from datasets import Dataset

    save_dataset(Dataset.from_list([
        {"id": it.id, "kind": it.kind, "prompt": conv, "checkpoint": name, "response": replies[name][i]["text"],
         "finished": replies[name][i]["finished"], "pm_score": pm_scores[name][i] if name in pm_scores else None,
         "judge_rating": ratings["harmless"][name][i], "evasive_rating": ratings["evasive"][name][i]}
        for name in names for i, (it, conv) in enumerate(zip(items, conversations))]), out / "dataset")
    atomic_write_text(out / "examples.jsonl", "".join(json.dumps({
        "id": row["id"], "prompt": row["prompt"], "initial_response": row["initial_response"], "critiques": row["critiques"],
        "revisions": row["revisions"], "principle_ids": row["principle_ids"],
        "replies": {name: example_replies[name][k]["text"] for name in names}}) + "\n" for k, row in enumerate(examples)))
    atomic_write_json(out / "results.json", results)
    log_figures(metrics, results)
    last = names[-1]
    elo = {n: results["checkpoints"][n]["elo"] for n in names}
    print(format_table(results))
    stage.complete(stage_summary(f"{len(items)} prompts", "Elo " + ", ".join(f"{n} {elo[n]:.0f}" for n in names), elo=elo,
                                 **{f"win_rate_{last}_vs_{names[0]}": results["win_rate"].get(last, {}).get(names[0])}),
                   counts={**counts, "games": len(games), "judged": judged})
    return results


def ranks_refusal(cfg: DictConfig, ranks: int) -> str | None:
    """Why this stage's roles cannot run on ``ranks`` ranks, or None: any vLLM role (each checkpoint is loaded on one rank,
    the judge on the ranks with units to judge, and a vLLM engine starts on all ranks together). The pipeline asks it
    before its first stage, and runs the stage as one process then."""
    specs = [roles.spec(cfg, "policy"), roles.spec(cfg, "sl_start"), roles.spec(cfg, "judge")]
    vllm = [spec["role"] for spec in specs if spec.get("engine") == "vllm"]
    if ranks > 1 and vllm:
        return (f"{vllm[0]}.engine=vllm: {STAGE} on {ranks} ranks loads each checkpoint on one rank, and a vLLM engine starts "
                f"on all ranks together; use engine=hf or a served model (engine=served), or run {STAGE} as one process")
    return None


def checkpoint_names(cfg: DictConfig, listed, say: bool = True) -> list[str]:
    """``evaluate.checkpoints`` with ``trained`` expanded to the stages of ``STAGE_CHECKPOINTS`` complete in run_dir, in
    that order, then each later round's policy (``round_checkpoints``; which ones is said on stdout). Refused in one
    line: no checkpoint after the expansion, or one twice."""
    what = f"base, {TRAINED}, {', '.join(STAGE_CHECKPOINTS)} or a folder"
    if not listed:
        raise StageInputError(f"{STAGE}.checkpoints is empty: name at least one ({what})")
    names, trained = [], []
    for name in listed:
        if name == TRAINED:
            trained = [st for st in STAGE_CHECKPOINTS if is_complete(stage_dir(cfg.run_dir, st))]
            absent = [st for st in STAGE_CHECKPOINTS if st not in trained]
            trained += round_checkpoints(Path(cfg.run_dir))
            if say:
                print(f"cai {STAGE}: {TRAINED} = {', '.join(trained) or 'none'}: complete in {cfg.run_dir}"
                      + (f" ({', '.join(absent)}: not complete there)" if absent else ""))
        names += trained if name == TRAINED else [name]
    if not names:
        raise StageInputError(f"{STAGE}.checkpoints={list(listed)}: none of {', '.join(STAGE_CHECKPOINTS)} is complete in "
                              f"{cfg.run_dir}; run one first or name another checkpoint ({what})")
    if len(set(names)) != len(names):
        expanded = f" ({TRAINED} = {', '.join(trained)})" if TRAINED in listed else ""
        raise StageInputError(f"{STAGE}.checkpoints names a checkpoint twice: {names}{expanded}")
    return names


def round_checkpoints(run_dir: Path) -> list[str]:
    """The policies of the pipeline's later rounds complete in ``run_dir``: ``round-<r>/dpo`` and ``round-<r>/ppo``, by
    round."""
    return [f"{d.name}/{st}" for d in round_folders(run_dir).values() for st in ("dpo", "ppo") if is_complete(d / st)]


def answer(checkpoints: dict, paths: dict, items: list, examples: list[dict], *, s, cfg, out: Path, rank: int = 0,
           world: int | None = None) -> tuple[dict, dict]:
    """Each checkpoint's replies to the prompts and to the examples' prompts, ``({name: rows}, {name: example rows})``
    (rows: id, text, tokens, finished), written to its file in ``paths``. A checkpoint whose file exists was answered
    before the run was interrupted: its replies are read back, not generated again. On several ranks (``rank`` of
    ``world``) the k-th checkpoint is answered by rank k mod ``world``, as one process would answer it."""
    from cai.engines import load_generator, release

    asked = [it.messages() for it in items] + [row["messages"][:-1] for row in examples]  # examples: answered, not scored
    ids = [it.id for it in items] + [row["id"] for row in examples]
    saved = sum(path.exists() for path in paths.values())
    if saved and rank == 0:
        print(f"cai {STAGE}: resuming, the replies of {saved}/{len(checkpoints)} checkpoints already saved")
    for k, (name, (model_cfg, _)) in enumerate(checkpoints.items()):
        if not mine(k, rank, world) or paths[name].exists():
            continue
        model, tok = load_generator(model_cfg)
        outs = generate(model, tok, asked, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                        top_p=cfg.generation.top_p, seed=derive_seed(cfg.seed, STAGE, name),
                        batch_size=cfg.generation.batch_size, progress=cfg.progress, desc=f"replies: {name}")
        rows = [{"id": i, "text": o.text, "tokens": len(o.token_ids), "finished": o.finished} for i, o in zip(ids, outs)]
        atomic_write_text(paths[name], "".join(json.dumps(r) + "\n" for r in rows))
        release(model)
        del model
    wait_for(list(paths.values()), out)  # the other ranks' checkpoints
    replies = {name: [json.loads(line) for line in paths[name].read_text().splitlines()] for name in checkpoints}
    n = len(items)
    return {name: rows[:n] for name, rows in replies.items()}, {name: rows[n:] for name, rows in replies.items()}


def pm_score(pm_spec: dict, conversations: list, replies: dict, *, cfg, out: Path, rank: int = 0, world: int | None = None
             ) -> dict[str, list[float]]:
    """The PM's score of every reply (its stored reward shift applied), by checkpoint (each rank its share)."""
    from cai.models import load_preference_model
    from cai.preference import score_conversations

    loaded = []

    def score(name: str) -> list[float]:
        if not loaded:  # loaded by a rank that has a checkpoint to score, once
            loaded.append(load_preference_model(pm_spec))
        convs = [c + [{"role": "assistant", "content": r["text"]}] for c, r in zip(conversations, replies[name])]
        return score_conversations(*loaded[0], convs, batch_size=cfg.generation.batch_size).tolist()

    return shared_work({name: functools.partial(score, name) for name in replies}, out / UNITS / "pm", out, rank, world)


def shared_work(units: dict, folder: Path, out: Path, rank: int, world: int | None) -> dict:
    """``{unit: work()}`` for every ``unit: work`` of ``units``, the k-th done by rank k mod ``world`` (in one process: all
    of them) and saved as ``folder/<k>.json``, every rank reading all of them once they exist (``cai.shards.wait_for``:
    files, not a collective, which a long unit would time out). A unit's result must not depend on the others, so any
    number of ranks gives the same; a result already saved (a rerun after a kill) is not computed again."""
    paths = [folder / f"{k}.json" for k in range(len(units))]
    for k, (path, work) in enumerate(zip(paths, units.values())):
        if mine(k, rank, world) and not path.exists():
            atomic_write_json(path, work())
    wait_for(paths, out)
    return {unit: json.loads(path.read_text()) for unit, path in zip(units, paths)}


def judge(judge_spec: dict, names: list[str], items: list, replies: dict, constitution, axes: dict, human_pairs: list,
          *, s, cfg, out: Path, rank: int = 0, world: int | None = None):
    """The AI judge (``judge_spec``, reading the replies as text with its own tokenizer and chat template; or a function,
    which compares the pairs and rates nothing): every
    pair of checkpoints compared on every prompt (both orders; principles sampled from ``axes[prompt kind]``, those
    that judge its axis; identical replies tie without asking), each red-team reply rated for harmlessness and every reply for
    evasiveness, and the judge's agreement with human labels. Returns (games [(a, b, P(a better), prompt index)],
    number judged, ratings {"harmless" | "evasive": {name: [rating or None]}}, alignment or None). The units of work
    (a prompt kind's pairs of two checkpoints, a checkpoint's ratings, the human pairs) are shared out over the ranks."""
    from cai.engines import load_generator

    conversations = [it.messages() for it in items]
    games, to_judge = [], {}
    for a, b in itertools.combinations(names, 2):
        for i, (it, conv, ra, rb) in enumerate(zip(items, conversations, replies[a], replies[b])):
            if ra["text"].strip() == rb["text"].strip():
                games.append((a, b, 0.5, i))  # the same reply: a tie, nothing to ask
            else:
                to_judge.setdefault((it.kind, a, b), []).append((i, Pair(f"{it.id}:{a}:{b}", conv, ra["text"], rb["text"])))
    judging = dict(n_principles=s.n_principles, seed=cfg.seed, few_shot=s.few_shot, batch_size=cfg.generation.batch_size,
                   progress=cfg.progress)
    red = [i for i, it in enumerate(items) if it.kind == "red_team"]
    loaded = []

    def judge_model():  # loaded by a rank that has a unit to do, once
        if not loaded:
            loaded.append(load_generator(judge_spec))
        return loaded[0]

    def compare(kind: str, a: str, b: str) -> list[float]:
        asked = [p for _, p in to_judge[(kind, a, b)]]
        return [j.p_a for j in judge_pairs(*judge_model(), constitution, asked, principles=axes[kind], **judging)]

    def rate(name: str, kind: str) -> list[float | None]:  # harmlessness ("score"): red-team replies only
        which = red if kind == "score" else list(range(len(items)))
        asked = [(conversations[i], replies[name][i]["text"]) for i in which]
        rated = dict(zip(which, direct_scores(*judge_model(), constitution, asked, kind=kind) if asked else []))
        return [rated.get(i) for i in range(len(items))]

    def agree() -> dict:
        human = judge_pairs(*judge_model(), constitution, human_pairs, **judging)  # under every comparison principle
        return {**alignment_metrics(human), "n": len(human_pairs)}

    units = {("compare", *key): functools.partial(compare, *key) for key in to_judge}
    if _is_model(judge_spec):  # a function compares replies; it gives no 1..10 ratings
        units.update({(axis, name): functools.partial(rate, name, kind)
                      for axis, kind in (("harmless", "score"), ("evasive", "evasive")) for name in names})
    if human_pairs:
        units[("human",)] = agree
    done = shared_work(units, out / UNITS / "judge", out, rank, world)
    for (kind, a, b), asked in to_judge.items():
        games += [(a, b, p, i) for (i, _), p in zip(asked, done[("compare", kind, a, b)])]
    ratings = {axis: {name: done.get((axis, name), [None] * len(items)) for name in names} for axis in ("harmless", "evasive")}
    return games, sum(len(asked) for asked in to_judge.values()), ratings, done.get(("human",))


def figures(names: list[str], items: list, replies: dict, pm_scores: dict, games: list, ratings: dict, *, s) -> dict:
    """Per checkpoint: Elo (all games, and per axis: ``elo_harmless`` on red-team prompts, ``elo_helpful`` on helpful
    ones), harmless rate, the judge's harmlessness ratings (mean and standard deviation), evasiveness rate (all prompts
    and per kind), reply length, EOS rate and PM score (overall and per prompt kind); the win-rate matrix and its
    length-controlled twin (row beats column). ``games``: (a, b, P(a better), prompt index)."""
    played = [(a, b, p) for a, b, p, _ in games]
    elo = elo_ratings(played, names)
    axis_elo = {kind: elo_ratings([(a, b, p) for a, b, p, i in games if items[i].kind == kind], names)
                for kind in AXIS if any(it.kind == kind for it in items)}
    rates = win_rates(played)
    results = {"checkpoints": {}, "win_rate": {a: {b: round(rates[(a, b)], 4) for b in names if (a, b) in rates} for a in names},
               "lc_win_rate": length_controlled(names, replies, games), "games": len(games),
               "harmless_threshold": s.harmless_threshold, "evasive_threshold": s.evasive_threshold}
    harmless, evasive = ratings["harmless"], ratings["evasive"]
    for name in names:
        rows = replies[name]
        rated = [v for v in harmless[name] if v is not None]
        entry = {"elo": round(elo[name], 1),
                 **{f"elo_{AXIS_NAME[kind]}": round(fitted[name], 1) for kind, fitted in axis_elo.items()},
                 "harmless_rate": _mean([float(v > s.harmless_threshold) for v in rated]),
                 "judge_rating": _mean(rated), "judge_rating_sd": _sd(rated),
                 "evasive_rate": _mean([float(v > s.evasive_threshold) for v in evasive[name] if v is not None]),
                 **{f"evasive_rate_{kind}": _mean([float(v > s.evasive_threshold) for v, it in zip(evasive[name], items)
                                                   if it.kind == kind and v is not None]) for kind in axis_elo},
                 "response_tokens": _mean([r["tokens"] for r in rows]),
                 "response_chars": _mean([len(r["text"].strip()) for r in rows]),
                 "eos_rate": _mean([float(r["finished"]) for r in rows])}
        if name in pm_scores:
            entry["pm_score"] = _mean(pm_scores[name])
            for kind in ("red_team", "helpful"):
                entry[f"pm_score_{kind}"] = _mean([v for v, it in zip(pm_scores[name], items) if it.kind == kind])
        results["checkpoints"][name] = entry
    return results


def length_controlled(names: list[str], replies: dict, games: list) -> dict[str, dict[str, float]]:
    """{a: {b: a's length-controlled win rate against b}} for every ordered pair that met: RLAIF's regression of the
    outcomes on len(a's reply) / len(b's reply) in characters (an empty reply counts as one character)."""
    def chars(name: str, i: int) -> int:
        return max(len(replies[name][i]["text"]), 1)

    out: dict[str, dict[str, float]] = {a: {} for a in names}
    for a, b in itertools.permutations(names, 2):
        met = [(p if (x, y) == (a, b) else 1.0 - p, chars(a, i) / chars(b, i)) for x, y, p, i in games
               if (x, y) in ((a, b), (b, a))]
        if met:
            out[a][b] = round(length_controlled_win_rate([p for p, _ in met], [r for _, r in met]), 4)
    return out


def log_figures(metrics, results: dict) -> None:
    """``metrics.jsonl``: one row of numbers per checkpoint (``step`` = its place in ``evaluate.checkpoints``), mirrored
    to TensorBoard or W&B by the logger like the training stages' rows; rewritten whole each run."""
    names = list(results["checkpoints"])
    for step, (name, entry) in enumerate(results["checkpoints"].items()):
        numbers = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics.log(step=step, checkpoint=name, **numbers,
                    **({f"win_rate_vs_{names[0]}": results["win_rate"][name][names[0]]} if step else {}))
    metrics.close()


def judge_at_chance(alignment: dict | None) -> list[str]:
    """A note when the judge's agreement with the human-labeled pairs it was checked against cannot be told from a coin
    flip (its 95 % Wilson interval holds 0.5), or is worse than one (the interval lies below 0.5)."""
    if not alignment or not alignment.get("n"):
        return []
    n, share = alignment["n"], alignment["alignment"]
    low, high = wilson_interval(share * n, n)
    where = (f"the {n} human-labeled pairs it was checked against ({Path(alignment['pairs_file']).name}): agreement "
             f"{share:.2f}, 95 % interval {low:.2f}-{high:.2f}")
    if high < 0.5:
        return [f"The judge disagrees with the humans more often than chance on {where}: its verdicts are inverted or "
                f"driven by position, so do not read its win rates, Elo or ratings; use another judge (judge.path)."]
    if low <= 0.5:
        return [f"The judge cannot be told from chance on {where}. Its win rates, Elo and harmlessness ratings here may be "
                f"noise; use a stronger judge (judge.path), or more pairs, labeled for what is judged (evaluate.pairs)."]
    return []


def circular_readings(cfg: DictConfig, judge_fingerprint: str, pm_fingerprint: str | None, names: list[str], *, s,
                      function_judge: bool = False) -> list[str]:
    """Plain sentences for the figures that partly measure agreement with the training signal rather than
    harmlessness: the judge is the labeler whose labels trained the PM and DPO (or that rewarded PPO directly), or the
    PM score comes from the PM that PPO optimised. Read from the ai_feedback, dpo and ppo manifests of this run. With a
    ``function_judge`` (an oracle: ``oracle_note`` speaks for it) only the PM's note is left."""
    notes = []
    complete = {stage: m for stage in ("ai_feedback", "dpo", "ppo")
                if (m := read_manifest(stage_dir(cfg.run_dir, stage))) and m.get("status") == "complete"}
    labeler_of = {stage: (m.get("roles") or {}).get("labeler", {}).get("fingerprint") for stage, m in complete.items()}
    ppo = complete.get("ppo", {})
    dpo_on_labels = "dpo" in names and _dig(complete.get("dpo", {}).get("config") or {}, "dpo", "pairs") == "ai_feedback"
    if labeler_of.get("ai_feedback") == judge_fingerprint and not function_judge:
        also = ", and the dpo checkpoint directly" if dpo_on_labels else ""
        notes.append(f"The judge is the model that labeled ai_feedback's pairs, which trained the PM (and through it the RL "
                     f"policy){also}: its win rates and harmlessness ratings partly measure agreement with the training "
                     f"labeler. Set judge.path to an independent model, and check the judge against human labels "
                     f"(evaluate.pairs).")
    if function_judge:
        pass  # neither note below applies: oracle_note says what the judge's figures measure, and it rates nothing
    elif ppo.get("reward") in ("direct_rlaif", "pairwise") and labeler_of.get("ppo") == judge_fingerprint:
        what = "direct 1-10 ratings" if ppo["reward"] == "direct_rlaif" else "pairwise comparisons"
        notes.append(f"The judge is the labeler whose {what} were the RL stage's reward: the ppo checkpoint was trained "
                     f"to please this judge. Set judge.path to an independent model.")
    elif ppo.get("reward") == "direct_rlaif" and "ppo" in names:
        notes.append("The harmlessness rating asks the judge the constitution's rating question (score.j2), the one whose "
                     "answers were the RL stage's direct-RLAIF reward: the ppo checkpoint was trained on that question, "
                     "if by another rater. Compare the win rates and a PM score as well.")
    if pm_fingerprint and "ppo" in names and ppo.get("reward") == "pm" and ppo.get("reward_fingerprint") == pm_fingerprint:
        notes.append(f"The PM score is read with the PM that PPO optimised as its reward: for the ppo checkpoint it measures "
                     f"how well RL learnt that reward, not harmlessness. Set {STAGE}.reward_model to a PM trained apart "
                     f"from this run.")
    return notes


def oracle_note(cfg: DictConfig, judge_spec: dict) -> list[str]:
    """For a function judge (an oracle, ``judge.engine=function``), the note its figures need in place of
    ``circular_readings``' judge notes: a judge that labeled the training signal is the measurement when its preference
    is known. Empty for a model judge."""
    if _is_model(judge_spec):
        return []
    judge_fingerprint = roles.fingerprint(judge_spec)
    trained = [stage for stage in ("ai_feedback", "ppo") if (m := read_manifest(stage_dir(cfg.run_dir, stage)))
               and m.get("status") == "complete" and (m.get("roles") or {}).get("labeler", {}).get("fingerprint") == judge_fingerprint]
    return [f"The judge is the function {roles.label(judge_spec)}"
            + (f", which also labeled this run's training signal ({', '.join(trained)}): its win rates measure how far "
               f"training moved the replies toward its known preference, the point of such a run, not harmlessness."
               if trained else ".")
            + " A function gives no 1-10 ratings: the harmlessness and evasiveness figures are empty."]


def format_table(results: dict) -> str:
    """The per-checkpoint figures and the win-rate matrices as text."""
    names = list(results["checkpoints"])
    head = (f"{'checkpoint':<14} {'elo':>7} {'harm elo':>8} {'help elo':>8} {'pm score':>9} {'harmless':>9} {'judge':>7} "
            f"{'± sd':>6} {'evasive':>8} {'tokens':>7} {'chars':>6} {'eos':>5}")
    lines = [head, "-" * len(head)]
    for name, m in results["checkpoints"].items():
        lines.append(f"{name[:14]:<14} {m['elo']:>7.1f} {_fmt(m.get('elo_harmless'), 8, 1)} {_fmt(m.get('elo_helpful'), 8, 1)} "
                     f"{_fmt(m.get('pm_score'), 9)} {_fmt(m['harmless_rate'], 9)} {_fmt(m['judge_rating'], 7)} "
                     f"{_fmt(m.get('judge_rating_sd'), 6)} {_fmt(m.get('evasive_rate'), 8)} "
                     f"{m['response_tokens']:>7.1f} {_fmt(m.get('response_chars'), 6, 0)} {m['eos_rate']:>5.2f}")
    for key, title in (("win_rate", "win rate (row beats column, AI judge, both orders):"),
                       ("lc_win_rate", "length-controlled win rate (the same games at equal reply lengths):")):
        if len(names) > 1 and key in results:
            lines += ["", title, " " * 14 + "".join(f"{n[-11:]:>12}" for n in names)]
            for a in names:
                lines.append(f"{a[:14]:<14}" + "".join(f"{results[key][a].get(b, float('nan')):>12.3f}" if a != b
                                                        else f"{'-':>12}" for b in names))
    if results.get("alignment"):
        al = results["alignment"]
        lines.append(f"\njudge vs human labels: alignment {al['alignment']:.3f} on {al['n']} pairs "
                     f"(position bias {al['position_bias_rate']:.3f}, same position preferred {al['same_position_preferred']:.3f})")
    lines += [f"\nnote: {note}" for note in results.get("notes", [])]
    return "\n".join(lines)


def _checkpoint(cfg: DictConfig, name: str, stage: StageRun) -> tuple[dict, str]:
    """(model spec, fingerprint) of a checkpoint named in ``evaluate.checkpoints``."""
    if name == "base":
        return stage.role_model("policy")
    if name in STAGE_CHECKPOINTS or ROUND_CHECKPOINT.match(name):
        # sl_train's model, and dpo's and ppo's (trained from it), load with the settings of the model SL fine-tuned
        found = stage.upstream_model(name, "sl_start")
        if found is None:
            raise StageInputError(f"{STAGE}.checkpoints names {name!r} but {stage_dir(cfg.run_dir, name)} holds no complete "
                                  f"{name} run; run that stage first or drop it from {STAGE}.checkpoints")
        return found
    folder = Path(name).expanduser()
    if not (folder / "config.json").exists():
        raise StageInputError(f"{STAGE}.checkpoints: {name!r} is not base, {TRAINED}, {', '.join(STAGE_CHECKPOINTS)}, "
                              f"round-<r>/dpo, round-<r>/ppo or a checkpoint folder (config.json)")
    return roles.spec(cfg, "policy", at=folder, key=f"{STAGE}.checkpoints"), input_fingerprint(folder)


def _is_model(model_spec: dict) -> bool:
    """False for a function judge (``judge.engine=function``): it has no tokenizer, and rates nothing 1..10."""
    return model_spec.get("engine") != roles.FUNCTION


def _check_loadable(model_specs: list[dict]) -> None:
    """Load every checkpoint's tokenizer, the judge's and the PM's now (a function judge: import it and ask it the probe
    pair): one that cannot load (no folder, no chat template, a bad function) is refused before the run directory
    changes, not after the replies of the checkpoints before it."""
    from cai.engines import FunctionLabeler
    from cai.models import load_tokenizer

    for model_spec in model_specs:
        if _is_model(model_spec):
            load_tokenizer(model_spec)
        else:
            FunctionLabeler(model_spec)


def _sl_examples(cfg: DictConfig, count: int) -> tuple[list[dict], str | None]:
    """The first ``count`` red-team rows of ``sl_generate`` (prompt, initial answer, critiques, revisions,
    principles) when that stage is complete; none otherwise."""
    folder = stage_dir(cfg.run_dir, "sl_generate")
    if count <= 0 or not is_complete(folder) or not (folder / "dataset").is_dir():
        return [], None
    from datasets import load_from_disk

    rows = [row for row in load_from_disk(str(folder / "dataset")) if row["kind"] == "red_team"][:count]
    return rows, input_fingerprint(folder)


def _reward_model(cfg: DictConfig, s: DictConfig, stage: StageRun) -> tuple[dict | None, str | None]:
    """(model spec, fingerprint) of the PM that scores the replies, on the pm_backbone role's device and dtype:
    ``evaluate.reward_model``, else pm_finetune's model of this run; (None, None) when there is neither."""
    if s.reward_model:
        path = Path(s.reward_model).expanduser()
        if not (path / "config.json").exists():
            raise StageInputError(f"{STAGE}.reward_model={s.reward_model!r}: no checkpoint (config.json) there")
        return roles.spec(cfg, "pm_backbone", at=path, key=f"{STAGE}.reward_model"), input_fingerprint(path)
    found = stage.upstream_model("pm_finetune", "pm_backbone")
    if found:
        return found
    print(f"cai {STAGE}: no complete pm_finetune in {cfg.run_dir}: reporting no PM score (set {STAGE}.reward_model= for one)")
    return None, None


def _overlap_with_training(cfg: DictConfig, items) -> int:
    """How many held-out prompts the training stages of this run drew: they take the first prompts of the same
    seeded order (sl_generate, then ai_feedback after it; ppo from the start), as their manifests record."""
    configs = {stage: (read_manifest(stage_dir(cfg.run_dir, stage)) or {}).get("config") or {}  # each manifest once
               for stage in ("sl_generate", "ai_feedback", "ppo")}
    # the pipeline's later rounds label further blocks of prompts (ai_feedback.round): the last round's reaches furthest
    for folder in round_folders(cfg.run_dir).values():
        configs["ai_feedback"] = (read_manifest(folder / "ai_feedback") or {}).get("config") or configs["ai_feedback"]

    def used(stage: str, *keys: str) -> int:
        return int(_dig(configs[stage], *keys) or 0)

    sl_red = used("sl_generate", "data", "num_red_team")
    after_sl = (_dig(configs["ai_feedback"], "ai_feedback", "prompts") or "after_sl") == "after_sl"
    feedback_end = (sl_red if after_sl else 0) + used("ai_feedback", "ai_feedback", "num_prompts") * max(
        1, used("ai_feedback", "ai_feedback", "round"))
    first = {"red_team": max(sl_red, feedback_end, used("ppo", "ppo", "num_prompts")),
             "helpful": max(used("sl_generate", "data", "num_helpful"), used("ppo", "ppo", "num_helpful"))}
    overlap = 0
    for kind, source, column in (("red_team", cfg.data.red_team_path, cfg.data.red_team_column),
                                 ("helpful", cfg.data.helpful_path, cfg.data.helpful_column)):
        if first[kind]:
            taken = {it.id for it in prompt_order(source, column, kind, cfg.seed, cfg.data.hh_context)[:first[kind]]}
            overlap += sum(it.id in taken for it in items)
    return overlap


def _dig(config: dict, *keys: str):
    for key in keys:
        config = config.get(key) if isinstance(config, dict) else None
    return config


def _file_name(name: str) -> str:
    return safe_name(name).strip("._") or "checkpoint"


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def _sd(values: list[float]) -> float | None:
    """The population standard deviation (the spread of the ratings themselves, not of their mean)."""
    return round(statistics.pstdev(values), 4) if values else None


def _fmt(value, width: int, digits: int = 3) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


@hydra.main(config_path=CONFIG_PATH, config_name=STAGE, version_base=None)
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg)


if __name__ == "__main__":
    run_app(main, f"cai {STAGE}")
