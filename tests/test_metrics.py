"""Retention metrics against hand-worked cases (METRICS.md §3)."""

import math

import numpy as np
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lifelong.run import RESULT_SCHEMA
from probes.metrics import forgotten_at, retainability, retained_fraction, retention_matrix, retention_summary


def table(rows):
    """rows: (step, probe, metric, protocol, edit_id, value)."""
    full = [{"run_id": "r", "step": s, "timestamp": None, "probe": p, "metric": m, "protocol": pr,
             "edit_id": e, "value": v} for s, p, m, pr, e, v in rows]
    return pl.DataFrame(full, schema=RESULT_SCHEMA, orient="row")


# Three edits a, b, c made at steps 1, 2, 3; retention probed at steps 2 and 3.
#   own-step scores: a=1, b=1, c=0
#   after step 2: a=0, b=1        after step 3: a=1, b=0, c=1
HAND = table([
    (1, "edit_quality", "efficacy", "es", "a", 1.0),
    (2, "edit_quality", "efficacy", "es", "b", 1.0),
    (3, "edit_quality", "efficacy", "es", "c", 0.0),
    (2, "retention", "retention", "es", "a", 0.0),
    (2, "retention", "retention", "es", "b", 1.0),
    (3, "retention", "retention", "es", "a", 1.0),
    (3, "retention", "retention", "es", "b", 0.0),
    (3, "retention", "retention", "es", "c", 1.0),
    (0, "edit_quality", "efficacy", "es", "a", 0.0),  # θ0 rows must not count as own-step scores
])


def test_matrix_layout():
    m = retention_matrix(HAND)
    assert m.edit_ids == ["a", "b", "c"]
    assert list(m.steps) == [2, 3]
    assert list(m.own_step) == [1, 2, 3]
    expected = np.array([[0, 1, np.nan], [1, 0, 1]])
    assert np.array_equal(np.isnan(m.values), np.isnan(expected))
    assert np.array_equal(np.nan_to_num(m.values, nan=-1), np.nan_to_num(expected, nan=-1))


def test_retained_fraction_hand_worked():
    assert retained_fraction(retention_matrix(HAND).values) == pytest.approx([0.5, 2 / 3])
    assert math.isnan(retained_fraction(np.full((1, 2), np.nan))[0])


def test_retainability_telescopes():
    acc = [1.0, 0.5, 2 / 3]
    survey = sum(acc[i + 1] - acc[i] for i in range(len(acc) - 1)) / (len(acc) - 1)
    assert retainability(acc[0], acc[-1], 3) == pytest.approx(survey)
    assert math.isnan(retainability(1.0, 1.0, 1))


def test_forgotten_at_hand_worked():
    # a held at its own step and fails at step 2 -> forgotten at 2 (coming back later does not undo it);
    # b holds at 2, fails at 3 -> 3; c never took hold -> not forgotten.
    out = forgotten_at(retention_matrix(HAND))
    assert out[0] == 2 and out[1] == 3 and math.isnan(out[2])


def test_summary_hand_worked():
    s = retention_summary(HAND)
    assert s["retained_fraction"] == pytest.approx(2 / 3)
    assert s["retainability"] == pytest.approx((2 / 3 - 1.0) / 2)
    assert s["forgotten"] == 2
    assert s["median_steps_to_forget"] == pytest.approx(1.0)


@given(st.lists(st.lists(st.sampled_from([0.0, 1.0, float("nan")]), min_size=3, max_size=3), min_size=1, max_size=6))
def test_retained_fraction_in_unit_interval(rows):
    frac = retained_fraction(np.array(rows))
    assert np.all((frac[~np.isnan(frac)] >= 0) & (frac[~np.isnan(frac)] <= 1))
