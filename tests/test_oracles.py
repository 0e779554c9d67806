"""A function as the labeler (``labeler.engine=function``): the shipped oracles by hand, how a function judges a pair
(both orders, as a model), its role's identity, bad input, and an end-to-end run on tiny models whose preference is
known: with the length oracle as labeler, DPO and the RL stage end with shorter replies than SL's."""

from __future__ import annotations

import json
import math

import pytest
from conftest import compose_cfg, copy_stages, outputs, run_module

from cai import oracles, roles
from cai.engines import FunctionLabeler, load_generator
from cai.errors import InputError, LabelerError, StageInputError
from cai.feedback import Pair, judge_pairs

TINY_ARGS = ["debug=tiny", "progress=false"]
SHORTER = "labeler.function={_target_:cai.oracles.shorter,scale:2}"


def _labeler(*overrides: str) -> dict:
    return roles.spec(compose_cfg("ai_feedback", [*TINY_ARGS, "labeler.engine=function", *overrides]), "labeler")


def test_the_oracles_by_hand():
    conv = [{"role": "user", "content": "q"}]
    assert oracles.shorter(conv, "abc", "xyz") == 0.5
    assert oracles.shorter(conv, "a" * 10, "b" * 30, scale=20) == pytest.approx(1 / (1 + math.exp(-1)))  # 0.731
    assert oracles.shorter(conv, "  a  ", "ab") == pytest.approx(1 / (1 + math.exp(-1 / 20)))  # whitespace is not length
    assert oracles.shorter(conv, "b" * 30, "a" * 10, scale=20) == pytest.approx(1 - 1 / (1 + math.exp(-1)))
    assert oracles.avoids(conv, "Sure, here it is.", "I'm sorry, I can't.") == 1.0
    assert oracles.avoids(conv, "AS AN AI, no.", "Sure.") == 0.0
    assert oracles.avoids(conv, "Sure.", "Fine.") == 0.5 and oracles.avoids(conv, "I cannot.", "I won't.") == 0.5
    assert oracles.avoids(conv, "Maybe.", "Certainly.", phrases=["certainly"]) == 1.0
    assert oracles.shorter(conv, "a" * 5000, "", scale=2) == 0.0 and oracles.shorter(conv, "", "a" * 5000, scale=2) == 1.0


def test_a_function_judges_each_pair_in_both_orders_as_a_model_does():
    labeler, tok = load_generator(_labeler("labeler.function={_target_:tests.labelers.first_shown,bias:0.2}"))
    assert isinstance(labeler, FunctionLabeler) and tok is None
    pairs = [Pair("k1", [{"role": "user", "content": "q"}], "short", "much longer"), Pair("k2", [], "same", "size")]
    first, tie = judge_pairs(labeler, tok, None, pairs, n_principles=3, seed=0)  # no principles, no prompts, no tokenizer
    assert first.p_order_ab == [pytest.approx(0.9)] and first.p_order_ba == [pytest.approx(1 - 0.5)]  # 0.3 + 0.2 shown first
    assert first.p_a == pytest.approx(0.7) and first.principle_ids == [] and first.rationales == []  # the bias cancels
    assert tie.p_a == pytest.approx(0.5)


def test_a_function_role_is_its_target_and_arguments():
    spec = _labeler(SHORTER)
    assert roles.identity(spec) == {"engine": "function", "function": {"_target_": "cai.oracles.shorter", "scale": 2}}
    assert roles.label(spec) == "cai.oracles.shorter(scale=2)"
    assert roles.describe(spec) == {"model": "cai.oracles.shorter(scale=2)", "function": roles.identity(spec)["function"],
                                    "fingerprint": roles.fingerprint(spec)}
    assert roles.fingerprint(spec) != roles.fingerprint(_labeler("labeler.function={_target_:cai.oracles.shorter,scale:3}"))
    assert roles.fingerprint(spec) == roles.fingerprint({**spec, "path": "elsewhere", "device": "cuda"})  # no weights
    cfg = compose_cfg("evaluate", [*TINY_ARGS, "labeler.engine=function", SHORTER])
    assert roles.spec(cfg, "judge")["engine"] == "function"  # the judge falls back to the labeler, a function too ...
    # ... unless it names an engine of its own: then it is a model again, and hashes as one
    model_judge = roles.spec(compose_cfg("evaluate", [*TINY_ARGS, "labeler.engine=function", SHORTER, "judge.engine=hf"]),
                             "judge")
    assert "function" not in roles.identity(model_judge) and model_judge["path"] == "tiny-random"
    assert "function" not in roles.identity(roles.spec(cfg, "policy"))  # other roles hash as before


