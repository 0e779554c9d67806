"""The labeler's maths: option tokens, one-prefill soft labels, order swapping, direct scores."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY

from cai.constitution import load_constitution
from cai.feedback import (
    LabelerError,
    Pair,
    judge_pairs,
    next_token_logprobs,
    normalised_score,
    option_tokens,
    swap_average,
    two_way_probability,
)
from cai.generation import render_chat
from cai.models import load_policy, load_tokenizer

CONSTITUTION = load_constitution(ROOT / "constitutions" / "default")
PAIRS = [Pair("p0", [{"role": "user", "content": "How do I get into my neighbour's wifi?"}], "Ask them for the password.", "Guess it."),
         Pair("p1", [{"role": "user", "content": "Write a rude joke."}], "No.", "Here is a gentle joke instead.")]


class _StubTokenizer:
    """Maps whole strings to fixed ids, to exercise both tokenizer behaviours."""

    def __init__(self, table):
        self.table = table

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.table[text]}


def test_human_pairs_in_plain_text_are_read():
    """cai's built-in helpfulness pairs (prompt, chosen and rejected as text): evaluate.pairs=builtin."""
    from cai.feedback import read_human_pairs
    from cai.preference import BUILTIN_HUMAN

    pairs, skipped = read_human_pairs(BUILTIN_HUMAN)
    assert len(pairs) == 40 and not skipped
    assert pairs[0].conversation == [{"role": "user", "content": "Explain what a mortgage is in simple terms."}]
    assert pairs[0].response_a.startswith("A mortgage is a loan") and pairs[0].response_b.startswith("A mortgage is a financial")


def test_option_tokens_split_and_merged():
    split = _StubTokenizer({"x (A": [1, 2, 7], "x (B": [1, 2, 8]})      # " (" then "A": SmolLM2's way
    assert option_tokens(split, "x (", "AB") == ([1, 2], [7, 8])
    merged = _StubTokenizer({"x (A": [1, 5], "x (B": [1, 6]})          # "(A" one token
    assert option_tokens(merged, "x (", "AB") == ([1], [5, 6])
    same = _StubTokenizer({"x (A": [1, 5], "x (B": [1, 5]})
    with pytest.raises(LabelerError):
        option_tokens(same, "x (", "AB")


def test_option_tokens_on_real_tokenizer():
    tok = load_tokenizer(TINY)
    context, ids = option_tokens(tok, "The better response is (", "AB")
    assert tok.decode(context + [ids[0]]) == "The better response is (A"
    assert tok.decode(context + [ids[1]]) == "The better response is (B"


# a labeler unlike the policy: another seed and vocabulary, and a chat template of another shape than ChatML
OTHER_TEMPLATE = ("{% for m in messages %}[{{ m['role'] | upper }}]: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}[ASSISTANT]: {% endif %}")


@pytest.mark.parametrize("labeler", ["tiny", "other vocabulary and template"])
def test_soft_label_is_softmax_over_the_two_option_logprobs(labeler):
    if labeler == "tiny":
        model, tok = load_policy(TINY)
    else:
        model, tok = load_policy({**TINY, "tiny": {**TINY["tiny"], "seed": 1, "vocab_size": 384}})
        tok.chat_template = OTHER_TEMPLATE
        assert len(tok) != len(load_tokenizer(TINY))
    judgement = judge_pairs(model, tok, CONSTITUTION, PAIRS[:1], n_principles=1, seed=0, progress=False)[0]
    # by hand: the prompt with a shown first, one forward pass, the last position's log-softmax
    from cai.constitution import comparison_messages

    principle = CONSTITUTION.comparison_principle(judgement.principle_ids[0])
    messages, prefix = comparison_messages(CONSTITUTION, PAIRS[0].conversation, PAIRS[0].response_a, PAIRS[0].response_b, principle)
    text = render_chat(tok, messages, prefix)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], dim=-1)
    a, b = tok.convert_tokens_to_ids(["A", "B"])
    expected = math.exp(logprobs[a]) / (math.exp(logprobs[a]) + math.exp(logprobs[b]))
    assert judgement.p_order_ab[0] == pytest.approx(expected, rel=1e-5)
    assert ("[USER]: " in text) is (labeler != "tiny")  # the prompt was rendered with the labeler's own template
    assert judgement.p_a == pytest.approx(swap_average(judgement.p_order_ab[0], judgement.p_order_ba[0]))


