"""RL maths as pure functions. PPO with the implementation details of Huang et al. 2024 ("The N+ implementation
details of RLHF with PPO"): GAE, whitening, the KL estimators, the clipped losses, reward placement, EOS handling.
The critic-free methods replace the value model by a baseline from the other samples of the same prompt
(``group_advantages``): RLOO (Ahmadian et al. 2024), GRPO (Shao et al. 2024) and Dr. GRPO (Liu et al. 2025), and
differ in how a loss over tokens becomes one number (``aggregate``). RLAIF's REINFORCE keeps a value model, but
only as a baseline for the whole response (``reinforce_advantages``).

Shapes: B rows (responses), T response positions. Response tensors are right-padded: ``mask[b, t] = 1``
for the response's real tokens (up to and including its first EOS), 0 after. Log-probabilities are of
the response tokens under logits divided by the sampling temperature.

The per-token reward is r_t = -beta * KL_t, plus the sequence score at the response's last real token.
KL_t estimates KL(policy || reference) at token t from the sampled token:
k1 = log pi(a) - log pi_ref(a) (unbiased, can be negative), or k3 = (ratio - 1) - log ratio with
ratio = pi_ref(a) / pi(a) (unbiased, never negative; Schulman's estimator).

The direct-alignment losses (``dpo_loss``: DPO, IPO, and the soft cross-entropy that trains on a labeler's probability)
work on whole responses' log-probs, for the DPO stage and online DPO (Guo et al. 2024: the policy samples two responses
per prompt, the reward labels the pair, ``pair_labels``, and the DPO loss trains on it, ``online_dpo_loss``).

What differs between the algorithms — the value model, the advantages, the losses, the reward logged — is said once, in
``Algorithm`` (``algorithm()`` builds it from the stage's settings); the stage calls its methods and tests no names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: str = "token_mean", max_len: int | None = None) -> torch.Tensor:
    """(B, T) per-token losses -> scalar.

    token_mean: mean over every real token of the batch (PPO; long responses weigh more);
    sequence_mean: each row's mean over its real tokens, then the mean over rows (GRPO; a token of a short
    response weighs more than one of a long response);
    constant: each row's sum over its real tokens divided by the constant ``max_len`` (the generation budget),
    then the mean over rows (Dr. GRPO: no length bias either way).
    """
    if how == "token_mean":
        return masked_mean(x, mask)
    if how == "sequence_mean":
        return masked_mean(x, mask, dim=1).mean()
    if how == "constant":
        if not max_len:
            raise ValueError("aggregate(how='constant') needs max_len")
        return (x * mask.to(x.dtype)).sum(dim=1).mean() / max_len
    raise ValueError(f"aggregation must be token_mean, sequence_mean or constant, got {how!r}")


def group_advantages(rewards: torch.Tensor, group_size: int, how: str, eps: float = 1e-4) -> torch.Tensor:
    """(B,) sequence rewards, B = P * k with the k samples of each prompt consecutive -> (B,) advantages, each
    measured against the other samples of its prompt (k = ``group_size`` >= 2).

    rloo: r_i - mean of the other k - 1 rewards (leave-one-out; equals k / (k - 1) * (r_i - group mean));
    grpo: (r_i - group mean) / (group std + eps), std with Bessel's correction (a group of equal rewards gives 0);
    dr_grpo: r_i - group mean.
    """
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"need groups of >= 2 samples that divide the batch, got {rewards.shape[0]} rewards in groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if how == "rloo":
        out = centred * group_size / (group_size - 1)
    elif how == "grpo":
        out = centred / (r.std(dim=1, keepdim=True) + eps)
    elif how == "dr_grpo":
        out = centred
    else:
        raise ValueError(f"group advantages are rloo, grpo or dr_grpo, got {how!r}")
    return out.view(-1)


def reinforce_advantages(scores: torch.Tensor, seq_kl: torch.Tensor, baseline: torch.Tensor,
                         alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RLAIF's REINFORCE with a learned baseline (Lee et al. 2023), each response one action with a terminal reward.
    (B,) scores, (B,) summed per-token KL to the reference, (B,) the value model's V(x) of each prompt ->
    (rewards, advantages), both (B,): reward = (1 - alpha) * score - alpha * KL (alpha weighs the KL against the score
    instead of adding to it), advantage = reward - V(x); the value model learns to predict the reward."""
    rewards = (1.0 - alpha) * scores.float() - alpha * seq_kl.float()
    return rewards, rewards - baseline.float()


