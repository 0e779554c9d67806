"""Where the RL stage's score comes from: one small component, chosen by ``ppo.reward``.

- ``pm`` (``PreferenceModelReward``): the preference model's score at the last real token of prompt + response,
  plus the reward shift stored in its config. The value model starts from it.
- ``direct_rlaif`` (``DirectRLAIFReward``): the ``labeler`` role rates each response 1..10 with the constitution's
  rating template (``score.j2``: one fixed instruction, so a response gets the same reward at every step); the
  expected score, mapped to [-1, 1]. No PM; the value model starts from the policy with a fresh head.
- ``pairwise`` (``PairwiseLabelerReward``): the ``labeler`` role compares the k responses to each prompt two by two,
  as ai_feedback compares a pair (comparison principles drawn per (prompt, step), both orders, one prefill each);
  each response's reward is its mean soft win rate against its k - 1 siblings, in [0, 1]. Needs k >= 2; no PM.
- ``custom`` (``FunctionReward``): any Python function named by ``ppo.reward_fn`` (``{_target_: package.module.fn,
  ...keyword arguments}``), called as ``fn(conversations, completions) -> one float per completion``.

Each is made from its checked inputs without loading anything, so a finished run can be reused at no cost, and
has ``fingerprint`` (what the stage records and compares before reusing a finished run), ``constitution_hash`` (the
constitution it reads, or None) and ``value_start`` (the model spec the value model starts from; None: the
policy's). ``load(policy_tok)`` loads its models and returns them by role; then ``reward(batch, conversations,
completions, keys)`` -> (B,) float scores, where ``batch`` carries the policy's tokens (``query``, ``query_mask``,
``response``, ``mask``; each run of ``group`` rows answers one prompt) and
``keys`` name each (prompt, step) for seeded principle draws.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from cai.errors import StageInputError
from cai.generation import Completion


class PreferenceModelReward:
    """The PM's score of the policy's own tokens (the PM must share the policy's tokenizer)."""

    constitution_hash = None

    def __init__(self, pm_cfg: dict, fingerprint: str):
        self.fingerprint, self.value_start = fingerprint, pm_cfg

    def load(self, policy_tok) -> dict:
        from cai.models import load_preference_model

        self.model, pm_tok = load_preference_model(self.value_start)
        same_tokenizer(policy_tok, pm_tok, self.value_start["path"])
        self.model.requires_grad_(False)
        return {"reward": self.model}

    @torch.no_grad()
    def __call__(self, batch, conversations, completions, keys) -> torch.Tensor:
        from cai import rl
        from cai.models import backbone_call, response_forward
        from cai.preference import reward_shift

        hidden = response_forward(backbone_call(self.model), batch.query, batch.query_mask, batch.response, batch.mask,
                                  batch.group)  # (B, R + 1, H): the last prompt position, then each response token
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), rl.last_index(batch.mask) + 1]
        return self.model.score(last).squeeze(-1).float() + reward_shift(self.model)


class DirectRLAIFReward:
    """The labeler's expected 1..10 rating of each response (the constitution's rating template), in [-1, 1]."""

    value_start = None

    def __init__(self, labeler_cfg, constitution):
        from cai.roles import FUNCTION

        if labeler_cfg.get("engine") == FUNCTION:
            raise StageInputError("ppo.reward=direct_rlaif asks the labeler for 1..10 ratings, but labeler.engine=function "
                                  "compares two replies: use ppo.reward=pairwise (or ppo.reward=custom for a scoring function)")
        self.labeler_cfg, self.constitution = labeler_cfg, constitution
        self.fingerprint, self.constitution_hash = f"direct_rlaif:{constitution.hash}", constitution.hash

    def load(self, policy_tok) -> dict:
        from cai.engines import load_generator

        self.model, self.tok = load_generator(self.labeler_cfg)
        return {"labeler": self.model}

    @torch.no_grad()
    def __call__(self, batch, conversations, completions, keys) -> torch.Tensor:
        from cai.feedback import direct_scores

        items = [(conv, c.text) for conv, c in zip(conversations, completions)]
        return torch.tensor(direct_scores(self.model, self.tok, self.constitution, items))


