"""RL maths (cai.rl) against hand-computed values: PPO's and the critic-free methods'."""

from __future__ import annotations

import math
import re

import pytest
import torch

from cai import rl


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_gae_by_hand():
    # one row, reward only at the end: deltas (0, 0, 0.5); A = (0.95^2 * 0.5, 0.95 * 0.5, 0.5)
    adv, ret = rl.gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.5, 0.5]]), t([[1, 1, 1]]), gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, t([[0.45125, 0.475, 0.5]]))
    torch.testing.assert_close(ret, t([[0.95125, 0.975, 1.0]]))
    # padding: the value after the last real token counts as 0 and padded positions stay 0
    adv, ret = rl.gae(t([[0.0, 2.0, 0.0]]), t([[1.0, 1.0, 9.0]]), t([[1, 1, 0]]), gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, t([[0.95, 1.0, 0.0]]))
    torch.testing.assert_close(ret, t([[1.95, 2.0, 0.0]]))
    # lambda = 1: A_t = discounted return - V_t (gamma 0.5: G = 0.25, 0.5, 1)
    adv, _ = rl.gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.5, 0.5]]), t([[1, 1, 1]]), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, t([[-0.25, 0.0, 0.5]]))


def test_whiten_uses_only_real_tokens():
    out = rl.whiten(t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]]))
    s = math.sqrt(2 / 3)
    torch.testing.assert_close(out, t([[-1 / s, 0.0, 1 / s, 0.0]]), rtol=1e-6, atol=1e-6)
    kept_mean = rl.whiten(t([[1.0, 2.0, 3.0]]), t([[1, 1, 1]]), shift_mean=False)
    torch.testing.assert_close(kept_mean, t([[2 - 1 / s, 2.0, 2 + 1 / s]]), rtol=1e-6, atol=1e-6)


def test_kl_estimators_by_hand():
    logp, ref = t([[math.log(0.5)]]), t([[math.log(0.25)]])
    assert rl.kl_per_token(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert rl.kl_per_token(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))  # (r - 1) - log r, r = 0.5
    assert rl.kl_per_token(ref, logp, "k3").item() == pytest.approx(1.0 - math.log(2))   # r = 2: never negative
    with pytest.raises(ValueError, match="k1 or k3"):
        rl.kl_per_token(logp, ref, "k2")


def test_clipped_policy_loss_by_hand():
    old = t([[0.0, 0.0, 0.0, 0.0]])
    new = t([[math.log(1.5), math.log(0.5), math.log(1.1), 5.0]])  # last position is padding
    adv = t([[1.0, -1.0, 2.0, 100.0]])
    loss, clip_frac, approx_kl = rl.policy_loss(new, old, adv, t([[1, 1, 1, 0]]), clip_range=0.2)
    # max(-A r, -A clip(r)): (-1.2), (0.8), (-2.2) -> mean -0.8667; the first two were clipped
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert clip_frac.item() == pytest.approx(2 / 3)
    expected_kl = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5)) + (0.1 - math.log(1.1))) / 3
    assert approx_kl.item() == pytest.approx(expected_kl)


def test_clipped_value_loss_by_hand():
    loss, clip_frac = rl.value_loss(t([[2.0, 0.0, 7.0]]), t([[1.0, 1.0, 0.0]]), t([[3.0, 0.5, 0.0]]), t([[1, 1, 0]]),
                                    clip_range=0.5)
    # token 1: clipped V 1.5 -> (1.5 - 3)^2 = 2.25 > (2 - 3)^2; token 2: clipped 0.5 -> 0 < (0 - 0.5)^2 = 0.25
    assert loss.item() == pytest.approx(0.5 * (2.25 + 0.25) / 2)
    assert clip_frac.item() == pytest.approx(0.5)


