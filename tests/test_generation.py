"""Batched generation on tiny models: order, EOS handling, determinism, batch-size invariance."""

from __future__ import annotations

import pytest

from cai.generation import Completion, _completion, generate, render_chat
from cai.models import load_policy

CHATS = [[{"role": "user", "content": t}] for t in
         ["hello", "tell me a story about a very long journey", "why", "what is two plus two", "ok"]]


@pytest.fixture(scope="module")
def tiny():
    from conftest import TINY
    return load_policy(TINY)


def test_returns_one_completion_per_chat_in_order(tiny):
    model, tok = tiny
    out = generate(model, tok, CHATS, max_new_tokens=6, temperature=0.0, batch_size=2, progress=False)
    assert len(out) == len(CHATS) and all(isinstance(c, Completion) for c in out)
    alone = [generate(model, tok, [c], max_new_tokens=6, temperature=0.0, progress=False)[0] for c in CHATS]
    assert [c.token_ids for c in out] == [c.token_ids for c in alone]  # batching/padding does not change greedy output


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    a = generate(model, tok, CHATS, max_new_tokens=8, temperature=1.0, seed=5, progress=False)
    b = generate(model, tok, CHATS, max_new_tokens=8, temperature=1.0, seed=5, progress=False)
    c = generate(model, tok, CHATS, max_new_tokens=8, temperature=1.0, seed=6, progress=False)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_max_new_tokens_and_prefix(tiny):
    model, tok = tiny
    out = generate(model, tok, CHATS[:2], max_new_tokens=5, temperature=1.0, progress=False,
                   assistant_prefixes=["The answer is (", "Sure"])
    assert all(len(c.token_ids) <= 5 for c in out)
    assert render_chat(tok, CHATS[0], "The answer is (").endswith("<|im_start|>assistant\nThe answer is (")


def test_completion_cut_after_first_eos(tiny):
    _, tok = tiny
    eos, pad = tok.eos_token_id, tok.pad_token_id
    word = tok("hello", add_special_tokens=False)["input_ids"]
    done = _completion(tok, [*word, eos, pad, pad])
    assert done.finished and done.token_ids == [*word, eos] and done.text == "hello"
    cut = _completion(tok, [*word, *word])
    assert not cut.finished and cut.token_ids == [*word, *word]


def test_bad_settings_are_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, tok, CHATS, batch_size=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, CHATS, top_p=0.0)