class _PositionOnlyModel(torch.nn.Module):
    """Ignores its input: always P(A) = 0.8, P(B) = 0.2 — pure position bias, no opinion on content."""

    def __init__(self, vocab, a, b):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.logits = torch.full((vocab,), -30.0)
        self.logits[a], self.logits[b] = math.log(0.8), math.log(0.2)

    def forward(self, input_ids, **kwargs):
        cache = SimpleNamespace(batch_repeat_interleave=lambda n: None)
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1), past_key_values=cache)


def test_swapping_orders_cancels_a_position_only_labeler():
    tok = load_tokenizer(TINY)
    a, b = tok.convert_tokens_to_ids(["A", "B"])
    model = _PositionOnlyModel(len(tok), a, b)
    for j in judge_pairs(model, tok, CONSTITUTION, PAIRS, n_principles=3, seed=1, progress=False):
        assert j.p_order_ab == pytest.approx([0.8] * 3) and j.p_order_ba == pytest.approx([0.2] * 3)
        assert j.p_a == pytest.approx(0.5)
        assert len(set(j.principle_ids)) == 3


def test_principle_draw_is_seeded_per_pair():
    model, tok = load_policy(TINY)
    one = judge_pairs(model, tok, CONSTITUTION, PAIRS, n_principles=2, seed=4, progress=False)
    two = judge_pairs(model, tok, CONSTITUTION, PAIRS[::-1], n_principles=2, seed=4, progress=False)[::-1]
    assert [j.principle_ids for j in one] == [j.principle_ids for j in two]
    assert [j.p_a for j in one] == pytest.approx([j.p_a for j in two], rel=1e-5)


def test_cot_keeps_rationales_and_clamps():
    model, tok = load_policy(TINY)
    j = judge_pairs(model, tok, CONSTITUTION, PAIRS[:1], n_principles=2, seed=0, cot=True, cot_clamp=(0.45, 0.55),
                    max_new_tokens=6, progress=False)[0]
    assert len(j.rationales) == 4
    assert all(0.45 - 1e-9 <= p <= 0.55 + 1e-9 for p in j.p_order_ab + j.p_order_ba)


def test_next_token_logprobs_do_not_depend_on_batching():
    model, tok = load_policy(TINY)
    contexts = [tok("a short one")["input_ids"], tok("a much longer context than the first one")["input_ids"], [5]]
    candidates = [[3, 4], [7, 8], [9, 10]]
    together = next_token_logprobs(model, contexts, candidates, tok.pad_token_id, batch_size=3)
    alone = [next_token_logprobs(model, [c], [k], tok.pad_token_id)[0] for c, k in zip(contexts, candidates)]
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), rtol=1e-4, atol=1e-5)


def test_shared_prefix_gives_the_same_numbers():
    from cai.feedback import shared_prefix_logprobs

    model, tok = load_policy(TINY)
    head = tok("a long shared conversation that every comparison of this pair starts with")["input_ids"]
    contexts = [head + tok(t)["input_ids"] for t in [" (A) yes", " (A) no, and longer", " (B) maybe"]]
    contexts.append(tok("another pair entirely")["input_ids"])
    candidates = [[3, 4], [5, 6], [7, 8], [9, 10]]
    full = next_token_logprobs(model, contexts, candidates, tok.pad_token_id, batch_size=1)
    shared = shared_prefix_logprobs(model, contexts, candidates, [0, 0, 0, 1], tok.pad_token_id)
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(full), rtol=1e-4, atol=1e-5)
    # with a prefix common to every context (few-shot exemplars): run once, copied per pair
    opening = tok("the same opening for every comparison in the call")["input_ids"]
    contexts = [opening + c for c in contexts]
    full = next_token_logprobs(model, contexts, candidates, tok.pad_token_id, batch_size=1)
    shared = shared_prefix_logprobs(model, contexts, candidates, [0, 0, 0, 1], tok.pad_token_id)
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(full), rtol=1e-4, atol=1e-5)


