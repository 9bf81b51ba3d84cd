"""Retention metrics against hand-worked cases (docs/METRICS.md §3)."""

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
    full = [
        {"run_id": "r", "step": s, "timestamp": None, "probe": p, "metric": m, "protocol": pr, "edit_id": e, "value": v}
        for s, p, m, pr, e, v in rows
    ]
    return pl.DataFrame(full, schema=RESULT_SCHEMA, orient="row")


# Three edits a, b, c made at steps 1, 2, 3; retention probed at steps 2 and 3.
#   own-step scores: a=1, b=1, c=0
#   after step 2: a=0, b=1        after step 3: a=1, b=0, c=1
HAND = table(
    [
        (1, "edit_quality", "efficacy", "es", "a", 1.0),
        (2, "edit_quality", "efficacy", "es", "b", 1.0),
        (3, "edit_quality", "efficacy", "es", "c", 0.0),
        (2, "retention", "retention", "es", "a", 0.0),
        (2, "retention", "retention", "es", "b", 1.0),
        (3, "retention", "retention", "es", "a", 1.0),
        (3, "retention", "retention", "es", "b", 0.0),
        (3, "retention", "retention", "es", "c", 1.0),
        (0, "edit_quality", "efficacy", "es", "a", 0.0),  # θ0 rows must not count as own-step scores
    ]
)


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


def test_superseded_edit_is_not_forgotten_and_leaves_the_denominator():
    """Edit a (step 1) is superseded by b (step 2, same subject and relation): from step 2 on it has a
    ``superseded`` row, not a ``retention`` one. Its score 0 at step 3 is no forgetting; the retained
    fraction at step 3 is over b and c only: (1 + 0) / 2."""
    results = table(
        [
            (1, "edit_quality", "efficacy", "es", "a", 1.0),
            (2, "edit_quality", "efficacy", "es", "b", 1.0),
            (3, "edit_quality", "efficacy", "es", "c", 1.0),
            (1, "retention", "retention", "es", "a", 1.0),
            (2, "retention", "superseded", "es", "a", 0.0),
            (2, "retention", "retention", "es", "b", 1.0),
            (3, "retention", "superseded", "es", "a", 0.0),
            (3, "retention", "retention", "es", "b", 1.0),
            (3, "retention", "retention", "es", "c", 0.0),
        ]
    )
    m = retention_matrix(results)
    assert np.isnan(m.values[1:, 0]).all() and m.superseded[:, 0].tolist() == [False, True, True]
    assert retained_fraction(m.values).tolist() == [1.0, 1.0, 0.5]
    # a superseded, b held, c failed only at its own step: nobody forgotten
    assert np.isnan(forgotten_at(m)).tolist() == [True, True, True]
    s = retention_summary(results)
    assert s["retained_fraction"] == 0.5 and s["forgotten"] == 0 and s["superseded"] == 1


def test_retention_probe_reports_superseded_edits():
    """A tiny stream: Country0's capital edited at step 1 and again at step 3 (a round-back-like
    supersession), Country1 at step 2. After step 3 the first edit is scored as ``superseded``."""
    from dataclasses import replace

    from lifelong.core.models import load_model
    from lifelong.core.scorer import Scorer
    from probes import ProbeContext
    from probes.edit_quality import RetentionProbe, superseded_ids
    from tests.conftest import make_edits

    e0, e1 = make_edits(2)
    again = replace(e0, id="e0-again", target_new="City0", target_true="Nova0")
    assert superseded_ids([e0, e1, again]) == {"e0"}
    lm = load_model("tiny-llama")
    probe = RetentionProbe()
    history = [(e0,), (e1,), (again,)]
    ctx = ProbeContext(
        step=3, timestamp=None, batch=history[-1], history=history, scorer=Scorer(lm.model, lm.tokenizer)
    )
    rows = probe.measure(ctx)
    by = {(r.metric, r.protocol, r.edit_id): r.value for r in rows}
    assert {k[2] for k in by if k[0] == "retention"} == {"e1", "e0-again"}
    assert {k[:2] for k in by if k[2] == "e0"} == {("superseded", "es"), ("superseded", "exact")}
    for protocol in ("es", "exact"):  # the retained fraction is over the two live edits only
        live = [by[("retention", protocol, e)] for e in ("e1", "e0-again")]
        assert by[("retained_fraction", protocol, None)] == pytest.approx(np.mean(live))
    ctx2 = ProbeContext(
        step=2, timestamp=None, batch=history[1], history=history[:2], scorer=Scorer(lm.model, lm.tokenizer)
    )
    assert not [r for r in probe.measure(ctx2) if r.metric == "superseded"]  # not yet superseded at step 2
