"""Batched generation on tiny models: order, EOS handling, determinism, batch-size invariance; what an engine is handed."""

from __future__ import annotations

import pytest

from cai.generation import Completion, Engine, completion, generate, render_chat
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
    done = completion(tok, [*word, eos, pad, pad])
    assert done.finished and done.token_ids == [*word, eos] and done.text == "hello"
    cut = completion(tok, [*word, *word])
    assert not cut.finished and cut.token_ids == [*word, *word]


def test_an_engine_is_handed_the_rendered_token_ids_and_the_calls_settings(tiny):
    """``generate`` gives an ``Engine`` (vLLM, a server: cai.engines) the token ids it rendered, with the chat template
    and the assistant prefixes, and the call's settings; the engine's replies come back as they are."""
    _, tok = tiny

    class Recorder(Engine):
        device = "nowhere"

        def generate(self, prompts, **settings):
            self.asked = (prompts, settings)
            return [completion(tok, [tok.eos_token_id]) for _ in prompts]

        def next_token_logprobs(self, contexts, candidates):
            raise NotImplementedError

        def close(self):
            pass

    engine, prefixes = Recorder(), ["", "Sure"]
    out = generate(engine, tok, CHATS[:2], max_new_tokens=3, temperature=0.5, top_p=0.9, seed=4, progress=False,
                   assistant_prefixes=prefixes)
    prompts, settings = engine.asked
    assert prompts == [tok(render_chat(tok, c, p), add_special_tokens=False)["input_ids"] for c, p in zip(CHATS, prefixes)]
    assert settings == dict(max_new_tokens=3, temperature=0.5, top_p=0.9, seed=4, progress=False, tok=tok)
    assert [(c.token_ids, c.finished) for c in out] == [([tok.eos_token_id], True)] * 2


def test_bad_settings_are_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, tok, CHATS, batch_size=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, CHATS, top_p=0.0)


def test_a_checkpoints_shipped_generation_settings_are_not_applied(tmp_path):
    """A checkpoint whose generation_config.json asks for a repetition penalty, a minimum length and a top-k: generate
    still samples from the plain model. Greedy tokens equal the argmax of the model's own logits step by step (with the
    shipped settings applied they differ), and the shipped config is back on the model afterwards."""
    import torch
    from conftest import TINY
    from transformers import GenerationConfig

    model, tok = load_policy(TINY)
    model.generation_config = GenerationConfig(repetition_penalty=5.0, min_new_tokens=12, do_sample=True, top_k=3,
                                               no_repeat_ngram_size=1,
                                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok = load_policy({"path": str(tmp_path), "dtype": "float32"})
    assert model.generation_config.repetition_penalty == 5.0  # the shipped settings are there to be ignored

    chat = CHATS[1]
    [out] = generate(model, tok, [chat], max_new_tokens=12, temperature=0.0, progress=False)
    ids = tok(render_chat(tok, chat), add_special_tokens=False, return_tensors="pt")["input_ids"]
    expected = []
    with torch.no_grad():
        for _ in range(len(out.token_ids)):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            expected.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == tok.eos_token_id:
                break
    assert out.token_ids == expected
    shipped = model.generate(**tok([render_chat(tok, chat)], return_tensors="pt", add_special_tokens=False),
                             max_new_tokens=12, do_sample=False, top_k=None, pad_token_id=tok.pad_token_id)[0, -12:].tolist()
    assert shipped != expected[:12]  # the check can fail: with the shipped settings, another reply
    assert model.generation_config.repetition_penalty == 5.0