def group_spread(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) scores in consecutive groups of ``group_size`` -> scalar: the mean over groups of each group's std
    (population; 0 when every sample of a prompt scored the same, i.e. the group teaches nothing)."""
    return scores.float().view(-1, group_size).std(dim=1, correction=0).mean()


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(B, T) -> (B, T): (x - mean) / std over the masked positions (biased variance); masked-out
    positions become 0. ``shift_mean=False`` only rescales (used for rewards)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def truncate_after_eos(ids: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) sampled ids -> (ids with everything after the first EOS set to PAD, mask (B, T) of the kept
    tokens — the EOS included —, has_eos (B,) bool)."""
    is_eos = ids == eos_id
    has_eos = is_eos.any(dim=1)
    # position of the first EOS, or T when there is none
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, ids.shape[1], dtype=torch.long))
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    mask = (positions <= first.unsqueeze(1)).long()
    return torch.where(mask.bool(), ids, torch.full_like(ids, pad_id)), mask, has_eos


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) right-padded mask -> (B,) index of the last real position (0 for an empty row)."""
    return (mask.long().sum(dim=1) - 1).clamp(min=0)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits (B, T, V) predicting ``tokens`` (B, T) -> (B, T) log pi(token), with logits / temperature."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy of softmax(logits / temperature)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """(B, T) log-probs of the sampled tokens under the policy and the reference -> (B, T) KL estimates."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (ratio - 1) - log ratio, ratio = pi_ref / pi
    raise ValueError(f"KL estimator must be k1 or k3, got {estimator!r}")


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float,
                              constant: float | None = None) -> torch.Tensor:
    """(B,) sequence scores -> (B,): a response that never emitted EOS loses a fixed ``penalty``; with ``constant`` set,
    its score is replaced by ``constant`` instead (Huang et al. 2024: the PM never saw a response end without EOS, so
    its score there carries no information)."""
    if constant is not None:
        return torch.where(has_eos, scores, torch.full_like(scores, constant))
    return torch.where(has_eos, scores, scores - penalty)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(B,) scores, (B, T) KL, (B, T) mask -> (B, T) rewards: -kl_coef * KL at every real token and the score
    added at each row's last real token; 0 on padding."""
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded rows.

    rewards, values, mask: (B, T). delta_t = r_t + gamma * V_{t+1} - V_t, with V_{t+1} = 0 after the last
    real token; A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages, returns = A + V), both (B, T)
    and 0 on padding.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value, next_adv = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float, aggregation: str = "token_mean",
                max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate. (B, T) inputs -> (loss, clip fraction, approx KL) scalars.

    loss = ``aggregate`` (token_mean: the mean over real tokens) of max(-A * ratio, -A * clip(ratio, 1 - eps,
    1 + eps)), ratio = exp(logp - old_logp); clip fraction = share of tokens where the clipped term was the
    larger; approx KL = mean of ((ratio - 1) - log ratio) (k3 of the old policy against the new one).
    With one pass over the rollout in one minibatch, ratio = 1 and the loss is REINFORCE's -A * log pi.
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, max_len)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_frac.detach(), approx_kl.detach()