def test_reward_goes_to_the_last_real_token_with_kl_everywhere():
    rewards = rl.token_rewards(t([2.0, -1.0]), t([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]]), t([[1, 1, 1], [1, 1, 0]]), kl_coef=0.1)
    torch.testing.assert_close(rewards, t([[-0.01, -0.02, 1.97], [-0.05, -1.05, 0.0]]))
    assert rl.last_index(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])).tolist() == [1, 3, 0]


def test_truncation_after_the_first_eos_and_the_missing_eos_penalty():
    ids, mask, has_eos = rl.truncate_after_eos(torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]]), eos_id=2, pad_id=0)
    assert ids.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]
    scores = rl.apply_missing_eos_penalty(t([1.0, 1.0, 0.2]), has_eos, penalty=0.5)
    torch.testing.assert_close(scores, t([1.0, 0.5, 0.2]))
    # Huang et al.'s treatment: the score of the response without EOS is replaced, whatever the PM said
    scores = rl.apply_missing_eos_penalty(t([1.0, 3.0, 0.2]), has_eos, penalty=0.5, constant=-1.0)
    torch.testing.assert_close(scores, t([1.0, -1.0, 0.2]))


def test_logprobs_and_entropy_use_the_sampling_temperature():
    logits = t([[[2.0, 0.0]]])
    assert rl.logprobs_from_logits(logits, torch.tensor([[0]]), temperature=2.0).item() == pytest.approx(1 - math.log(math.e + 1))
    p = math.e / (math.e + 1)
    assert rl.entropy_from_logits(logits, temperature=2.0).item() == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)))


def test_adaptive_kl_controller():
    ctl = rl.AdaptiveKL(0.1, target=6.0, horizon=100)
    assert ctl.update(kl=12.0, n_samples=10) == pytest.approx(0.1 * 1.02)      # error clipped to +0.2
    assert ctl.update(kl=3.0, n_samples=10) == pytest.approx(0.1 * 1.02 * 0.98)  # error clipped to -0.2
    restored = rl.AdaptiveKL(0.5)
    restored.load(ctl.state())
    assert restored.value == ctl.value
    fixed = rl.AdaptiveKL(0.05)
    assert fixed.update(kl=100.0, n_samples=64) == 0.05
    capped = rl.AdaptiveKL(0.9, target=1.0, horizon=10, ceiling=1.0)  # reinforce's alpha
    assert capped.update(kl=12.0, n_samples=10) == 1.0  # 0.9 * 1.2 = 1.08, held at the ceiling


def test_group_advantages_by_hand():
    rewards = t([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])  # two prompts, k = 4 responses each
    # rloo: 1 - mean(2, 3, 6) = -2.6667, 2 - mean(1, 3, 6) = -1.3333, 3 - 3 = 0, 6 - 2 = 4; an equal group gives 0
    torch.testing.assert_close(rl.group_advantages(rewards, 4, "rloo"),
                               torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0, 0, 0, 0]))
    # dr_grpo: minus the group mean 3
    torch.testing.assert_close(rl.group_advantages(rewards, 4, "dr_grpo"), torch.tensor([-2.0, -1.0, 0.0, 3.0, 0, 0, 0, 0]))
    # grpo: divided by the group's std with Bessel's correction: sqrt((4 + 1 + 0 + 9) / 3) = 2.1602
    sd = math.sqrt(14 / 3)
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0, 0, 0, 0, 0]) / (torch.tensor([sd] * 4 + [0.0] * 4) + 1e-4)
    torch.testing.assert_close(rl.group_advantages(rewards, 4, "grpo"), expected)
    # two samples: rloo's baseline is the sibling itself
    torch.testing.assert_close(rl.group_advantages(t([0.2, 0.7]), 2, "rloo"), torch.tensor([-0.5, 0.5]))
    with pytest.raises(ValueError, match="groups of >= 2"):
        rl.group_advantages(rewards, 3, "rloo")
    with pytest.raises(ValueError, match="rloo, grpo or dr_grpo"):
        rl.group_advantages(rewards, 4, "ppo")


