"""Rewards for the PPO tests, named by ``ppo.reward=custom ppo.reward_fn={_target_: tests.ppo_rewards.NAME, ...}``
exactly as a user names their own (the stage runs from the repository root, where ``tests`` imports)."""

from __future__ import annotations

_calls = []


def share_of_token(conversations, completions, token: int) -> list[float]:
    """The share of ``token`` among each completion's tokens: a behaviour a tiny policy can learn."""
    return [sum(t == token for t in c.token_ids) / max(1, len(c.token_ids)) for c in completions]


def nan_on_call(conversations, completions, call: int) -> list[float]:
    """0.5 for every completion, except NaN on the ``call``-th call in this process."""
    _calls.append(1)
    return [float("nan") if len(_calls) == call else 0.5] * len(completions)
