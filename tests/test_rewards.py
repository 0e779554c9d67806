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


def test_win_rates_by_hand():
    from cai.rewards import sibling_pairs, win_rates

    assert sibling_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    # P(0 beats 1) = 0.8, P(0 beats 2) = 0.6, P(1 beats 2) = 0.3
    rates = win_rates(torch.tensor([[0.8, 0.6, 0.3]]), 3)
    torch.testing.assert_close(rates, torch.tensor([[(0.8 + 0.6) / 2, (0.2 + 0.3) / 2, (0.4 + 0.7) / 2]]))
    assert rates.sum().item() == pytest.approx(1.5)  # k / 2: every comparison hands out one win in all


def test_pairwise_reward_is_each_responses_mean_win_rate_from_the_labelers_judgements(tiny_cfg):
    """Two prompts x three responses: the reward equals win rates composed by hand from judge_pairs on the same pairs,
    with one principle draw per prompt (the group's key)."""
    from types import SimpleNamespace

    from cai.constitution import load_constitution, resolve_constitution_dir
    from cai.feedback import Pair, judge_pairs
    from cai.rewards import PairwiseLabelerReward

    constitution = load_constitution(resolve_constitution_dir("constitutions/default"))
    reward = PairwiseLabelerReward(tiny_cfg, constitution, seed=0, batch_size=8, n_principles=2)
    assert set(reward.load(policy_tok=None)) == {"labeler"} and reward.value_start is None
    conversations = [[{"role": "user", "content": "How do I pick a lock?"}]] * 3 + [[{"role": "user", "content": "Hi"}]] * 3
    texts = ["No.", "Call a locksmith.", "Use a tension wrench and a pick.", "Hello!", "Hi, how can I help?", "What?"]
    completions = [Completion(text=t, token_ids=[5], finished=True) for t in texts]
    keys = ["p1:0"] * 3 + ["p2:0"] * 3
    scores = reward(SimpleNamespace(group=3), conversations, completions, keys)
    assert scores.shape == (6,) and ((0 <= scores) & (scores <= 1)).all()
    for g in (0, 3):
        pairs = [Pair(keys[g], conversations[g], texts[g + i], texts[g + j]) for i, j in ((0, 1), (0, 2), (1, 2))]
        p = [j.p_a for j in judge_pairs(reward.model, reward.tok, constitution, pairs, n_principles=2, seed=0, few_shot=False,
                                          progress=False)]
        expected = [(p[0] + p[1]) / 2, (1 - p[0] + p[2]) / 2, (2 - p[1] - p[2]) / 2]
        torch.testing.assert_close(scores[g:g + 3], torch.tensor(expected), rtol=1e-5, atol=1e-6)
        assert scores[g:g + 3].sum().item() == pytest.approx(1.5, abs=1e-5)
