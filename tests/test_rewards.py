"""cai.rewards: a custom reward named by ``_target_`` (the PM and direct-RLAIF rewards run in tests/test_ppo.py)."""

from __future__ import annotations

import pytest
import torch

from cai.errors import StageInputError
from cai.generation import Completion
from cai.rewards import FunctionReward, function_from_config

COMPLETIONS = [Completion(text="a", token_ids=[5, 7, 5], finished=False), Completion(text="b", token_ids=[7], finished=False)]


def test_a_function_named_by_target_gets_its_keyword_arguments_bound():
    fn, name = function_from_config({"_target_": "tests.ppo_rewards.share_of_token", "token": 5})
    reward = FunctionReward(fn, name)
    assert reward.fingerprint == "custom:tests.ppo_rewards.share_of_token"
    assert reward.load(policy_tok=None) == {} and reward.value_start is None and reward.constitution_hash is None
    scores = reward(None, [[], []], COMPLETIONS, ["k1", "k2"])
    assert torch.equal(scores, torch.tensor([2 / 3, 0.0]))


def test_reward_fn_values_may_interpolate_the_config():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"seed": 5, "ppo": {"reward_fn": {"_target_": "tests.ppo_rewards.share_of_token", "token": "${seed}"}}})
    fn, _ = function_from_config(cfg.ppo.reward_fn)
    assert fn([[], []], COMPLETIONS) == [2 / 3, 0.0]


@pytest.mark.parametrize("spec, message", [
    (None, "ppo.reward=custom needs ppo.reward_fn={_target_: package.module.function, ...}"),
    ({"token": 5}, "ppo.reward=custom needs ppo.reward_fn="),
    ({"_target_": "tests.ppo_rewards.no_such_function"}, "ppo.reward_fn._target_='tests.ppo_rewards.no_such_function': "),
])
def test_a_bad_reward_fn_is_named(spec, message):
    with pytest.raises(StageInputError, match=message.replace("(", "\\(").replace("[", "\\[").replace("{", "\\{")):
        function_from_config(spec)


def test_a_function_returning_the_wrong_number_of_scores_is_named():
    reward = FunctionReward(lambda conversations, completions: [1.0], "tests.one_score")
    with pytest.raises(StageInputError, match="ppo.reward_fn=tests.one_score returned 1 scores for 2 completions"):
        reward(None, [[], []], COMPLETIONS, ["k1", "k2"])
