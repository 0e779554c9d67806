"""Batched sampling for lists of chat conversations.

Conversations are rendered with the tokenizer's chat template (plus an optional start of the
assistant turn), sorted by length so each batch carries little padding, left-padded, and decoded
with the KV cache by ``model.generate``. Each completion is cut after its first EOS; ``finished``
says whether it had one (False: it ran into ``max_new_tokens``).

Samples come from exactly softmax(logits / T), cut to ``top_p`` when it is below 1, and nothing else: settings a
checkpoint's ``generation_config.json`` ships (a repetition penalty, ``min_new_tokens``, ``no_repeat_ngram_size``,
``top_k``, bad words, ...) are not applied, since PPO computes its ratio, KL and entropy against the plain
tempered distribution and must be sampling from it.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from cai.models import seeded


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (base seed, stage, shard, round …): the same parts always give the
    same seed, so each unit of work samples the same way however the run was split or resumed."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def check_sampling(batch_size: int, max_new_tokens: int, temperature: float, top_p: float) -> None:
    """The sampling settings ``generate`` accepts; raises ValueError naming the config keys otherwise."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"generation.batch_size and generation.max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < generation.top_p <= 1, got {temperature}, {top_p}")


@dataclass
class Completion:
    text: str              # decoded reply, special tokens removed, surrounding whitespace stripped
    token_ids: list[int]   # generated ids up to and including the first EOS (no padding)
    finished: bool         # True when the reply ended with EOS


class Engine(abc.ABC):
    """A model that transformers does not run here: vLLM's engine or a server (``cai.engines``). cai renders and
    tokenizes the prompts with its own tokenizer and chat template and hands the engine token ids, so an engine and a
    transformers model see the same tokens. ``generate`` below and the labeler's log-probs (``cai.feedback``)
    call these methods where they would otherwise run a transformers model."""

    device: str  # where it runs, for manifests: "vllm", or a server's address

    @abc.abstractmethod
    def generate(self, prompts: Sequence[list[int]], *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 progress: bool, tok) -> list[Completion]:
        """One reply per prompt (token ids), in order, sampled from softmax(logits / T) cut to ``top_p``; request ``i``
        with seed ``derive_seed(seed, i)``, so a reply does not depend on the requests beside it."""

    @abc.abstractmethod
    def next_token_logprobs(self, contexts: Sequence[list[int]], candidates: Sequence[list[int]]) -> list[list[float]]:
        """log p(candidate | context) for each context's candidate tokens (the raw distribution, before temperature)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Let go of the engine (a stage done with it, or loading another model next)."""


def render_chat(tokenizer, messages: list[dict], assistant_prefix: str = "") -> str:
    """The exact text the model sees: chat template with the generation prompt, then the start of
    the assistant's reply (``assistant_prefix``, e.g. an answer cue) if any."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + assistant_prefix


@torch.no_grad()
def generate(
    model,
    tokenizer,
    conversations: Sequence[list[dict]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    assistant_prefixes: Sequence[str] | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[Completion]:
    """Sample one reply per conversation; returns completions in the input order.

    ``temperature == 0`` decodes greedily. The same inputs, seed and batch size give the same outputs. ``model`` may
    be an ``Engine`` instead: it gets the same token ids (its requests seeded one by one, so there the batch size does
    not matter either).
    """
    check_sampling(batch_size, max_new_tokens, temperature, top_p)
    prefixes = list(assistant_prefixes) if assistant_prefixes is not None else [""] * len(conversations)
    texts = [render_chat(tokenizer, conv, prefix) for conv, prefix in zip(conversations, prefixes, strict=True)]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if isinstance(model, Engine):
        return model.generate(encoded, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              progress=progress, tok=tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first: little padding
    results: list[Completion | None] = [None] * len(encoded)
    device = next(model.parameters()).device
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)

    bar = tqdm(total=len(encoded), desc=desc, unit="reply", disable=not progress, leave=False)
    with seeded(seed):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            with _only_these_settings(model):
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    top_k=None,
                    **sampling,
                )
            new_tokens = out[:, batch["input_ids"].shape[1]:].tolist()
            for i, ids in zip(idx, new_tokens):
                results[i] = completion(tokenizer, ids)
            bar.update(len(idx))
    bar.close()
    return results  # type: ignore[return-value]


@contextlib.contextmanager
def _only_these_settings(model):
    """``generate`` fills every setting a call leaves unset from the model's ``generation_config`` (what the checkpoint
    shipped). For the call, that config is a blank one, so only the library's neutral defaults and the call's own
    settings apply."""
    from transformers import GenerationConfig

    shipped = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = shipped


def completion(tokenizer, ids: list[int]) -> Completion:
    """A reply from its generated ids: cut after the first EOS (padding follows it in a batch), decoded."""
    eos = tokenizer.eos_token_id
    finished = eos in ids
    if finished:
        ids = ids[: ids.index(eos) + 1]  # generate pads finished rows after their EOS
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return Completion(text=text, token_ids=ids, finished=finished)
