"""Intervals of lifelong.core.stats against hand-worked values."""

import math

import numpy as np
import pytest

from lifelong.core.stats import (
    Estimate,
    bootstrap_mean,
    format_estimate,
    is_binary,
    mover_difference,
    newcombe_difference,
    over_seeds,
    rate,
    ratio_interval,
    t_interval,
    wilson,
)


def test_wilson_hand_worked():
    # p = 0.8, z = 1.95996: centre (0.8 + z²/20) / (1 + z²/10) = 0.71681, half-width 0.22657
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=5e-4) and high == pytest.approx(0.9433, abs=5e-4)
    low, high = wilson(0, 10)  # z²/(n + z²) = 3.8415 / 13.8415
    assert low == 0 and high == pytest.approx(0.2775, abs=5e-4)
    assert wilson(10, 10)[1] == 1 and wilson(10, 10)[0] == pytest.approx(1 - 0.2775, abs=5e-4)
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_rate_picks_wilson_for_binary_items_and_bootstrap_otherwise():
    e = rate([1, 1, 0, 1, 1, 1, 1, 0, 1, 1])
    assert (e.value, e.n, e.method) == (0.8, 10, "wilson")
    assert (e.low, e.high) == wilson(8, 10)
    assert is_binary([0.0, 1.0]) and not is_binary([0.0, 0.5]) and not is_binary([])
    c = rate([0.1, 0.2, 0.4, np.nan, 0.3])
    assert c.method == "bootstrap" and c.n == 4 and c.value == pytest.approx(0.25)
    assert 0.1 <= c.low < 0.25 < c.high <= 0.4


def test_bootstrap_is_deterministic_with_a_seed():
    x = np.random.default_rng(1).random(30)
    assert bootstrap_mean(x, seed=7) == bootstrap_mean(x, seed=7)
    assert bootstrap_mean(x, seed=7) != bootstrap_mean(x, seed=8)
    low, high = bootstrap_mean(x, seed=7)
    assert low < x.mean() < high
    assert all(math.isnan(v) for v in bootstrap_mean([0.3]))
    assert bootstrap_mean([0.5, 0.5, 0.5]) == (0.5, 0.5)


def test_t_interval_over_seeds_hand_worked():
    # mean 2, sd 1, n 3: t(0.975, 2) = 4.3027, half-width 4.3027 / sqrt(3) = 2.4841
    low, high = t_interval([1.0, 2.0, 3.0])
    assert low == pytest.approx(2 - 2.4841, abs=1e-3) and high == pytest.approx(2 + 2.4841, abs=1e-3)
    e = over_seeds([1.0, 2.0, None, 3.0, float("nan")])
    assert (e.value, e.n, e.method) == (2.0, 3, "t")
    assert over_seeds([0.5]).low is None


def test_newcombe_difference_hand_worked():
    # Newcombe (1998) example: 56/70 − 48/80 = 0.2, hybrid score interval [0.0524, 0.3339]
    low, high = newcombe_difference(56, 70, 48, 80)
    assert low == pytest.approx(0.0524, abs=5e-4) and high == pytest.approx(0.3339, abs=5e-4)


def test_mover_difference_hand_worked():
    # 0.5 [0.4, 0.7] − 0.2 [0.1, 0.25]: low 0.3 − sqrt(0.1² + 0.05²), high 0.3 + sqrt(0.2² + 0.1²)
    low, high = mover_difference(0.5, 0.4, 0.7, 0.2, 0.1, 0.25)
    assert low == pytest.approx(0.3 - math.sqrt(0.0125)) and high == pytest.approx(0.3 + math.sqrt(0.05))


def test_ratio_interval_hand_worked():
    # Equal counts: the t interval of the clusters' means. Means 1, 2, 3 over 10 tokens each.
    r, low, high = ratio_interval([10.0, 20.0, 30.0], [10, 10, 10])
    assert r == pytest.approx(2.0)
    assert (low, high) == pytest.approx(t_interval([1.0, 2.0, 3.0]))
    # Unequal counts: r = 12 / 5 = 2.4; residuals t − r·c = 2 − 2.4, 10 − 9.6 = −0.4, 0.4;
    # se = sqrt(2/1 · 0.32) / 5 = 0.16; t(0.975, 1) = 12.706.
    r, low, high = ratio_interval([2.0, 10.0], [1, 4])
    assert r == pytest.approx(2.4)
    assert (low, high) == pytest.approx((2.4 - 12.706 * 0.16, 2.4 + 12.706 * 0.16), abs=1e-3)
    assert math.isnan(ratio_interval([3.0], [2])[1]) and ratio_interval([3.0], [2])[0] == 1.5


def test_format_estimate():
    assert format_estimate(Estimate(0.8, 10, *wilson(8, 10))) == "0.8 [0.490, 0.943] n=10"
    assert format_estimate(Estimate(0.0, 10, *wilson(0, 10))) == "0 [0.000, 0.278] n=10"
    assert format_estimate(Estimate(3.0, 5)) == "3 n=5"
    assert format_estimate(Estimate(float("nan"), 0)) == "n/a n=0"
    assert format_estimate(Estimate(1.25)) == "1.25"