def sequence_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                         clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate with one importance ratio per response, the response being one action (RLOO as Ahmadian et
    al. 2024 and TRL's ``RLOOTrainer`` write it). logp, old_logp, mask: (B, T); advantages: (B,) -> (loss, clip
    fraction, approx KL) scalars.

    ratio_b = exp(sum over row b's real tokens of (logp - old_logp)) = pi(y | x) / pi_old(y | x); loss = mean over rows
    of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)); clip fraction = share of rows where the clipped term was the
    larger; approx KL = as ``policy_loss``'s, the mean over real tokens of each token's (r - 1) - log r (a per-token
    figure whichever ratio the loss clips, so runs compare). At ratio 1 the gradient is -A * sum_t grad log pi(y_t): a
    response's tokens summed, where ``policy_loss`` averages them. With one token per row it equals ``policy_loss``.
    """
    log_ratio = torch.where(mask.bool(), logp - old_logp, torch.zeros_like(logp))  # padding adds nothing
    ratio = log_ratio.sum(dim=1).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    clip_frac = (clipped > unclipped).float().mean()
    approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_frac.detach(), approx_kl.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss. (B, T) inputs -> (loss, clip fraction) scalars.

    loss = 0.5 * mean over real tokens of max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old +
    clip(V - V_old, -eps, eps); only real tokens (up to EOS) count.
    """
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    return loss, masked_mean((loss_clipped > loss_unclipped).float(), mask).detach()


DPO_LOSSES = ("sigmoid", "ipo", "soft")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, loss: str = "sigmoid",
             p_chosen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The direct-alignment losses on preference pairs. (B,) summed log-probs of each pair's chosen and rejected
    response under the policy and the frozen reference -> (per-pair losses (B,), implicit rewards of chosen and of
    rejected (B,) each, beta times the policy-to-reference log-ratio; detached).

    h = (log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r)), the log-ratio margin of chosen over rejected.
    sigmoid (DPO, Rafailov et al. 2023): -log sigma(beta * h).
    ipo (Azar et al. 2023): (h - 1 / (2 * beta))^2, beta the regularisation tau.
    soft: the cross-entropy of sigma(beta * h) against the pair's probability p = ``p_chosen`` (B,) that chosen is the
    better one, -[p * log sigma(beta * h) + (1 - p) * log sigma(-beta * h)]: cDPO with its label smoothing 1 - p set per
    pair. With p = 1 it is sigmoid exactly; its gradient in beta * h is sigma(beta * h) - p, so a pair labelled 1/2 pulls
    the margin to 0 rather than pushing it up.
    """
    if loss not in DPO_LOSSES:
        raise ValueError(f"DPO loss must be one of {', '.join(DPO_LOSSES)}, got {loss!r}")
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        if p_chosen is None:
            raise ValueError("the soft DPO loss needs each pair's probability p_chosen")
        p = p_chosen.to(h.dtype)
        losses = -(p * F.logsigmoid(beta * h) + (1.0 - p) * F.logsigmoid(-beta * h))
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def packed_pair_attention(query_mask: torch.Tensor, chosen_mask: torch.Tensor,
                          rejected_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and positions for preference pairs packed one per row as [prompt | chosen | rejected], so that one
    forward pass gives both replies' log-probs with the prompt computed once: each reply sees its prompt and itself
    (causally), never the other reply, and its positions continue the prompt's, as if it followed the prompt alone.

    query_mask (B, Q) left-padded, chosen_mask (B, C) and rejected_mask (B, R) right-padded, 1 for a real token ->
    (allowed (B, T, T) bool, T = Q + C + R: whether the token in column i may attend the one in column j;
    position_ids (B, T): the prompt's counted over its real tokens, each reply's from the prompt's length on).
    No column attends a padding column but itself, and every column attends itself, so no attention row is empty.
    """
    q, c, r = query_mask.shape[1], chosen_mask.shape[1], rejected_mask.shape[1]
    device = query_mask.device
    segment = torch.cat([torch.zeros(q, dtype=torch.long, device=device), torch.ones(c, dtype=torch.long, device=device),
                         torch.full((r,), 2, dtype=torch.long, device=device)])  # (T,) 0 prompt, 1 chosen, 2 rejected
    column = torch.arange(q + c + r, device=device)
    causal = column[None, :] <= column[:, None]  # (T, T) [i, j]: j not after i
    visible = (segment[None, :] == segment[:, None]) | (segment[None, :] == 0)  # its own segment, or the prompt
    real = torch.cat([query_mask, chosen_mask, rejected_mask], dim=1).bool()  # (B, T)
    allowed = ((causal & visible)[None] & real[:, None, :]) | torch.eye(q + c + r, dtype=torch.bool, device=device)
    prompt_len = query_mask.long().sum(dim=1, keepdim=True)  # (B, 1)
    positions = torch.cat([(query_mask.long().cumsum(dim=1) - 1).clamp(min=0), prompt_len + torch.arange(c, device=device),
                           prompt_len + torch.arange(r, device=device)], dim=1)
    return allowed, positions


