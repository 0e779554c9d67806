"""Win rates and Bradley-Terry Elo against hand-computed values."""

from __future__ import annotations

import math

import pytest

from cai.ratings import ELO_MEAN, elo_ratings, wilson_interval, win_rates


def logistic(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_two_players_gap_is_the_log_odds_of_the_mean_outcome():
    r = elo_ratings([("a", "b", 0.9), ("a", "b", 0.6)])  # mean outcome 0.75
    assert r["a"] - r["b"] == pytest.approx(400 * math.log10(3), abs=1e-6)  # 190.85 points
    assert (r["a"] + r["b"]) / 2 == pytest.approx(ELO_MEAN)


def test_consistent_three_players_recover_their_strengths():
    # log-odds strengths 1, 0, -1: P(a>b) = P(b>c) = sigmoid(1), P(a>c) = sigmoid(2)
    games = [("a", "b", logistic(1)), ("b", "c", logistic(1)), ("c", "a", 1 - logistic(2))]
    r = elo_ratings(games)
    per_unit = 400 / math.log(10)  # Elo points per unit of log-odds: 173.7
    assert r["a"] - ELO_MEAN == pytest.approx(per_unit, abs=1e-6)
    assert r["b"] == pytest.approx(ELO_MEAN, abs=1e-6)
    assert r["c"] - ELO_MEAN == pytest.approx(-per_unit, abs=1e-6)


def test_order_of_games_does_not_matter_and_ties_are_equal():
    games = [("a", "b", 0.8), ("b", "c", 0.3), ("a", "c", 0.9), ("b", "a", 0.4)]
    assert elo_ratings(games) == pytest.approx(elo_ratings(list(reversed(games))))
    tied = elo_ratings([("x", "y", 0.5), ("y", "x", 0.5)])
    assert tied["x"] == pytest.approx(tied["y"])


def test_a_clean_sweep_stays_finite_through_clipping():
    r = elo_ratings([("a", "b", 1.0)] * 3, clip=0.01)
    assert r["a"] - r["b"] == pytest.approx(400 * math.log10(0.99 / 0.01), abs=1e-6)


def test_players_without_games_stay_at_the_mean():
    assert elo_ratings([], ["a", "b"]) == {"a": ELO_MEAN, "b": ELO_MEAN}


def test_win_rates_fill_both_directions():
    rates = win_rates([("a", "b", 0.75), ("b", "a", 0.5), ("a", "c", 0.2)])
    assert rates[("a", "b")] == pytest.approx(0.625) and rates[("b", "a")] == pytest.approx(0.375)
    assert rates[("c", "a")] == pytest.approx(0.8)


def test_wilson_interval_by_hand():
    # p = 0.5, n = 100: centre 0.5, half-width 1.96 * sqrt(0.0025 + 1.96^2 / 40000) / (1 + 1.96^2 / 100) = 0.09617
    assert wilson_interval(50, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    # 8 of 10 (the textbook case): 0.4902 .. 0.9433 — still holds 0.5
    assert wilson_interval(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)


def test_length_controlled_win_rate_reads_a_logistic_fit_at_equal_lengths():
    """Outcomes drawn exactly from P = sigmoid(w0 + w1 * log ratio) are fitted back, and the figure is that curve at
    ratio 1; b against a is 1 - a against b."""
    from cai.ratings import length_controlled_win_rate

    def sigmoid(z: float) -> float:
        return 1 / (1 + math.exp(-z))

    ratios = [0.5, 0.8, 1.0, 1.3, 2.0, 3.0]
    outcomes = [sigmoid(-1 + 0.7 * math.log(r)) for r in ratios]
    assert length_controlled_win_rate(outcomes, ratios) == pytest.approx(sigmoid(-1), abs=1e-5)
    assert length_controlled_win_rate([1 - p for p in outcomes], [1 / r for r in ratios]) == \
        pytest.approx(1 - sigmoid(-1), abs=1e-5)
    # the longer reply mostly won: a raw win rate of 0.62, and a coin flip at equal lengths
    ratios = [0.5, 0.8, 1.25, 1.5, 2.0, 3.0, 1.2, 1.1]
    wins = [sigmoid(3 * math.log(r)) for r in ratios]
    assert sum(wins) / len(wins) > 0.6 and length_controlled_win_rate(wins, ratios) == pytest.approx(0.5, abs=1e-5)
    # all replies of one length: nothing to control for, the plain mean
    assert length_controlled_win_rate([0.2, 0.9, 0.6], [1.0, 1.0, 1.0]) == pytest.approx(1.7 / 3, abs=1e-6)
    with pytest.raises(ValueError):
        length_controlled_win_rate([0.5], [1.0, 2.0])
