"""Preference-model maths and data: losses, last-token scoring, comparison loaders, calibration."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import TINY

from cai.data import DataError
from cai.models import load_preference_model, preference_scores
from cai.preference import (
    BUILTIN_HUMAN,
    BUILTIN_PRETRAIN,
    SHIFT_KEY,
    Comparison,
    encode_pair,
    encode_pairs,
    evaluate_margins,
    expected_calibration_error,
    load_comparisons,
    pair_accuracy,
    preference_loss,
    reliability_bins,
    score_conversations,
    split_holdout,
    stack_exchange_pairs,
)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("d", [-2.0, -0.3, 0.0, 0.7, 3.0])
def test_soft_loss_equals_the_hard_loss_at_p_0_and_1(d):
    one = preference_loss(torch.tensor([d]), torch.tensor([1.0])).item()
    zero = preference_loss(torch.tensor([d]), torch.tensor([0.0])).item()
    assert one == pytest.approx(-_log_sigmoid(d), abs=1e-6)   # -log sigma(r_good - r_bad)
    assert zero == pytest.approx(-_log_sigmoid(-d), abs=1e-6)  # the same with the roles swapped


@pytest.mark.parametrize("d", [-1.5, 0.0, 0.4, 2.2])
def test_soft_loss_has_zero_gradient_where_the_pm_agrees(d):
    margin = torch.tensor([d], dtype=torch.float64, requires_grad=True)
    preference_loss(margin, torch.sigmoid(margin.detach())).sum().backward()
    assert abs(margin.grad.item()) < 1e-12
    other = torch.tensor([d], dtype=torch.float64, requires_grad=True)
    preference_loss(other, torch.tensor([0.9], dtype=torch.float64)).sum().backward()
    assert other.grad.item() == pytest.approx(1 / (1 + math.exp(-d)) - 0.9)  # sigma(d) - p


def test_margin_applies_to_hard_labels_only():
    d = torch.tensor([0.5, 0.5])
    losses = preference_loss(d, torch.tensor([1.0, 0.7]), hard_margin=1.0)
    assert losses[0].item() == pytest.approx(-_log_sigmoid(0.5 - 1.0), abs=1e-6)
    assert losses[1].item() == pytest.approx(preference_loss(d[1:], torch.tensor([0.7])).item(), abs=1e-6)


def test_score_is_read_at_the_last_real_token_for_left_and_right_padding():
    model, tok = load_preference_model(TINY)
    a, b = [5, 9, 13, 22, 40], [7, 8]
    pad = tok.pad_token_id
    right = torch.tensor([a, b + [pad] * 3]), torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    left = torch.tensor([a, [pad] * 3 + b]), torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    with torch.no_grad():
        s_right = preference_scores(model, *right)
        s_left = preference_scores(model, *left)
        alone = [preference_scores(model, torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long)).item() for x in (a, b)]
        at_pad = model.score(model.base_model(input_ids=right[0]).last_hidden_state[1, -1])  # reading the last column is wrong
    torch.testing.assert_close(s_left, s_right, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_right, torch.tensor(alone), rtol=1e-5, atol=1e-5)
    assert abs(at_pad.item() - alone[1]) > 1e-4


def test_stack_exchange_pairs_binarize_by_score():
    rng = random.Random(0)
    assert stack_exchange_pairs([5, 1, 3, 3], 10, 1, rng) == [(0, 1), (0, 2), (0, 3), (2, 1), (3, 1)]
    assert stack_exchange_pairs([5, 1, 3, 3], 10, 3, rng) == [(0, 1)]       # only 5 vs 1 differs by >= 3
    assert stack_exchange_pairs([2, 2], 10, 1, rng) == []                  # ties carry no preference
    capped = stack_exchange_pairs([5, 1, 3, 3], 2, 1, random.Random(1))
    assert len(capped) == 2 and capped == stack_exchange_pairs([5, 1, 3, 3], 2, 1, random.Random(1))


def test_builtin_sets_load_in_their_formats():
    pretrain, identical = load_comparisons(None, "auto", key="k", builtin=BUILTIN_PRETRAIN, seed=0, pairs_per_question=2)
    assert identical == 0 and len(pretrain) == 80 and all(c.p_chosen == 1.0 for c in pretrain)
    assert all(c.prompt[-1]["role"] == "user" and c.chosen != c.rejected for c in pretrain)
    human, _ = load_comparisons(None, "auto", key="k", builtin=BUILTIN_HUMAN, seed=0)
    assert len(human) == 40 and len({c.prompt[0]["content"] for c in human}) == 40


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_hh_transcripts_split_at_the_last_assistant_turn_and_identical_pairs_are_dropped(tmp_path):
    src = _jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: sure, here", "rejected":
         "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: no"},
        {"chosen": "\n\nHuman: q\n\nAssistant: same", "rejected": "\n\nHuman: q\n\nAssistant: same"},
    ])
    rows, identical = load_comparisons(src, "hh", key="k", builtin=BUILTIN_HUMAN, seed=0)
    assert identical == 1 and len(rows) == 1
    assert rows[0].prompt == ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                              {"role": "user", "content": "help?"})
    assert (rows[0].chosen, rows[0].rejected) == ("sure, here", "no")


def test_pairs_format_takes_conversational_rows_and_flips_soft_labels_below_half(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": "A"}],
         "rejected": [{"role": "assistant", "content": "B"}], "p_chosen": 0.3},
        {"prompt": "y", "chosen": "C", "rejected": "D", "p_chosen": 0.8},
    ])
    rows, _ = load_comparisons(src, "auto", key="k", builtin=BUILTIN_HUMAN, seed=0)
    assert (rows[0].chosen, rows[0].rejected, rows[0].p_chosen) == ("B", "A", pytest.approx(0.7))
    assert (rows[1].chosen, rows[1].p_chosen) == ("C", 0.8)


@pytest.mark.parametrize("rows, fmt, message", [
    ([{"prompt": "x", "chosen": "a", "rejected": "b", "p_chosen": 1.5}], "auto", "row 0 'p_chosen' must be a number in \\[0, 1\\]"),
    ([{"prompt": "x", "chosen": "a", "rejected": "b", "p_chosen": float("nan")}], "auto", "row 0 'p_chosen'"),
    ([{"prompt": "x", "chosen": 3, "rejected": "b"}], "pairs", "row 0 column 'chosen' must be a string"),
    ([{"prompt": "x", "chosen": "a", "rejected": "a"}], "pairs", "no usable comparisons"),
    ([{"text": "x"}], "auto", "cannot tell the comparison format"),
    ([{"text": "x"}], "hh", "format hh needs columns chosen, rejected"),
    ([{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"}], "hh",
     "differ before their last assistant turn"),
    ([{"question": "q", "answers": [{"text": "a"}]}], "auto", "row 0 answer 0 needs a string 'text' and a numeric 'score'"),
])
def test_bad_comparison_rows_are_refused_naming_file_and_row(tmp_path, rows, fmt, message):
    src = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as err:
        load_comparisons(src, fmt, key="pm.source", builtin=BUILTIN_HUMAN, seed=0)
    assert str(err.value).startswith(src) and "\n" not in str(err.value)


def test_unknown_format_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="pm.source: format must be one of"):
        load_comparisons(None, "reddit", key="pm.source", builtin=BUILTIN_HUMAN, seed=0)
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="file is empty"):
        load_comparisons(str(tmp_path / "e.jsonl"), "auto", key="k", builtin=BUILTIN_HUMAN, seed=0)


def test_split_holdout_is_seeded_and_refuses_empty_splits():
    train, held = split_holdout(list(range(10)), 0.25, 0, "x", "pm.eval_fraction")
    assert len(held) == 2 and len(train) == 8 and sorted(train + held) == list(range(10))
    assert (train, held) == split_holdout(list(range(10)), 0.25, 0, "x", "pm.eval_fraction")
    assert split_holdout([1, 2], 0.01, 0, "x", "k")[1] != []  # at least one held out
    with pytest.raises(DataError, match="pm.eval_fraction=0.9: 1 x comparison"):
        split_holdout([1], 0.9, 0, "x", "pm.eval_fraction")
    with pytest.raises(DataError, match="must be in \\(0, 1\\)"):
        split_holdout([1, 2, 3], 0.0, 0, "x", "k")


def test_long_contexts_are_cut_from_the_left_and_long_responses_drop_their_pair():
    _, tok = load_preference_model(TINY)
    long_prompt = " ".join(["context"] * 200)
    c = Comparison("a", ({"role": "user", "content": long_prompt},), "yes fine", "no")
    full = encode_pair(tok, c, 10_000)
    cut = encode_pair(tok, c, 40)
    assert not full.truncated and cut.truncated and len(cut.chosen) == 40 and len(cut.rejected) == 40
    reply = tok("yes fine", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert cut.chosen[-len(reply):] == reply and full.chosen[-len(reply):] == reply  # the response stays whole
    assert cut.chosen[:-len(reply)] == full.chosen[len(full.chosen) - 40:-len(reply)]  # the newest context is kept
    wordy = Comparison("b", ({"role": "user", "content": "q"},), " ".join(["word"] * 80), "short")
    kept, counts = encode_pairs(tok, [c, wordy], 40, "src")
    assert len(kept) == 1 and counts == {"truncated_context": 1, "dropped_too_long": 1}
    with pytest.raises(DataError, match="src: every response is longer than max_length=40"):
        encode_pairs(tok, [wordy], 40, "src")


def test_accuracy_and_calibration_by_hand():
    assert pair_accuracy([1.0, -1.0, 0.0, 2.0], [1.0, 1.0, 1.0, 0.5]) == pytest.approx(0.5)  # p = 0.5 carries no preference
    # (0.9, 1) and (0.6, 0.5), each also mirrored: both bins are exactly calibrated
    table = reliability_bins([0.9, 0.6], [1.0, 0.5], 2)
    assert [(r["count"], r["confidence"], r["observed"]) for r in table] == [(2, pytest.approx(0.25), 0.25),
                                                                            (2, pytest.approx(0.75), 0.75)]
    assert expected_calibration_error(table) == pytest.approx(0.0)
    # one over-cautious pair: 0.8 said, 1 true; mirrored 0.2 said, 0 true -> |0.2| in each half
    assert expected_calibration_error(reliability_bins([0.8], [1.0], 2)) == pytest.approx(0.2)
    metrics, _ = evaluate_margins([math.log(4.0)], [1.0], 2)
    assert metrics == {"accuracy": 1.0, "mean_margin": pytest.approx(math.log(4.0), abs=1e-6), "ece": pytest.approx(0.2),
                       "pairs": 1}


def test_score_conversations_adds_the_checkpoint_shift():
    model, tok = load_preference_model(TINY)
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
             [{"role": "user", "content": "a longer question here"}, {"role": "assistant", "content": "ok"}]]
    raw = score_conversations(model, tok, chats)
    model.config.update({SHIFT_KEY: 1.5})
    torch.testing.assert_close(score_conversations(model, tok, chats), raw + 1.5)
    with pytest.raises(ValueError, match="conversation 0 must end with an assistant turn"):
        score_conversations(model, tok, [chats[0][:1]])
    with pytest.raises(ValueError, match="the reply alone is"):
        score_conversations(model, tok, chats, max_length=3)