class AdaptiveKL:
    """Ziegler et al. (2019)'s KL controller: beta follows the measured KL towards ``target``.

    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) after each batch of n samples.
    With ``target=None`` beta stays fixed; with ``ceiling`` it never grows past it (RLAIF's alpha weighs the score by
    1 - alpha and stops at 1). ``state()``/``load()`` go into checkpoints.
    """

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000, ceiling: float | None = None):
        self.value, self.target, self.horizon, self.ceiling = float(init), target, horizon, ceiling

    def update(self, kl: float, n_samples: int) -> float:
        if self.target is not None:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.value *= 1.0 + error * n_samples / self.horizon
            if self.ceiling is not None:
                self.value = min(self.value, self.ceiling)
        return self.value

    def state(self) -> dict:
        return {"value": self.value}

    def load(self, state: dict) -> None:
        self.value = float(state["value"])


def pair_labels(scores: torch.Tensor, win_rates: bool) -> torch.Tensor:
    """(B,) scores of responses in consecutive pairs (a prompt's two) -> (B,) each response's probability of being the
    better of its pair (a pair's two sum to 1).

    win_rates: the scores are each response's probability of beating the other (``ppo.reward=pairwise``: p and 1 - p),
    possibly lowered by a missing-EOS penalty, so the difference d = s_a - s_b is 2p - 1 and p = clamp(1/2 + d/2, 0, 1):
    the labeler's own p where no penalty applied, and a response that lost a penalty of 1 or more loses outright.
    Otherwise the scores are a scalar reward's (a PM's, a function's) and p = sigma(d), the Bradley-Terry probability
    a PM is trained to give.
    """
    pairs = scores.view(-1, 2)
    d = pairs[:, 0] - pairs[:, 1]
    p = (0.5 + d / 2).clamp(0.0, 1.0) if win_rates else torch.sigmoid(d)
    return torch.stack([p, 1.0 - p], dim=1).view(-1)