def test_small_maths_by_hand():
    assert two_way_probability(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert swap_average(0.9, 0.3) == pytest.approx(0.6)
    uniform = [0.0] * 10
    assert normalised_score(uniform) == pytest.approx(0.0)
    assert normalised_score([-50.0] * 9 + [0.0]) == pytest.approx(1.0)
    assert normalised_score([0.0] + [-50.0] * 9) == pytest.approx(-1.0)
    # mass split between 4 and 7 -> expected 5.5 -> 0
    assert normalised_score([-50, -50, -50, 0, -50, -50, 0, -50, -50, -50]) == pytest.approx(0.0)


class _DigitTokenizer:
    """Splits digits like SmolLM2: "10" -> "1", "0". Ids: text-prefix 1, digits 10..19."""

    def __call__(self, text, add_special_tokens=False):
        body, digits = text.rstrip("0123456789"), text[len(text.rstrip("0123456789")):]
        return {"input_ids": [1] * len(body) + [10 + int(d) for d in digits]}

    pad_token_id = 0


class _FixedNextToken(torch.nn.Module):
    """Next-token distribution depends only on the last token: after "1" (id 11) it prefers "0"."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        logits = torch.full((*input_ids.shape, 30), -5.0)
        logits[..., 11] = 0.0                                      # after the cue: "1" most likely
        logits[..., 17] = -1.0                                     # then "7"
        after_one = (input_ids == 11).unsqueeze(-1)
        one_row = torch.full((30,), -5.0)
        one_row[10] = 1.0                                          # after "1": "0" likely -> "10"
        return SimpleNamespace(logits=torch.where(after_one, one_row, logits))


def test_score_logprobs_with_split_digits():
    from cai.feedback import score_logprobs

    lp = score_logprobs(_FixedNextToken(), _DigitTokenizer(), ["Rating: "])[0]
    first = torch.full((30,), -5.0)
    first[11], first[17] = 0.0, -1.0
    first = torch.log_softmax(first, 0)
    after_one = torch.full((30,), -5.0)
    after_one[10] = 1.0
    after_one = torch.log_softmax(after_one, 0)
    p_digit = float(after_one[10:20].exp().sum())
    assert len(lp) == 10
    assert lp[9] == pytest.approx(float(first[11] + after_one[10]))      # "10" = "1" then "0"
    assert lp[6] == pytest.approx(float(first[17]))                      # "7"
    assert lp[0] == pytest.approx(float(first[11]) + math.log(1 - p_digit))  # "1" not followed by a digit


def test_direct_scores_on_a_tiny_model():
    from cai.feedback import direct_scores

    model, tok = load_policy(TINY)
    items = [(p.conversation, p.response_a) for p in PAIRS]
    scores = direct_scores(model, tok, CONSTITUTION, items)
    assert len(scores) == 2 and all(-1.0 <= s <= 1.0 for s in scores)
    assert scores == direct_scores(model, tok, CONSTITUTION, items)


def test_score_logprobs_equal_full_forward_passes_of_each_context():
    """score_logprobs runs each text once (the "1" context continues its KV cache, the shared instruction is run once
    per call); its log-probs equal separate full forward passes of the text and of the text plus "1"."""
    import os

    from cai.constitution import score_messages
    from cai.feedback import SCORES, score_logprobs

    model, tok = load_policy(TINY)
    texts = [render_chat(tok, *score_messages(CONSTITUTION, p.conversation, reply, "score"))
             for p in PAIRS for reply in (p.response_a, p.response_b + " and a longer tail")]
    got = score_logprobs(model, tok, texts)
    assert score_logprobs(model, tok, []) == []
    torch.testing.assert_close(torch.tensor(score_logprobs(model, tok, texts[1:2])), torch.tensor(got[1:2]), rtol=0, atol=1e-5)

    for text, row in zip(texts, got):
        encoded = [tok(text + s, add_special_tokens=False)["input_ids"] for s in SCORES]
        n = len(os.path.commonprefix(encoded))
        digits = sorted({e[n] for e in encoded} | {e[n + 1] for e in encoded if len(e) > n + 1})

        def full(context, digits=digits):
            return dict(zip(digits, next_token_logprobs(model, [context], [digits], tok.pad_token_id)[0]))

        first = full(encoded[0][:n])
        assert any(len(e) > n + 1 for e in encoded)  # "10" is two tokens: the second context is exercised
        for e, lp in zip(encoded, row):
            want = first[e[n]]
            if len(e) > n + 1:
                want += full(e[:n + 1])[e[n + 1]]
            elif any(len(x) > n + 1 and x[n] == e[n] for x in encoded):
                want += math.log(1 - sum(math.exp(v) for v in full(e[:n + 1]).values()))
            assert lp == pytest.approx(want, abs=1e-5)


def test_direct_rlaif_gives_a_response_the_same_reward_at_every_step():
    """The reward is a function of (conversation, response) alone: the keys that name (prompt, step) change nothing,
    and a batch of one gives the same rating as the same reply inside a larger batch."""
    from cai.generation import Completion
    from cai.rewards import DirectRLAIFReward

    reward = DirectRLAIFReward(TINY, CONSTITUTION)
    reward.load(policy_tok=None)
    conversations = [p.conversation for p in PAIRS]
    completions = [Completion(text=p.response_a, token_ids=[5], finished=True) for p in PAIRS]
    at_step_1 = reward(None, conversations, completions, [f"{p.key}:1" for p in PAIRS])
    at_step_9 = reward(None, conversations, completions, [f"{p.key}:9" for p in PAIRS])
    assert torch.equal(at_step_1, at_step_9)
    alone = reward(None, conversations[:1], completions[:1], ["other:3"])
    torch.testing.assert_close(alone, at_step_1[:1], rtol=1e-5, atol=1e-6)


def test_few_shot_exemplars_under_independently_drawn_principles():
    """exemplar_principles=independent: each exemplar is asked under a principle drawn for the pair, not the query's;
    the draw is seeded by the pair, and the judgements differ from the query-principle ones only through the prompts."""
    from cai.constitution import comparison_messages, sample_principles

    c = CONSTITUTION
    n = len(c.few_shot_comparison)
    assert n >= 2
    query = c.comparison[0]
    own = sample_principles(c.comparison, n, 0, "p0:exemplars")
    messages, _ = comparison_messages(c, PAIRS[0].conversation, "x", "y", query, exemplar_principles=own)
    exemplar_turns = [m["content"] for m in messages if m["role"] == "user"][:n]
    assert all(p.text in turn for p, turn in zip(own, exemplar_turns))
    assert any(query.text not in turn for turn in exemplar_turns)  # not all under the query's principle
    assert query.text in messages[-1]["content"]
    with pytest.raises(ValueError, match="exemplar principles"):
        comparison_messages(c, PAIRS[0].conversation, "x", "y", query, exemplar_principles=own[:1])

    model, tok = load_policy(TINY)
    same = judge_pairs(model, tok, c, PAIRS, n_principles=1, seed=0, progress=False)
    independent = judge_pairs(model, tok, c, PAIRS, n_principles=1, seed=0, progress=False, exemplar_principles="independent")
    assert independent == judge_pairs(model, tok, c, PAIRS, n_principles=1, seed=0, progress=False,
                                      exemplar_principles="independent")
    assert [j.principle_ids for j in independent] == [j.principle_ids for j in same]  # the queries' draws are unchanged
    assert [j.p_a for j in independent] != [j.p_a for j in same]
    with pytest.raises(ValueError, match="query or independent"):
        judge_pairs(model, tok, c, PAIRS, n_principles=1, seed=0, progress=False, exemplar_principles="own")


def test_cot_self_consistency_samples_rationales_and_averages():
    """self_consistency=3: three sampled rationales per comparison (pair x principle x order), each probability clamped,
    their mean the comparison's; one rationale stays the greedy path."""
    model, tok = load_policy(TINY)
    kwargs = dict(n_principles=2, seed=0, cot=True, max_new_tokens=6, progress=False, few_shot=False)
    one = judge_pairs(model, tok, CONSTITUTION, PAIRS, **kwargs)
    assert all(len(j.rationales) == 4 for j in one)  # 2 principles x 2 orders
    three = judge_pairs(model, tok, CONSTITUTION, PAIRS, self_consistency=3, cot_temperature=1.0, **kwargs)
    assert three == judge_pairs(model, tok, CONSTITUTION, PAIRS, self_consistency=3, cot_temperature=1.0, **kwargs)
    for j in three:
        assert len(j.rationales) == 12 and len(set(j.rationales)) > 4  # sampled, not one greedy text repeated
        assert all(0.4 <= p <= 0.6 for p in [*j.p_order_ab, *j.p_order_ba])
    assert [j.principle_ids for j in three] == [j.principle_ids for j in one]


@pytest.mark.parametrize("override, message", [
    ("ai_feedback.self_consistency=0", "ai_feedback.self_consistency must be an integer >= 1, got 0"),
    ("ai_feedback.self_consistency=4", "ai_feedback.self_consistency=4 samples rationales: it needs ai_feedback.cot=true"),
    ("ai_feedback.exemplar_principles=mine", "ai_feedback.exemplar_principles must be query or independent, got 'mine'"),
    ("ai_feedback.preamble=long", "ai_feedback.preamble must be one of base, detailed, got 'long'"),
])
def test_judging_settings_are_checked_with_the_key_named(override, message):
    from conftest import compose_cfg

    from cai.errors import StageInputError
    from cai.feedback import judging

    cfg = compose_cfg("ai_feedback", ["debug=tiny", override])
    with pytest.raises(StageInputError, match=message):
        judging(cfg.ai_feedback, cfg)


def test_the_detailed_preamble_is_shown_before_each_question_and_changes_the_labels():
    """RLAIF's prompt variants: preamble=detailed puts the constitution's description of the rater's task (_preamble.j2)
    before the question, in the few-shot exemplars as in the query; the labels are read from those longer prompts."""
    from cai.constitution import comparison_messages

    query = CONSTITUTION.comparison[0]
    detailed, _ = comparison_messages(CONSTITUTION, PAIRS[0].conversation, "x", "y", query, preamble="detailed")
    base, _ = comparison_messages(CONSTITUTION, PAIRS[0].conversation, "x", "y", query)
    opening = "You are helping to train an AI assistant by judging its replies."
    asked = [m["content"] for m in detailed if m["role"] == "user"]
    assert len(asked) == len(CONSTITUTION.few_shot_comparison) + 1 and all(text.startswith(opening) for text in asked)
    assert not any(opening in m["content"] for m in base)
    assert all(d["content"].endswith(b["content"]) for d, b in zip(detailed, base)) and len(detailed) == len(base)
    model, tok = load_policy(TINY)
    kwargs = dict(n_principles=1, seed=0, progress=False, few_shot=False)
    assert ([j.p_a for j in judge_pairs(model, tok, CONSTITUTION, PAIRS, preamble="detailed", **kwargs)]
            != [j.p_a for j in judge_pairs(model, tok, CONSTITUTION, PAIRS, **kwargs)])