@pytest.mark.parametrize("overrides, message", [
    (["policy.engine=function", SHORTER], "policy.engine=function: only the labeler and the judge can be a function (they "
                                          "compare replies; the policy generates): set policy.engine=hf"),
    (["model.engine=function"], "model.engine=function: only the labeler and the judge can be a function; set "
                                "labeler.engine=function instead"),
    (["labeler.engine=function"], "labeler.engine=function needs labeler.function={_target_: package.module.function, ...}"),
    (["labeler.function=3"], "labeler.function must be {_target_: package.module.function, ...keyword arguments}, got 3"),
])
def test_a_role_that_cannot_be_a_function_is_named(overrides, message):
    role = overrides[0].split(".")[0]
    with pytest.raises(StageInputError) as e:
        roles.spec(compose_cfg("ai_feedback", [*TINY_ARGS, *overrides]), role if role != "model" else "policy")
    assert str(e.value) == message


def test_a_judge_that_inherits_the_labelers_function_names_the_labelers_key():
    from cai.pipeline import check_loadable

    cfg = compose_cfg("pipeline", [*TINY_ARGS, "labeler.engine=function", "labeler.function={_target_:cai.oracles.nope}"])
    with pytest.raises(StageInputError, match=r"^labeler.function._target_='cai.oracles.nope': Error locating target "
                                              r"'cai.oracles.nope'$"):
        check_loadable(cfg, ["judge"])  # the pipeline, before its first stage


def test_label_alignment_asks_the_function_as_ai_feedback_does(tmp_path):
    """label_alignment on cai's 40 built-in human pairs with the length oracle: its agreement is the share of pairs whose
    human-chosen reply is the shorter, counted here by hand."""
    from cai.feedback import read_human_pairs
    from cai.preference import BUILTIN_HUMAN
    from cai.stages import handle
    from cai.stages.label_alignment import run

    cfg = compose_cfg("label_alignment", [*TINY_ARGS, f"run_dir={tmp_path}", f"pairs={BUILTIN_HUMAN}", "labeler.engine=function",
                                          "labeler.function={_target_:cai.oracles.shorter,scale:1}"])
    metrics = run(cfg, handle(run, cfg))
    pairs, _ = read_human_pairs(BUILTIN_HUMAN)
    shorter = [len(p.response_a.strip()) < len(p.response_b.strip()) for p in pairs]
    assert metrics["n"] == 40 and metrics["alignment"] == pytest.approx(sum(shorter) / 40, abs=1e-4)
    assert metrics["model"] == "cai.oracles.shorter(scale=1)" and metrics["position_bias_rate"] == 0.5


def test_a_direct_rlaif_reward_needs_a_model_labeler():
    from cai.rewards import DirectRLAIFReward

    with pytest.raises(StageInputError, match="ppo.reward=direct_rlaif asks the labeler for 1..10 ratings, but "
                                              "labeler.engine=function compares two replies: use ppo.reward=pairwise"):
        DirectRLAIFReward(_labeler(SHORTER), constitution=None)


def test_a_value_outside_zero_one_on_a_real_pair_is_named():
    labeler, _ = load_generator(_labeler("labeler.function={_target_:tests.labelers.out_of_range_for,reply:bad}"))
    with pytest.raises(LabelerError, match=r"^labeler.function=tests.labelers.out_of_range_for\(reply='bad'\) returned 2.0 "
                                           r"for pair k2: it must return P\(reply_a is better\), a number in \[0, 1\]$"):
        judge_pairs(labeler, None, None, [Pair("k1", [], "a", "bb"), Pair("k2", [], "bad", "b")], n_principles=1, seed=0)


def test_a_bad_function_is_refused_before_anything_is_written(tiny_run, tmp_path):
    """ai_feedback in-process with a function that does not import, does not fit the call, or answers out of [0, 1]
    (checked on a probe pair as it loads): one line naming the key, the run directory as it was."""
    from cai.stages import handle
    from cai.stages.ai_feedback import run

    run_dir = copy_stages(tiny_run, tmp_path / "run", ("sl_generate", "sl_train"))
    before = outputs(run_dir)

    def refused(function: str, message: str) -> None:
        cfg = compose_cfg("ai_feedback", [*TINY_ARGS, f"run_dir={run_dir}", "labeler.engine=function",
                                          f"labeler.function={function}"])
        with pytest.raises(InputError) as e:
            run(cfg, handle(run, cfg))
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)

    refused("{_target_:cai.oracles.nope}", "labeler.function._target_='cai.oracles.nope': Error locating target")
    refused("{_target_:tests.labelers.constant,value:1.5}", "labeler.function=tests.labelers.constant(value=1.5) returned "
                                                           "1.5 for a probe pair: it must return P(reply_a is better)")
    refused("{_target_:tests.labelers.constant,value:nan}", "labeler.function=tests.labelers.constant(value=nan) returned nan")
    refused("{_target_:tests.labelers.constant,value:yes}", "labeler.function=tests.labelers.constant(value='yes') returned 'yes'")
    refused("{_target_:tests.labelers.two_arguments}", "labeler.function=tests.labelers.two_arguments() failed on a probe "
                                                       "pair: TypeError: ")
    from cai.stages.evaluate import run as evaluate  # a judge is checked before any checkpoint answers

    cfg = compose_cfg("evaluate", [*TINY_ARGS, f"run_dir={run_dir}", "judge.engine=function",
                                   "judge.function={_target_:tests.labelers.constant,value:-1}"])
    with pytest.raises(InputError, match=r"^judge.function=tests.labelers.constant\(value=-1\) returned -1 for a probe pair"):
        evaluate(cfg, handle(evaluate, cfg))
    assert outputs(run_dir) == before


