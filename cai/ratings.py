"""Win rates and Elo ratings from soft pairwise outcomes (the evaluate stage's maths).

A *game* is ``(a, b, p)``: players ``a`` and ``b`` and the probability ``p`` in [0, 1] that ``a`` is better
(an AI judge's swap-averaged verdict; 1, 0 or 0.5 for hard outcomes). Elo here is the Bradley-Terry
model on the Elo scale, fitted by maximum likelihood over all games at once, so it does not depend on
the order in which games were played (sequential Elo updates do):

    P(a beats b) = 1 / (1 + 10 ** ((R_b - R_a) / 400))

With two players, the fitted gap is exactly 400·log10(p̄ / (1 − p̄)) for the mean outcome p̄.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

ELO_SCALE = 400.0 / math.log(10.0)  # rating points per unit of log-odds
ELO_MEAN = 1000.0


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n`` (95 % for z = 1.96): the range of true rates
    the observed share is consistent with. ``successes`` may be fractional (ties counted as halves).

        centre = (p + z²/2n) / (1 + z²/n),  half-width = z·sqrt(p(1 − p)/n + z²/4n²) / (1 + z²/n)
    """
    if n <= 0:
        return 0.0, 1.0
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rates(games: Sequence[tuple[str, str, float]]) -> dict[tuple[str, str], float]:
    """Mean P(a beats b) for every ordered pair that met (both directions are filled in)."""
    totals: dict[tuple[str, str], list[float]] = defaultdict(list)
    for a, b, p in games:
        totals[(a, b)].append(p)
        totals[(b, a)].append(1.0 - p)
    return {pair: sum(ps) / len(ps) for pair, ps in totals.items()}


def length_controlled_win_rate(outcomes: Sequence[float], length_ratios: Sequence[float], clip: float = 1e-3,
                               ridge: float = 1e-6, iterations: int = 100, tol: float = 1e-12) -> float:
    """RLAIF's length-controlled win rate (Lee et al. 2023, appendix): fit a logistic regression of "a won" on the
    length ratio of the two replies, then read the fitted win rate at equal lengths.

    ``outcomes`` (n,): P(a beats b) per prompt (soft, clipped to [clip, 1 − clip]); ``length_ratios`` (n,):
    len(a) / len(b) > 0. Fits P = sigmoid(w0 + w1·log(ratio)) by maximum likelihood (Newton steps; a ``ridge`` on w1
    keeps the fit defined when every ratio is the same, and then it returns the mean outcome) and returns sigmoid(w0),
    the fit at ratio 1. On the log of the ratio, b's figure against a is exactly 1 − a's against b, and a reply many
    times longer than the other does not outweigh the rest.
    """
    import torch

    if len(outcomes) != len(length_ratios) or not outcomes:
        raise ValueError(f"need as many length ratios as outcomes, and at least one: {len(outcomes)} vs {len(length_ratios)}")
    p = torch.tensor([min(max(float(v), clip), 1.0 - clip) for v in outcomes], dtype=torch.float64)
    log_ratio = torch.tensor(length_ratios, dtype=torch.float64).log()
    x = torch.stack([torch.ones(len(p), dtype=torch.float64), log_ratio], dim=1)
    penalty = torch.diag(torch.tensor([0.0, ridge], dtype=torch.float64))
    w = torch.zeros(2, dtype=torch.float64)
    for _ in range(iterations):
        q = torch.sigmoid(x @ w)
        grad = x.T @ (p - q) - penalty @ w
        hess = (x * (q * (1 - q))[:, None]).T @ x + penalty
        step = torch.linalg.solve(hess, grad)
        w = w + step
        if step.abs().max().item() < tol:
            break
    return torch.sigmoid(w[0]).item()


def elo_ratings(games: Sequence[tuple[str, str, float]], players: Sequence[str] | None = None,
                clip: float = 1e-3, iterations: int = 2000, tol: float = 1e-10) -> dict[str, float]:
    """Bradley-Terry maximum-likelihood ratings on the Elo scale, mean ``ELO_MEAN``.

    Outcomes are clipped to [clip, 1 − clip] so that a player who won every game still gets a finite
    rating. Fitted by Newton steps on the log-likelihood. The gaps are defined only when every player is
    connected to every other through games (evaluate's round robin always is); with no games at all,
    everyone is at the mean.
    """
    import torch

    names = list(players) if players is not None else sorted({x for a, b, _ in games for x in (a, b)})
    if not games:
        return {n: ELO_MEAN for n in names}
    index = {n: i for i, n in enumerate(names)}
    a = torch.tensor([index[g[0]] for g in games])
    b = torch.tensor([index[g[1]] for g in games])
    p = torch.tensor([min(max(float(g[2]), clip), 1.0 - clip) for g in games], dtype=torch.float64)
    n = len(names)
    theta = torch.zeros(n, dtype=torch.float64)  # log-odds strengths
    for _ in range(iterations):
        q = torch.sigmoid(theta[a] - theta[b])
        grad = torch.zeros(n, dtype=torch.float64).index_add_(0, a, p - q).index_add_(0, b, q - p)
        w = q * (1 - q)
        hess = torch.zeros(n, n, dtype=torch.float64)
        hess.index_put_((a, a), w, accumulate=True)
        hess.index_put_((b, b), w, accumulate=True)
        hess.index_put_((a, b), -w, accumulate=True)
        hess.index_put_((b, a), -w, accumulate=True)
        # the likelihood is flat along "everyone + c": pin the mean at 0 with a ones-row penalty
        step = torch.linalg.solve(hess + torch.ones(n, n, dtype=torch.float64) / n, grad)
        theta = theta + step
        theta = theta - theta.mean()
        if step.abs().max().item() < tol:
            break
    return {name: ELO_MEAN + ELO_SCALE * theta[i].item() for name, i in index.items()}
