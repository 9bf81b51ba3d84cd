"""Round-edit, conflict and distortion metrics (probes/distortion.py) against docs/METRICS.md §4."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

from probes.distortion import (
    conflict_magnitude,
    conflict_score,
    conflict_score_explicit,
    conflict_score_implicit,
    failure_rate,
    ignore_rate,
    js_divergence,
    js_pitfalls,
    object_distribution,
    round_success,
    tied_fact_damage,
)

LN2 = math.log(2)


def test_js_identical_is_zero_and_disjoint_is_ln2():
    assert js_divergence([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == pytest.approx(0.0, abs=1e-15)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(LN2)
    assert js_divergence([0.5, 0.5, 0, 0], [0, 0, 0.3, 0.7]) == pytest.approx(LN2)


def test_js_normalises_inputs():
    assert js_divergence([2, 6], [1, 1]) == pytest.approx(js_divergence([0.25, 0.75], [0.5, 0.5]))


def test_js_hand_worked():
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4)
    expected = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert js_divergence([1, 0], [0.5, 0.5]) == pytest.approx(expected)


def test_js_pitfalls_divides_by_obj_and_scales_by_100():
    p, q = [0.7, 0.2, 0.1], [0.1, 0.2, 0.7]
    assert js_pitfalls(p, q) == pytest.approx(js_divergence(p, q) / 3 * 100)
    assert js_pitfalls([1, 0], [0, 1]) == pytest.approx(LN2 / 2 * 100)


@pytest.mark.parametrize("bad", [[0, 0], [-0.1, 1.1], [np.nan, 1], []])
def test_js_refuses_bad_vectors(bad):
    with pytest.raises(ValueError):
        js_divergence(bad, [0.5, 0.5][: max(len(bad), 1)])


def test_js_refuses_length_mismatch():
    with pytest.raises(ValueError):
        js_divergence([0.5, 0.5], [0.2, 0.3, 0.5])


def test_object_distribution_restricts_and_normalises():
    probs = {"Paris": 0.2, "Lyon": 0.1, "Nice": 0.1, "Rome": 0.5}
    q = object_distribution(probs, ["Paris", "Lyon", "Nice"])  # o first, o* (Rome) left out
    np.testing.assert_allclose(q, [0.5, 0.25, 0.25])
    np.testing.assert_allclose(object_distribution([0.2, 0.5, 0.2], [0, 2]), [0.5, 0.5])
    with pytest.raises(KeyError):
        object_distribution(probs, ["Paris", "Berlin"])
    with pytest.raises(ValueError):
        object_distribution({"a": 0.0}, ["a"])


def test_round_success():
    assert round_success(0.1, 0.6, 0.7, 0.2) == 1.0
    assert round_success(0.6, 0.1, 0.7, 0.2) == 0.5
    assert round_success(0.1, 0.6, 0.2, 0.7) == 0.5
    assert round_success(0.5, 0.5, 0.5, 0.5) == 0.0  # ties do not count
    np.testing.assert_allclose(round_success([0.1, 0.6], [0.6, 0.1], [0.7, 0.1], [0.2, 0.9]), [1.0, 0.0])


def test_ignore_rate_counts_strict_drops_only():
    p0 = [0.3, 0.2, 0.1, 0.1]
    pb = [0.1, 0.2, 0.2, 0.05]  # drop, equal, rise, drop
    assert ignore_rate(p0, pb) == pytest.approx(0.5)
    assert ignore_rate([0.3], [0.3]) == 0.0
    assert math.isnan(ignore_rate([], []))
    with pytest.raises(ValueError):
        ignore_rate([0.1, 0.2], [0.1])


def test_failure_rate_threshold_is_strict_and_nan_is_omitted():
    assert failure_rate([0.5, 0.6, 0.0, 1.0]) == pytest.approx(0.5)
    assert failure_rate([0.2, 0.8], threshold=0.1) == 1.0
    assert failure_rate([float("nan"), 1.0, 0.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        failure_rate([float("nan"), 1.0], nan_policy="raise")
    assert math.isnan(failure_rate([]))


def test_conflict_scores():
    assert conflict_score_explicit(0.4, 0.3) == 1.0
    assert conflict_score_explicit(0.3, 0.3) == 0.0
    assert conflict_score_implicit(0.1, 0.3) == 0.0
    np.testing.assert_array_equal(conflict_score([0.5, 0.1], [0.2, 0.2]), [1.0, 0.0])


def test_conflict_magnitude_clamps_at_minus_one():
    assert conflict_magnitude(0.5, 0.25) == pytest.approx(0.5)
    assert conflict_magnitude(0.5, 0.0) == pytest.approx(1.0)
    assert conflict_magnitude(0.1, 0.15) == pytest.approx(-0.5)
    assert conflict_magnitude(0.1, 0.9) == -1.0
    with pytest.raises(ValueError):
        conflict_magnitude(0.0, 0.1)


def test_tied_fact_damage_reference_is_the_callers():
    """Hand case: P_θ0(k_f) = 0.5, P_θm(k_f) = 0.4 (after e1), P_θb(k_f) = 0.3 (after e2).
    θ0 reference (Pitfalls code): (0.5 − 0.3)/0.5 = 0.4; θm reference (paper): (0.4 − 0.3)/0.4 = 0.25."""
    assert tied_fact_damage(0.5, 0.3) == pytest.approx(0.4)
    assert tied_fact_damage(0.4, 0.3) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="p_ref"):
        tied_fact_damage(0.0, 0.3)


def test_tied_fact_damage_is_unclamped():
    assert tied_fact_damage(0.4, 0.1) == pytest.approx(0.75)
    assert tied_fact_damage(0.1, 0.15) == pytest.approx(-0.5)
    assert tied_fact_damage(0.1, 0.9) == pytest.approx(-8.0)
    np.testing.assert_allclose(tied_fact_damage([0.4, 0.1], [0.1, 0.9]), [0.75, -8.0])


# -- properties ----------------------------------------------------------------------

prob = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def two_dists(draw):
    n = draw(st.integers(1, 8))
    p = draw(st.lists(prob, min_size=n, max_size=n).filter(lambda v: sum(v) > 1e-6))
    q = draw(st.lists(prob, min_size=n, max_size=n).filter(lambda v: sum(v) > 1e-6))
    return p, q


@settings(max_examples=200, deadline=None)
@given(two_dists())
def test_js_bounds_symmetry_and_scipy(pq):
    # Found by hypothesis: q = [1, 5e-324] once gave ln 2 (m underflowed to 0).
    p, q = pq
    d = js_divergence(p, q)
    assert 0.0 <= d <= LN2
    assert d == pytest.approx(js_divergence(q, p), abs=1e-12)
    ref = jensenshannon(p, q) ** 2  # scipy gives NaN (sqrt of a rounding-negative) near 0
    if np.isfinite(ref) or np.isnan(ref):  # and inf when a subnormal mass underflows in m
        assert d == pytest.approx(0.0 if np.isnan(ref) else ref, abs=1e-9)
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js_pitfalls(p, q) == pytest.approx(d / len(p) * 100)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(prob, prob), min_size=1, max_size=10))
def test_ignore_rate_bounds(pairs):
    p0, pb = zip(*pairs)
    ir = ignore_rate(p0, pb)
    assert 0.0 <= ir <= 1.0
    assert ignore_rate(p0, p0) == 0.0


@settings(max_examples=100, deadline=None)
@given(st.floats(1e-6, 1.0), st.floats(0.0, 1.0))
def test_cm_and_tfd_bounds(pm, pb):
    cm = conflict_magnitude(pm, pb)
    assert -1.0 <= cm <= 1.0
    tfd = tied_fact_damage(pm, pb)
    assert tfd <= 1.0
    assert cm == pytest.approx(max(tfd, -1.0))


@settings(max_examples=100, deadline=None)
@given(prob, prob, prob, prob)
def test_round_success_values(a, b, c, d):
    assert round_success(a, b, c, d) in (0.0, 0.5, 1.0)


def test_js_subnormal_mass_is_zero_not_ln2():
    assert js_divergence([1.0, 0.0], [1.0, 5e-324]) == pytest.approx(0.0, abs=1e-12)
