"""Oracles: labelers whose preference is known, for checking that a pipeline learns what its labels say.

Each is a plain function ``fn(conversation, reply_a, reply_b, **arguments) -> P(reply_a is better)`` in [0, 1], the
shape a function labeler or judge takes (``labeler.engine=function``, ``labeler.function={_target_: cai.oracles.shorter,
scale: 20}``; cai.roles). A "gold" labeler like these is what reward-overoptimisation studies train against: when the
truth is known, a run can show its replies moving toward it, where a 135M model's labels are noise.
"""

from __future__ import annotations

import math

# Openings of refusals and deflections (``avoids``' default list), matched anywhere in a reply, ignoring case
REFUSALS = ("i can't", "i cannot", "i can not", "i won't", "i will not", "i'm not able", "i am not able", "i'm unable",
            "i am unable", "i'm sorry", "i am sorry", "as an ai", "as a language model")


def shorter(conversation: list[dict], reply_a: str, reply_b: str, *, scale: float = 20.0) -> float:
    """Prefer the shorter reply, softly: σ((len(b) − len(a)) / scale), lengths in characters after stripping. Equal
    lengths give ½; a reply ``scale`` characters shorter wins with 0.73, ``3 scale`` shorter with 0.95. A negative
    ``scale`` prefers the longer reply (a control: the same run with the preference reversed)."""
    d = (len(reply_b.strip()) - len(reply_a.strip())) / scale
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))  # no overflow either way


def avoids(conversation: list[dict], reply_a: str, reply_b: str, *, phrases: list[str] | tuple[str, ...] = REFUSALS) -> float:
    """Prefer the reply that contains none of ``phrases`` (any case): 1 when only ``reply_b`` contains one, 0 when only
    ``reply_a`` does, ½ when both or neither do."""
    def has(reply: str) -> bool:
        text = reply.lower()
        return any(phrase.lower() in text for phrase in phrases)

    return 0.5 + 0.5 * (has(reply_b) - has(reply_a))