def test_reinforce_advantages_by_hand():
    # alpha 0.1: rewards 0.9 * 1 - 0.1 * 2 = 0.7 and 0.9 * -0.5 - 0.1 * 0 = -0.45; less the baselines 0.3 and -0.2
    rewards, advantages = rl.reinforce_advantages(t([1.0, -0.5]), t([2.0, 0.0]), t([0.3, -0.2]), alpha=0.1)
    torch.testing.assert_close(rewards, torch.tensor([0.7, -0.45]))
    torch.testing.assert_close(advantages, torch.tensor([0.4, -0.25]))
    # alpha 0: the score alone; alpha 1: only the KL counts
    torch.testing.assert_close(rl.reinforce_advantages(t([1.0]), t([3.0]), t([0.0]), alpha=0.0)[0], torch.tensor([1.0]))
    torch.testing.assert_close(rl.reinforce_advantages(t([1.0]), t([3.0]), t([0.0]), alpha=1.0)[0], torch.tensor([-3.0]))


def test_group_spread_is_the_mean_of_each_groups_population_std():
    # groups (0, 2): std 1; (5, 5): std 0 -> mean 0.5
    assert rl.group_spread(t([0.0, 2.0, 5.0, 5.0]), 2).item() == pytest.approx(0.5)


def test_loss_aggregations_by_hand():
    x = t([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 1], [1, 0, 0, 0]])  # a 4-token and a 1-token response
    assert rl.aggregate(x, mask, "token_mean").item() == pytest.approx(8 / 5)            # every token alike
    assert rl.aggregate(x, mask, "sequence_mean").item() == pytest.approx((1 + 4) / 2)   # each response alike
    assert rl.aggregate(x, mask, "constant", max_len=8).item() == pytest.approx((4 / 8 + 4 / 8) / 2)
    with pytest.raises(ValueError, match="max_len"):
        rl.aggregate(x, mask, "constant")
    with pytest.raises(ValueError, match="token_mean, sequence_mean or constant"):
        rl.aggregate(x, mask, "sum")


def test_one_pass_policy_loss_is_reinforce():
    """ratio = 1 on the rollout's own log-probs: the loss is -A per token and its gradient -A * d log pi."""
    logp = t([[math.log(0.5), math.log(0.25), 0.0]]).requires_grad_()
    adv, mask = t([[2.0, 2.0, 2.0]]), t([[1, 1, 0]])
    loss, clip_frac, _ = rl.policy_loss(logp, logp.detach(), adv, mask, clip_range=0.2, aggregation="sequence_mean")
    loss.backward()
    assert loss.item() == pytest.approx(-2.0) and clip_frac.item() == 0.0
    torch.testing.assert_close(logp.grad, t([[-1.0, -1.0, 0.0]]))  # -A / (2 real tokens), nothing for padding


def test_sequence_policy_loss_by_hand():
    """RLOO as its paper and TRL's RLOOTrainer write it: one ratio per response, the product of its tokens' ratios."""
    old = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    new = t([[math.log(2.0), math.log(0.75), 5.0], [math.log(0.5), math.log(1.8), -3.0]])  # the last column is padding
    mask, adv = t([[1, 1, 0], [1, 1, 0]]), t([1.0, -1.0])
    loss, clip_frac, approx_kl = rl.sequence_policy_loss(new, old, adv, mask, clip_range=0.2)
    # ratios 2 * 0.75 = 1.5 and 0.5 * 1.8 = 0.9; max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2 (clipped),
    # max(0.9, 0.9) = 0.9 (not clipped) -> mean over the two responses -0.15
    assert loss.item() == pytest.approx((-1.2 + 0.9) / 2)
    assert clip_frac.item() == pytest.approx(1 / 2)
    # approx KL stays per token: (r - 1) - log r over the 4 real tokens
    expected_kl = sum(r - 1 - math.log(r) for r in (2.0, 0.75, 0.5, 1.8)) / 4
    assert approx_kl.item() == pytest.approx(expected_kl)
    # the per-token form clips each token instead: max(-2, -1.2), max(-0.75, -0.8), max(0.5, 0.8), max(1.8, 1.2)
    token_loss, _, _ = rl.policy_loss(new, old, adv.unsqueeze(1) * mask, mask, clip_range=0.2)
    assert token_loss.item() == pytest.approx((-1.2 - 0.75 + 0.8 + 1.8) / 4)