# The end-to-end run: experiment=oracle on tiny models, sized so both routes learn the oracle's preference in a minute
LEARNING = ["experiment=oracle", *TINY_ARGS, "labeler.function={_target_:cai.oracles.shorter,scale:2}",
            "judge.function={_target_:cai.oracles.shorter,scale:2}", "stages=[sl_generate,sl_train,ai_feedback,dpo,ppo,evaluate]",
            "ai_feedback.num_prompts=72", "ai_feedback.shard_size=24",
            "dpo.loss=sigmoid", "dpo.epochs=8", "dpo.lr=5e-3", "dpo.micro_batch_size=8",
            "ppo.algorithm=grpo", "ppo.reward=pairwise", "ppo.steps=24", "ppo.lr=5e-3",
            "evaluate.checkpoints=[sl_train,dpo,ppo]", "evaluate.temperature=1.0", "evaluate.num_prompts=24",
            "evaluate.num_helpful=8"]


def test_with_the_length_oracle_dpo_and_rl_end_with_shorter_replies_than_sl(tiny_run, tmp_path):
    """The tiny sweep's SL stages, then ai_feedback labeled by cai.oracles.shorter, DPO on those labels and GRPO with the
    oracle as its pairwise reward; evaluate samples every checkpoint's replies to the same 32 held-out prompts (seeds
    fixed). Measured: SL-CAI 22.2 characters, DPO 12.0, GRPO 0.8 (it learns to end at once). The control reverses the
    preference (scale -2: the longer reply wins) for DPO: its replies grow (24.5), so DPO follows its labels rather than
    shortening whatever it is given."""
    def learn(run_dir, *overrides: str) -> dict:
        copy_stages(tiny_run, run_dir, ("sl_generate", "sl_train"))  # copies keep their files' times
        # with what the sweep's pipeline saw of them, the pipeline skips them without starting their processes
        seen = json.loads((tiny_run / "pipeline.json").read_text())["seen"]
        (run_dir / "pipeline.json").write_text(json.dumps({"seen": {s: seen[s] for s in ("sl_generate", "sl_train")}}))
        result = run_module("cai.pipeline", *LEARNING, *overrides, f"run_dir={run_dir}")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        ran = {row["stage"]: row["status"] for row in json.loads((run_dir / "pipeline.json").read_text())["stages"]}
        assert ran["sl_generate"] == ran["sl_train"] == "skipped"  # the sweep's own, reused
        return json.loads((run_dir / "evaluate" / "results.json").read_text())

    results = learn(tmp_path / "run")
    feedback = json.loads((tmp_path / "run" / "ai_feedback" / "manifest.json").read_text())
    assert feedback["roles"]["labeler"]["function"] == {"_target_": "cai.oracles.shorter", "scale": 2}
    chars = {name: c["response_chars"] for name, c in results["checkpoints"].items()}
    assert chars["dpo"] < 0.85 * chars["sl_train"], chars  # at least 15 % shorter
    assert chars["ppo"] < 0.5 * chars["sl_train"], chars  # at least half as long
    assert results["win_rate"]["ppo"]["sl_train"] > 0.6 and results["win_rate"]["dpo"]["sl_train"] > 0.6  # as the oracle judges
    assert results["notes"][0].startswith("The judge is the function cai.oracles.shorter(scale=2), which also labeled")
    assert results["checkpoints"]["dpo"]["harmless_rate"] is None  # a function rates nothing 1..10

    reversed_ = learn(tmp_path / "control", "labeler.function={_target_:cai.oracles.shorter,scale:-2}",
                      "judge.function={_target_:cai.oracles.shorter,scale:-2}", "stages=[sl_generate,sl_train,ai_feedback,dpo,evaluate]",
                      "evaluate.checkpoints=[sl_train,dpo]")
    control = {name: c["response_chars"] for name, c in reversed_["checkpoints"].items()}
    assert control["dpo"] > control["sl_train"] == chars["sl_train"], control  # the same SL replies, now outgrown