class PairwiseLabelerReward:
    """Each response's mean soft win rate against the other responses to its prompt, judged by the labeler."""

    value_start = None

    def __init__(self, labeler_cfg, constitution, seed: int, batch_size: int, n_principles: int):
        self.labeler_cfg, self.constitution, self.seed, self.batch_size = labeler_cfg, constitution, seed, batch_size
        self.n_principles = n_principles
        self.fingerprint = f"pairwise:{n_principles}:{constitution.hash}"
        self.constitution_hash = constitution.hash

    def load(self, policy_tok) -> dict:
        from cai.engines import load_generator

        self.model, self.tok = load_generator(self.labeler_cfg)
        return {"labeler": self.model}

    @torch.no_grad()
    def __call__(self, batch, conversations, completions, keys) -> torch.Tensor:
        from cai.feedback import Pair, judge_pairs

        k = batch.group
        pairs = [Pair(keys[g], conversations[g], completions[g + i].text, completions[g + j].text)  # one key per group:
                 for g in range(0, len(completions), k) for i, j in sibling_pairs(k)]              # the same principles
        judged = judge_pairs(self.model, self.tok, self.constitution, pairs, n_principles=self.n_principles, seed=self.seed,
                             few_shot=False, batch_size=self.batch_size, progress=False)
        p_first = torch.tensor([j.p_a for j in judged]).view(-1, len(sibling_pairs(k)))
        return win_rates(p_first, k).reshape(-1)


def sibling_pairs(k: int) -> list[tuple[int, int]]:
    """The k (k - 1) / 2 pairs (i, j), i < j, of a group of k responses, in a fixed order."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def win_rates(p_first: torch.Tensor, k: int) -> torch.Tensor:
    """(P, k (k - 1) / 2) P(response i beats j) for ``sibling_pairs(k)`` -> (P, k): each response's mean probability of
    beating each of its k - 1 siblings (the pair (i, j) gives i p and j 1 - p)."""
    wins = torch.zeros(p_first.shape[0], k, dtype=p_first.dtype)
    for n, (i, j) in enumerate(sibling_pairs(k)):
        wins[:, i] += p_first[:, n]
        wins[:, j] += 1 - p_first[:, n]
    return wins / (k - 1)


class FunctionReward:
    """A user's function ``fn(conversations, completions) -> list[float]``."""

    constitution_hash, value_start = None, None

    def __init__(self, fn: Callable[[Sequence[list[dict]], Sequence[Completion]], Sequence[float]], name: str):
        self.fn, self.fingerprint = fn, f"custom:{name}"

    def load(self, policy_tok) -> dict:
        return {}

    def __call__(self, batch, conversations, completions, keys) -> torch.Tensor:
        scores = list(self.fn(conversations, completions))
        if len(scores) != len(completions):
            raise StageInputError(f"ppo.reward_fn={self.fingerprint[7:]} returned {len(scores)} scores for "
                                  f"{len(completions)} completions")
        return torch.tensor([float(x) for x in scores])


def function_from_config(spec) -> tuple[Callable, str]:
    """``(fn, name)`` for ``ppo.reward_fn``: ``{_target_: package.module.fn, ...}``, its other keys bound as keyword
    arguments (``cai.roles.instantiate_function``)."""
    from omegaconf import DictConfig, OmegaConf

    from cai.roles import instantiate_function

    if not isinstance(spec, (dict, DictConfig)) or "_target_" not in spec:
        raise StageInputError("ppo.reward=custom needs ppo.reward_fn={_target_: package.module.function, ...}")
    container = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    return instantiate_function(container, "ppo.reward_fn"), str(spec["_target_"])


def same_tokenizer(policy_tok, reward_tok, where: str) -> None:
    """Refuse a PM whose tokenizer differs from the policy's: PPO scores the policy's tokens directly and starts the
    value model from the PM."""
    if policy_tok.get_vocab() != reward_tok.get_vocab() or policy_tok.eos_token_id != reward_tok.eos_token_id:
        raise StageInputError(f"{where}: the PM's tokenizer differs from the policy's; PPO scores policy tokens directly and "
                              f"starts the value model from the PM, so both must share one tokenizer (train the PM on the "
                              f"policy's base model)")