def test_sequence_policy_loss_gradient_sums_a_responses_tokens():
    """At ratio 1 the gradient is -A at each real token (the response's log-probability is their sum); the token form's
    sequence_mean gives -A / (real tokens)."""
    logp = t([[math.log(0.5), math.log(0.25), 0.0]]).requires_grad_()
    loss, clip_frac, _ = rl.sequence_policy_loss(logp, logp.detach(), t([2.0]), t([[1, 1, 0]]), clip_range=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-2.0) and clip_frac.item() == 0.0
    torch.testing.assert_close(logp.grad, t([[-2.0, -2.0, 0.0]]))


def test_sequence_policy_loss_with_one_token_per_response_is_the_token_loss():
    logp = t([[0.3, 9.0], [-0.4, -9.0], [0.05, 2.0], [-0.1, 0.0]])  # one real token per row, then padding
    old = t([[0.0, 0.0], [0.0, 0.0], [0.1, 0.0], [0.0, 0.0]])
    mask, adv = t([[1, 0]] * 4), t([1.0, 2.0, -1.0, -0.5])
    sequence = rl.sequence_policy_loss(logp, old, adv, mask, clip_range=0.2)
    token = rl.policy_loss(logp, old, adv.unsqueeze(1) * mask, mask, clip_range=0.2)
    for a, b in zip(sequence, token):
        torch.testing.assert_close(a, b)
    assert 0 < sequence[1].item() < 1  # some rows were clipped, some not: both branches compared


def _settings(algorithm, **kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"algorithm": algorithm, "samples_per_prompt": None, "kl_in": None, "kl_coef": 0.05,
                              "rloo_ratio": "token", "dpo_loss": "sigmoid", **kw})


@pytest.mark.parametrize("name, k, kl_in, aggregation, critic, ceiling", [
    ("ppo", 1, "reward", "token_mean", "token", None),
    ("rloo", 4, "reward", "token_mean", None, None),
    ("grpo", 4, "loss", "sequence_mean", None, None),
    ("dr_grpo", 4, "loss", "constant", None, None),
    ("reinforce", 1, "reward", "constant", "prompt", 1.0),
])
def test_algorithm_resolves_the_nulls_to_each_algorithms_practice(name, k, kl_in, aggregation, critic, ceiling):
    algo = rl.algorithm(_settings(name))
    assert (algo.k, algo.kl_in, algo.aggregation, algo.critic, algo.kl_ceiling, algo.ratio) == (k, kl_in, aggregation, critic,
                                                                                               ceiling, "token")
    assert rl.algorithm(_settings(name, samples_per_prompt=2, kl_in="reward")).k == 2
    if name == "rloo":
        assert rl.algorithm(_settings(name, rloo_ratio="sequence")).ratio == "sequence"
    else:
        with pytest.raises(ValueError, match=f"x.rloo_ratio=sequence is RLOO's one ratio per response: it needs "
                                             f"x.algorithm=rloo, got {name}"):
            rl.algorithm(_settings(name, rloo_ratio="sequence"), "x")