def online_dpo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, beta: float,
                    loss: str = "sigmoid") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO-family loss (``dpo_loss``) on freshly sampled pairs. (B, R) per-token log-probs of the policy and the
    reference, (B,) ``pair_labels`` and the (B, R) mask, rows in consecutive pairs -> (the mean loss over the pairs
    that count, figures: ``margin`` (mean of beta * h, h the chosen-over-rejected log-ratio margin), ``accuracy`` (share
    of pairs with h > 0), ``pairs_used`` (share of pairs that count), all detached).

    Each reply's log-probability is the sum over its real tokens; the better-labelled reply of a pair is chosen, with
    p_chosen = its label. A tie (p = 1/2) says nothing about which reply is better under sigmoid and ipo, whose labels
    are hard: it does not count there; soft trains it towards a zero margin. Two identical replies give h = 0 whatever
    the weights, so no gradient.
    """
    seq = (logp * mask).sum(dim=1).view(-1, 2)  # (P, 2)
    ref = (ref_logp * mask).sum(dim=1).view(-1, 2)
    p_first = labels.view(-1, 2)[:, 0]
    first = p_first >= 0.5
    chosen, rejected = torch.where(first, seq[:, 0], seq[:, 1]), torch.where(first, seq[:, 1], seq[:, 0])
    ref_chosen, ref_rejected = torch.where(first, ref[:, 0], ref[:, 1]), torch.where(first, ref[:, 1], ref[:, 0])
    p_chosen = torch.where(first, p_first, 1.0 - p_first)
    losses, reward_chosen, reward_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss, p_chosen)
    counts = torch.ones_like(p_first) if loss == "soft" else (p_first != 0.5).to(p_first.dtype)
    n = counts.sum().clamp(min=1)
    margin = reward_chosen - reward_rejected
    figures = {"margin": (margin * counts).sum() / n, "accuracy": ((margin > 0).float() * counts).sum() / n,
               "pairs_used": counts.mean()}
    return (losses * counts.to(losses.dtype)).sum() / n, {k: v.detach() for k, v in figures.items()}


ALGORITHMS = ("ppo", "rloo", "grpo", "dr_grpo", "reinforce", "online_dpo")
RATIOS = ("token", "sequence")


@dataclass(frozen=True)
class Algorithm:
    """What ``ppo.algorithm`` and its companion keys amount to (``algorithm``: the nulls resolved to each algorithm's
    usual practice), and what differs between the algorithms, each in one method: the value model (``critic``), the
    advantages, the reward logged, the policy and value losses, the KL controller's ceiling. B responses (a prompt's k
    consecutive), R response positions."""
    name: str             # ppo | rloo | grpo | dr_grpo | reinforce | online_dpo
    k: int                # responses per prompt
    kl_in: str            # reward: -beta * KL in the reward | loss: + beta * k3 KL in the loss | implicit: online_dpo's
                          # DPO loss, whose beta is the KL's weight in the objective it optimises
    aggregation: str      # how per-token losses become one number (aggregate)
    ratio: str = "token"  # the policy loss's importance ratio: token (policy_loss) | sequence (sequence_policy_loss, rloo)
    dpo_loss: str = "sigmoid"  # online_dpo's loss (dpo_loss): sigmoid | ipo | soft

    @property
    def critic(self) -> str | None:
        """What the value model that trains beside the policy predicts: ``token``, V(s_t) before each response token
        (ppo, GAE's baseline); ``prompt``, one V(x) per prompt (reinforce, the baseline of the whole response); None:
        no value model (rloo, grpo, dr_grpo measure a response against its siblings instead)."""
        return {"ppo": "token", "reinforce": "prompt"}.get(self.name)

    @property
    def preference(self) -> bool:
        """Whether the policy learns from pairs the reward labels (online_dpo: ``pair_labels``, ``online_dpo_loss``)
        rather than from advantages."""
        return self.name == "online_dpo"

    @property
    def tempered(self) -> bool:
        """Whether the losses read log-probs under logits / T, the distribution the responses were sampled from (the
        policy-gradient methods, whose ratios and KL are of the sampler); online_dpo reads the model's own (T = 1), as
        the DPO stage does: DPO trains the policy itself, whatever temperature explored."""
        return not self.preference

    @property
    def kl_ceiling(self) -> float | None:
        """The adaptive KL controller's ceiling on beta: reinforce's alpha weighs the score by 1 - alpha, so it stops at
        1 (above, the policy would learn to lower the score); None for the others."""
        return 1.0 if self.name == "reinforce" else None

    def advantages(self, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                   values: torch.Tensor | None = None, *, gamma: float = 1.0, lam: float = 0.95,
                   whiten_rewards: bool = False, win_rates: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,) scores, (B, R) per-token KL (0 on padding), (B, R) mask, beta and the value model's values (``critic``
        token: (B, R); prompt: (B,); None without one) -> (advantages (B, R), 0 on padding; the value model's targets,
        shaped as ``values``, or None).

        online_dpo: in place of advantages, each response's label, its probability of being the better of its pair
        (``pair_labels``; ``win_rates``: the scores are the pairwise labeler's), at each of its real tokens.

        ppo: per-token rewards (``token_rewards``: -beta * KL with kl_in=reward, the score at the last real token),
        rescaled by their std with ``whiten_rewards``, GAE (gamma, lam), advantages whitened; the targets are GAE's
        returns. rloo, grpo, dr_grpo: each response's reward (its score, less beta * its summed KL with kl_in=reward)
        against its group's (``group_advantages``). reinforce: (1 - beta) * score - beta * summed KL less V(x)
        (``reinforce_advantages``), the reward the target. Both put a response's advantage at each of its real tokens.
        """
        if self.name == "ppo":
            per_token = token_rewards(scores, kl, mask, beta if self.kl_in == "reward" else 0.0)
            if whiten_rewards:
                per_token = whiten(per_token, mask, shift_mean=False)
            advantages, returns = gae(per_token, values, mask, gamma, lam)
            return whiten(advantages, mask), returns
        if self.preference:
            return pair_labels(scores, win_rates).unsqueeze(1) * mask, None
        if self.name == "reinforce":
            returns, advantages = reinforce_advantages(scores, kl.sum(dim=1), values, beta)
            return advantages.unsqueeze(1) * mask, returns
        rewards = scores - beta * kl.sum(dim=1) if self.kl_in == "reward" else scores
        return group_advantages(rewards, self.k, self.name).unsqueeze(1) * mask, None

    def reward(self, scores: torch.Tensor, seq_kl: torch.Tensor, beta: float,
               targets: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) scores, (B,) summed KL, beta and the targets ``advantages`` returned -> (B,) the reward each response is
        logged with: reinforce's own, (1 - beta) * score - beta * KL (its targets); for the others score - beta * KL,
        wherever kl_in puts the KL."""
        if self.name == "reinforce":
            return targets
        return scores - beta * seq_kl

    def policy_losses(self, logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip_range: float, max_len: int | None = None,
                      beta: float = 0.0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(B, R) log-probs of the policy being trained, of the rollout's policy and of the reference, the rollout's
        advantages and the mask -> ({"policy_loss", and "kl_loss" with kl_in=loss}, figures, detached); the policy
        minimises policy_loss + beta * kl_loss.

        policy_loss: the clipped surrogate with one ratio per token, aggregated as ``aggregation`` (``policy_loss``), or
        with one ratio per response (ratio=sequence: ``sequence_policy_loss``), figures ``clip_frac`` and ``approx_kl``;
        kl_loss: k3 per token, aggregated alike. online_dpo: ``online_dpo_loss`` with this ``beta`` on the labels
        ``advantages`` carries (old_logp and clip_range unused), figures ``margin``, ``accuracy``, ``pairs_used``.
        """
        if self.preference:
            loss, figures = online_dpo_loss(logp, ref_logp, advantages[:, 0], mask, beta, self.dpo_loss)
            return {"policy_loss": loss}, figures
        if self.ratio == "sequence":  # a response's advantage sits at each of its real tokens, and position 0 is real
            loss, clip_frac, approx_kl = sequence_policy_loss(logp, old_logp, advantages[:, 0], mask, clip_range)
        else:
            loss, clip_frac, approx_kl = policy_loss(logp, old_logp, advantages, mask, clip_range, self.aggregation, max_len)
        losses = {"policy_loss": loss}
        if self.kl_in == "loss":
            losses["kl_loss"] = aggregate(kl_per_token(logp, ref_logp, "k3"), mask, self.aggregation, max_len)
        return losses, {"clip_frac": clip_frac, "approx_kl": approx_kl}

    def critic_loss(self, values: torch.Tensor, old_values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                    clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipped ``value_loss`` against the targets ``advantages`` returned: per real token (critic token, (B, R)
        each), or one V(x) per response against its reward (critic prompt, (B,) each) -> (loss, clip fraction)."""
        if self.critic == "prompt":
            v = values.unsqueeze(1)
            return value_loss(v, old_values.unsqueeze(1), targets.unsqueeze(1), torch.ones_like(v), clip_range)
        return value_loss(values, old_values, targets, mask, clip_range)


def algorithm(s, section: str = "ppo") -> Algorithm:
    """The ``Algorithm`` the stage's settings ``s`` ask for (``algorithm``, ``samples_per_prompt``, ``kl_in``,
    ``rloo_ratio``, ``dpo_loss``; ``kl_coef`` is checked against it), the nulls resolved to each algorithm's usual practice.

    ppo: 1 response per prompt, KL in the reward, token mean (Huang et al.). rloo: 4, KL in the reward, token mean
    (Ahmadian et al.; rloo_ratio=sequence: one ratio per response, as the paper and TRL). grpo: 4, a k3 KL loss, each
    response's token mean then the mean over responses (Shao et al.). dr_grpo: as grpo without the std division, each
    response's token sum over max_new_tokens (Liu et al.). reinforce: 1, the KL weighed against the score in the reward,
    each response's token sum over max_new_tokens (Lee et al.: the response is one action, so its log-probability is
    the sum over its tokens). online_dpo: 2, the KL implicit in the DPO loss (``kl_coef`` is DPO's beta), the loss
    ``dpo_loss`` (Guo et al. 2024). A value or combination that cannot run raises ValueError, one line naming
    ``<section>.<key>``.
    """
    name = s.algorithm
    if name not in ALGORITHMS:
        raise ValueError(f"{section}.algorithm must be one of {', '.join(ALGORITHMS)}, got {name!r}")
    if s.kl_in not in (None, "reward", "loss"):
        raise ValueError(f"{section}.kl_in must be reward, loss or null (the algorithm's usual), got {s.kl_in!r}")
    if s.samples_per_prompt is not None and (not isinstance(s.samples_per_prompt, int) or s.samples_per_prompt < 1):
        raise ValueError(f"{section}.samples_per_prompt must be an integer >= 1 or null, got {s.samples_per_prompt!r}")
    if name == "reinforce" and s.kl_coef is not None and s.kl_coef > 1:
        raise ValueError(f"{section}.algorithm=reinforce weighs the score by 1 - {section}.kl_coef: {section}.kl_coef must be in "
                         f"[0, 1], got {s.kl_coef}")
    if name == "reinforce" and s.kl_in == "loss":
        raise ValueError(f"{section}.algorithm=reinforce weighs the KL against the score in the reward (RLAIF): "
                         f"{section}.kl_in must be reward or null")
    if s.rloo_ratio not in RATIOS:
        raise ValueError(f"{section}.rloo_ratio must be token or sequence, got {s.rloo_ratio!r}")
    if s.rloo_ratio == "sequence" and name != "rloo":
        raise ValueError(f"{section}.rloo_ratio=sequence is RLOO's one ratio per response: it needs {section}.algorithm=rloo, "
                         f"got {name}")
    if name == "online_dpo":
        if s.samples_per_prompt not in (None, 2):
            raise ValueError(f"{section}.algorithm=online_dpo samples a pair per prompt: {section}.samples_per_prompt must be "
                             f"2 or null, got {s.samples_per_prompt}")
        if s.kl_in is not None:
            raise ValueError(f"{section}.algorithm=online_dpo keeps the KL inside its DPO loss ({section}.kl_coef is its beta): "
                             f"{section}.kl_in must be null, got {s.kl_in}")
        if s.dpo_loss not in DPO_LOSSES:
            raise ValueError(f"{section}.dpo_loss must be one of {', '.join(DPO_LOSSES)}, got {s.dpo_loss!r}")
        if not s.kl_coef:
            raise ValueError(f"{section}.algorithm=online_dpo: {section}.kl_coef is DPO's beta and must be > 0, got {s.kl_coef}")
        return Algorithm(name, 2, "implicit", "token_mean", "token", s.dpo_loss)
    k = s.samples_per_prompt or (1 if name in ("ppo", "reinforce") else 4)
    kl_in = s.kl_in or ("reward" if name in ("ppo", "rloo", "reinforce") else "loss")
    aggregation = {"grpo": "sequence_mean", "dr_grpo": "constant", "reinforce": "constant"}.get(name, "token_mean")
    algo = Algorithm(name, k, kl_in, aggregation, s.rloo_ratio)
    if not algo.critic and k < 2:
        raise ValueError(f"{section}.algorithm={name} measures each response against the other responses to its prompt: "
                         f"{section}.samples_per_prompt must be >= 2 (null: 4)")
    return algo
