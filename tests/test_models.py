"""Model loading: tiny in-process models, PAD != EOS, scalar-head scoring, clear errors, the embedded model."""

from __future__ import annotations

import pytest
import torch

from cai import models
from cai.generation import generate
from cai.models import (
    ModelLoadError,
    ensure_distinct_pad,
    last_token_index,
    load_policy,
    load_preference_model,
    load_tokenizer,
    position_ids_from_mask,
    preference_scores,
)


def test_tiny_tokenizer_is_chat_ready(tiny_cfg):
    tok = load_tokenizer(tiny_cfg)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("a (A) or (B)")["input_ids"]) == "a (A) or (B)"


def test_auto_dtype_is_bf16_on_a_cpu_with_bf16_instructions():
    from cai.models import cpu_has_bf16, pick_dtype

    zen4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
    sapphire_rapids = "flags\t\t: fpu avx512f amx_bf16 amx_tile\n"
    skylake = "flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"
    assert cpu_has_bf16(zen4) and cpu_has_bf16(sapphire_rapids)
    assert not cpu_has_bf16(skylake) and not cpu_has_bf16("")
    want = torch.bfloat16 if cpu_has_bf16() else torch.float32
    assert pick_dtype("auto", torch.device("cpu")) == want
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32


def test_tiny_models_are_seeded(tiny_cfg):
    a, _ = load_policy(tiny_cfg)
    b, _ = load_policy(tiny_cfg)
    tiny_cfg["tiny"]["seed"] = 1
    c, _ = load_policy(tiny_cfg)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.config.num_hidden_layers == 2 and not a.training
    assert sum(p.numel() for p in a.parameters()) < 200_000


def test_last_token_index_and_positions():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2, 2, 2], [0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_preference_score_same_for_left_and_right_padding(tiny_cfg):
    model, tok = load_preference_model(tiny_cfg)
    texts = ["a short one", "a rather longer conversation about the weather today"]
    scores = {}
    for side in ("left", "right"):
        tok.padding_side = side
        batch = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            scores[side] = preference_scores(model, batch["input_ids"], batch["attention_mask"])
    assert scores["left"].shape == (2,)
    torch.testing.assert_close(scores["left"], scores["right"], rtol=1e-4, atol=1e-5)
    # and equal to scoring each text alone (no padding at all)
    alone = []
    for t in texts:
        b = tok([t], return_tensors="pt")
        with torch.no_grad():
            alone.append(preference_scores(model, b["input_ids"], b["attention_mask"]).item())
    torch.testing.assert_close(scores["right"], torch.tensor(alone), rtol=1e-4, atol=1e-5)


def test_a_shared_prompt_is_computed_once_with_the_same_outputs_and_gradients(tiny_cfg):
    """Two prompts (one left-padded) with three responses each (some cut short): the grouped pass (each prompt once,
    its KV cache repeated) gives the plain pass's logits, gradients, hidden states and PM scores."""
    from cai.models import backbone_call, lm_call, response_forward

    policy, tok = load_policy(tiny_cfg)
    pm, _ = load_preference_model(tiny_cfg)
    torch.manual_seed(0)
    k, q_len, r_len = 3, 7, 5
    query = torch.randint(5, 500, (2, q_len))
    query_mask = torch.ones(2, q_len, dtype=torch.long)
    query[0, :3], query_mask[0, :3] = tok.pad_token_id, 0
    query, query_mask = query.repeat_interleave(k, 0), query_mask.repeat_interleave(k, 0)
    response = torch.randint(5, 500, (2 * k, r_len))
    mask = torch.ones(2 * k, r_len, dtype=torch.long)
    mask[1, 3:], mask[4, 1:] = 0, 0
    weights = torch.randn(2 * k, r_len + 1, policy.config.vocab_size)

    def grads(group):
        policy.zero_grad()
        out = response_forward(lm_call(policy), query, query_mask, response, mask, group)
        (out * weights).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()}

    (plain, plain_grads), (grouped, grouped_grads) = grads(1), grads(k)
    assert plain.shape == (2 * k, r_len + 1, policy.config.vocab_size)
    torch.testing.assert_close(grouped, plain, rtol=1e-5, atol=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(grouped_grads[name], plain_grads[name], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        hidden = {g: response_forward(backbone_call(pm), query, query_mask, response, mask, g) for g in (1, k)}
        torch.testing.assert_close(hidden[k], hidden[1], rtol=1e-5, atol=1e-5)
        # the PM's score at the last real response token, read from the grouped pass, is preference_scores'
        last = hidden[k][torch.arange(2 * k), mask.sum(1)]
        expected = preference_scores(pm, torch.cat([query, response], 1), torch.cat([query_mask, mask], 1))
        torch.testing.assert_close(pm.score(last).squeeze(-1).float(), expected, rtol=1e-5, atol=1e-5)
        # reinforce's baseline V(x), from the prompts alone, is the value at the first response position (the state
        # before the response) of the full pass
        from cai.stages.ppo import _Batch, _prompt_values, _token_values

        batch = _Batch(query, query_mask, response, mask, torch.ones(2 * k, dtype=torch.bool), k)
        torch.testing.assert_close(_prompt_values(pm, batch), _token_values(pm, batch)[:, 0], rtol=1e-5, atol=1e-5)


def test_dropout_is_off(tiny_cfg):
    model, _ = load_policy(tiny_cfg)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.attention_dropout == 0.0


def test_pad_made_distinct_from_eos(tiny_cfg):
    tok = load_tokenizer(tiny_cfg)
    tok.pad_token = tok.eos_token
    assert ensure_distinct_pad(tok) is False  # reuses an existing spare special token
    assert tok.pad_token_id != tok.eos_token_id


@pytest.mark.parametrize("path, message", [
    ("/no/such/model/dir", "model folder does not exist"),
    ("./relative/missing", "model folder does not exist"),
])
def test_missing_model_dir_is_a_clear_error(path, message):
    with pytest.raises(ModelLoadError, match=f"model.path='{path}': {message}"):
        load_policy({"path": path})


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_policy({"path": str(tmp_path)})


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="model.path='someone/not-a-model'"):
        load_policy({"path": "someone/not-a-model"})


def test_saved_checkpoint_round_trips(tiny_cfg, tmp_path):
    model, tok = load_policy(tiny_cfg)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again, tok2 = load_policy({"path": str(tmp_path), "dtype": "float32"})
    assert tok2.pad_token_id == tok.pad_token_id and tok2.chat_template == tok.chat_template
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_embedded_model_offline_generation_and_cached_reload(monkeypatch):
    model, tok = load_policy({"path": "embedded"})  # converts on first use, then cached
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template
    reply = generate(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]],
                     max_new_tokens=24, temperature=0.0, progress=False)[0]
    assert reply.text and reply.token_ids
    assert "paris" in reply.text.lower()

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been reused")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again, _ = load_policy({"path": "embedded"})
    assert again.config.num_hidden_layers == 30


def test_a_pickled_checkpoint_is_refused_not_unpickled(tiny_cfg, tmp_path, monkeypatch):
    """Models load from safetensors only: a folder holding just pytorch_model.bin is a one-line error naming
    model.path, and the pickle is never opened."""
    model, tok = models.load_policy(tiny_cfg)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a) or real_load(*a, **k))
    with pytest.raises(models.ModelLoadError, match=r"model.path=.*model.safetensors"):
        models.load_policy({**tiny_cfg, "path": str(tmp_path)})
    assert opened == []