def test_each_algorithms_advantages_targets_and_logged_reward():
    scores, mask = t([1.0, 0.0, 2.0, 0.5]), t([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    beta = 0.1
    kl = t([[0.1, 0.2, 0.3], [0.4, -0.2, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    seq_kl = kl.sum(dim=1)  # 0.6, 0.2, 1.0, 0.5
    # rloo (k = 2), KL in the reward: rewards 0.94, -0.02 | 1.9, 0.45 -> leave-one-out 0.96, -0.96 | 1.45, -1.45 at every real token
    rloo = rl.algorithm(_settings("rloo", samples_per_prompt=2))
    adv, targets = rloo.advantages(scores, kl, mask, beta)
    torch.testing.assert_close(adv, t([0.96, -0.96, 1.45, -1.45]).unsqueeze(1) * mask)
    assert targets is None
    torch.testing.assert_close(rloo.reward(scores, seq_kl, beta), scores - beta * seq_kl)
    # grpo puts the KL in the loss: its advantages read the scores alone
    grpo = rl.algorithm(_settings("grpo", samples_per_prompt=2))
    torch.testing.assert_close(grpo.advantages(scores, kl, mask, beta)[0],
                               rl.group_advantages(scores, 2, "grpo").unsqueeze(1) * mask)
    # reinforce: rewards 0.9 * score - 0.1 * KL = 0.84, -0.02, 1.7, 0.4 less V(x); the rewards are the targets and logged
    reinforce = rl.algorithm(_settings("reinforce", kl_coef=0.1))
    adv, targets = reinforce.advantages(scores, kl, mask, beta, t([0.5, 0.0, 1.0, 0.4]))
    torch.testing.assert_close(targets, torch.tensor([0.84, -0.02, 1.7, 0.4]))
    torch.testing.assert_close(adv, torch.tensor([0.34, -0.02, 0.7, 0.0]).double().unsqueeze(1) * mask)
    assert reinforce.reward(scores, seq_kl, beta, targets) is targets
    # ppo: GAE on the per-token rewards against per-token values, whitened
    values = t([[0.1, 0.2, 0.3], [0.0, 0.1, 0.0], [0.5, 0.0, 0.0], [0.2, 0.2, 0.2]])
    adv, targets = rl.algorithm(_settings("ppo")).advantages(scores, kl, mask, beta, values, gamma=1.0, lam=0.95)
    expected, returns = rl.gae(rl.token_rewards(scores, kl, mask, beta), values, mask, 1.0, 0.95)
    torch.testing.assert_close(adv, rl.whiten(expected, mask))
    torch.testing.assert_close(targets, returns)


def test_each_algorithms_losses():
    logp, old, ref = t([[0.1, -0.2, 0.0], [0.3, 0.0, 0.0]]), t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), t([[-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask, adv = t([[1, 1, 0], [1, 0, 0]]), t([[1.0, 1.0, 0.0], [-2.0, 0.0, 0.0]])
    losses, figures = rl.algorithm(_settings("ppo")).policy_losses(logp, old, ref, adv, mask, 0.2)
    assert losses.keys() == {"policy_loss"} and figures.keys() == {"clip_frac", "approx_kl"}
    torch.testing.assert_close(losses["policy_loss"], rl.policy_loss(logp, old, adv, mask, 0.2)[0])
    losses, _ = rl.algorithm(_settings("grpo", samples_per_prompt=2)).policy_losses(logp, old, ref, adv, mask, 0.2)
    torch.testing.assert_close(losses["kl_loss"], rl.aggregate(rl.kl_per_token(logp, ref, "k3"), mask, "sequence_mean"))
    sequence = rl.algorithm(_settings("rloo", rloo_ratio="sequence")).policy_losses(logp, old, ref, adv, mask, 0.2)
    torch.testing.assert_close(sequence[0]["policy_loss"], rl.sequence_policy_loss(logp, old, t([1.0, -2.0]), mask, 0.2)[0])
    # reinforce's value model predicts one V(x) per response: the clipped loss on (B, 1)
    v, v_old, target = t([1.0, 0.0]), t([0.5, 0.0]), t([2.0, 1.0])
    loss, v_clip = rl.algorithm(_settings("reinforce")).critic_loss(v, v_old, target, mask, 0.2)
    # V 1.0 clipped to 0.7: (0.7 - 2)^2 = 1.69 > (1 - 2)^2 = 1; V 0.0: (0 - 1)^2 = 1 either way -> 0.5 * (1.69 + 1) / 2
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2) and v_clip.item() == pytest.approx(0.5)


def test_dpo_losses_by_hand():
    # beta 0.5; chosen -1 (ref -2), rejected -3 (ref -2.5): h = 1 - (-0.5) = 1.5, beta * h = 0.75
    args = (t([-1.0]), t([-3.0]), t([-2.0]), t([-2.5]), 0.5)
    sigmoid, chosen, rejected = rl.dpo_loss(*args, loss="sigmoid")
    torch.testing.assert_close(sigmoid, t([math.log(1 + math.exp(-0.75))]))  # -log sigma(0.75) = 0.386871
    torch.testing.assert_close(chosen, t([0.5]))  # beta * (-1 + 2)
    torch.testing.assert_close(rejected, t([-0.25]))  # beta * (-3 + 2.5)
    # ipo: (h - 1 / (2 beta))^2 = (1.5 - 1)^2
    torch.testing.assert_close(rl.dpo_loss(*args, loss="ipo")[0], t([0.25]))
    # soft, p = 0.8: 0.8 * 0.386871 + 0.2 * (0.75 + 0.386871) = 0.536871 (= sigmoid + (1 - p) * beta * h)
    torch.testing.assert_close(rl.dpo_loss(*args, loss="soft", p_chosen=t([0.8]))[0], t([0.536871]),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="p_chosen"):
        rl.dpo_loss(*args, loss="soft")
    with pytest.raises(ValueError, match="sigmoid, ipo, soft"):
        rl.dpo_loss(*args, loss="hinge")


def test_soft_dpo_is_sigmoid_at_hard_labels_and_pulls_half_labels_to_a_zero_margin():
    g = torch.Generator().manual_seed(0)
    logps = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(4)]
    sigmoid = rl.dpo_loss(*logps, 0.1, loss="sigmoid")[0]
    assert torch.equal(rl.dpo_loss(*logps, 0.1, loss="soft", p_chosen=torch.ones(6))[0], sigmoid)
    # p = 0: the pair read the other way round
    swapped = rl.dpo_loss(logps[1], logps[0], logps[3], logps[2], 0.1, loss="sigmoid")[0]
    torch.testing.assert_close(rl.dpo_loss(*logps, 0.1, loss="soft", p_chosen=torch.zeros(6))[0], swapped)
    # the gradient in the margin is sigma(beta * h) - p: a pair labelled 1/2 at margin 0 teaches nothing
    chosen = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    rl.dpo_loss(chosen, t([0.0]), t([0.0]), t([0.0]), 0.1, loss="soft", p_chosen=t([0.5]))[0].sum().backward()
    assert chosen.grad.abs().item() < 1e-12


def test_pair_labels_from_win_rates_and_from_scalar_scores():
    # the pairwise labeler's win rates p, 1 - p give back p; a missing-EOS penalty of 1 on the second makes it lose outright
    torch.testing.assert_close(rl.pair_labels(t([0.7, 0.3, 0.2, 0.8]), True), t([0.7, 0.3, 0.2, 0.8]))
    torch.testing.assert_close(rl.pair_labels(t([0.7, 0.3 - 1.0, 0.2 - 0.2, 0.8]), True), t([1.0, 0.0, 0.1, 0.9]))
    # a scalar reward: Bradley-Terry, sigma(s_a - s_b)
    torch.testing.assert_close(rl.pair_labels(t([2.0, 1.0, 0.0, 0.0]), False),
                               t([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1)), 0.5, 0.5]))


def test_online_dpo_loss_by_hand():
    # two pairs of one-or-two-token replies; pair 0's second reply is the better (label 0.2), pair 1 is a tie
    logp = t([[-1.0, -1.0], [-0.5, 0.0], [-2.0, 0.0], [-2.0, 0.0]])
    ref = t([[-0.5, -0.5], [-1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    mask = t([[1, 1], [1, 0], [1, 0], [1, 0]])
    labels = t([0.2, 0.8, 0.5, 0.5])
    # pair 0: chosen = row 1 (log-ratio 0.5), rejected = row 0 (log-ratio -1): h = 1.5, beta * h = 0.75
    loss, figures = rl.online_dpo_loss(logp, ref, labels, mask, 0.5, "sigmoid")
    torch.testing.assert_close(loss, t(math.log(1 + math.exp(-0.75))))  # the tie does not count under sigmoid
    assert figures["pairs_used"].item() == 0.5 and figures["accuracy"].item() == 1.0
    torch.testing.assert_close(figures["margin"], t(0.75))
    # soft: the chosen's p is 0.8, and the tie counts with h = 0: -log sigma(0) = log 2
    soft, figures = rl.online_dpo_loss(logp, ref, labels, mask, 0.5, "soft")
    expected = (0.8 * math.log(1 + math.exp(-0.75)) + 0.2 * math.log(1 + math.exp(0.75)) + math.log(2)) / 2
    torch.testing.assert_close(soft, t(expected))
    assert figures["pairs_used"].item() == 1.0
    # the same as the DPO stage's loss on the pair read as chosen/rejected
    torch.testing.assert_close(rl.online_dpo_loss(logp[:2], ref[:2], labels[:2], mask[:2], 0.5, "ipo")[0],
                               rl.dpo_loss(t([-0.5]), t([-2.0]), t([-1.0]), t([-1.0]), 0.5, "ipo")[0][0])


def test_online_dpo_settings():
    algo = rl.algorithm(_settings("online_dpo", dpo_loss="soft"))
    assert (algo.k, algo.kl_in, algo.critic, algo.preference, algo.tempered, algo.dpo_loss) == (2, "implicit", None, True,
                                                                                               False, "soft")
    assert not rl.algorithm(_settings("grpo")).preference and rl.algorithm(_settings("grpo")).tempered
    labels = rl.algorithm(_settings("online_dpo")).advantages(t([0.9, 0.1]), torch.zeros(2, 2), t([[1, 1], [1, 0]]), 0.1,
                                                              win_rates=True)[0]
    torch.testing.assert_close(labels, t([[0.9, 0.9], [0.1, 0.0]]))
    for bad, match in [({"samples_per_prompt": 4}, "x.samples_per_prompt must be 2 or null, got 4"),
                       ({"kl_in": "loss"}, "x.kl_in must be null, got loss"),
                       ({"dpo_loss": "hinge"}, "x.dpo_loss must be one of sigmoid, ipo, soft, got 'hinge'"),
                       ({"kl_coef": 0.0}, "x.kl_coef is DPO's beta and must be > 0, got 0.0")]:
        with pytest.raises(ValueError, match=re.escape(match)):
            rl.algorithm(_settings("online_dpo", **bad), "x")



def test_packed_pair_attention_by_hand():
    # one pair: a prompt of 2 tokens left-padded to 3, chosen 2 tokens, rejected 1 token right-padded to 2
    # columns: 0 pad | 1 p1, 2 p2 | 3 c1, 4 c2 | 5 r1, 6 pad
    allowed, positions = rl.packed_pair_attention(torch.tensor([[0, 1, 1]]), torch.tensor([[1, 1]]), torch.tensor([[1, 0]]))
    want = torch.tensor([[1, 0, 0, 0, 0, 0, 0],   # padding: itself only
                         [0, 1, 0, 0, 0, 0, 0],   # p1
                         [0, 1, 1, 0, 0, 0, 0],   # p2
                         [0, 1, 1, 1, 0, 0, 0],   # c1: the prompt and itself
                         [0, 1, 1, 1, 1, 0, 0],   # c2
                         [0, 1, 1, 0, 0, 1, 0],   # r1: the prompt and itself, never the chosen reply
                         [0, 1, 1, 0, 0, 1, 1]],  # padding after r1
                        dtype=torch.bool)
    assert torch.equal(allowed, want[None])
    # both replies continue the prompt's two positions
    assert positions.tolist() == [[0, 0, 1, 2, 3, 2, 3]]
