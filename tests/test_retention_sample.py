"""The retention probe's sample cap (issue #19): exact under the cap, a stable seeded sample above it,
and a finite-population Wilson interval that covers the exact retained fraction at about its rate."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from lifelong.core.stats import sampled_wilson, wilson
from probes.edit_quality import RetentionOptions, RetentionProbe, capped, panel_rank
from tests.conftest import TINY_FT, make_edits


def _ids(n: int, start: int = 0) -> list[SimpleNamespace]:
    return [SimpleNamespace(id=f"e{i}") for i in range(start, start + n)]


def test_capped_is_exact_under_the_cap_and_a_stable_smallest_rank_sample_above_it():
    items = _ids(50)
    assert capped(items, 50, 0) == items and capped(items, None, 0) == items
    picked = capped(items, 10, seed=3)
    assert len(picked) == 10 and picked == [e for e in items if e in picked]  # stream order kept
    cut = sorted(panel_rank(e.id, 3) for e in items)[9]
    assert all(panel_rank(e.id, 3) <= cut for e in picked)
    assert capped(items, 10, seed=4) != picked
    # As the stream grows one edit at a time, the sample changes by at most one edit in and one out,
    # and an edit that left it never returns.
    left: set[str] = set()
    before = {e.id for e in picked}
    for n in range(51, 400):
        now = {e.id for e in capped(_ids(n), 10, seed=3)}
        assert len(now) == 10 and len(before - now) <= 1 and not (now & left)
        left |= before - now
        before = now


def test_sample_option_is_checked():
    with pytest.raises(ValueError, match="sample must be at least 1"):
        RetentionOptions(sample=0)
    assert RetentionOptions().sample == 500  # exact up to 500 edits by default


def test_sampled_wilson_is_exact_for_a_census_and_narrower_than_wilson_for_a_large_share():
    assert sampled_wilson(30, 40, 40) == (0.75, 0.75)
    lo, hi = sampled_wilson(300, 500, 1000)
    plo, phi = wilson(300, 500)
    assert plo < lo < 0.6 < hi < phi and (hi - lo) < 0.75 * (phi - plo)
    assert sampled_wilson(0, 50, 1000)[0] == 0.0 and sampled_wilson(50, 50, 1000)[1] == 1.0
    a, b = sampled_wilson(20, 50, 10**9), wilson(20, 50)  # a tiny share of a huge set: plain Wilson
    assert a == pytest.approx(b, abs=1e-6)


def test_sampled_interval_covers_the_exact_fraction_at_about_its_rate():
    """Synthetic 0/1 outcomes for 600 edits; over 300 seeds, the 150-edit sample's 95% interval
    covers the exact retained fraction about 95% of the time (binomial sd of the rate ~0.013)."""
    rng = np.random.default_rng(0)
    items = _ids(600)
    held = {e.id: float(rng.random() < 0.3) for e in items}
    exact = np.mean(list(held.values()))
    covered, ratio = [], []
    for seed in range(300):
        k = sum(held[e.id] for e in capped(items, 150, seed))
        lo, hi = sampled_wilson(k, 150, 600)
        covered.append(lo <= exact <= hi)
        plo, phi = wilson(k, 150)
        ratio.append((hi - lo) / (phi - plo))
    assert 0.91 <= np.mean(covered) <= 0.99
    assert np.mean(ratio) < 0.9  # the correction matters at a quarter of the population


def _ctx(lm, history):
    from lifelong.core.scorer import Scorer
    from probes import ProbeContext

    return ProbeContext(
        step=len(history), timestamp=None, batch=history[-1], history=history, scorer=Scorer(lm.model, lm.tokenizer)
    )


def test_probe_scores_every_edit_under_the_cap_and_exactly_sample_above_it():
    from lifelong.core.models import load_model

    lm = load_model("tiny-llama")
    edits = make_edits(7)
    history = [(e,) for e in edits]
    full = RetentionProbe(options=RetentionOptions(sample=None)).measure(_ctx(lm, history))
    under = RetentionProbe(options=RetentionOptions(sample=7)).measure(_ctx(lm, history))
    assert under == full and not [r for r in under if r.metric.startswith("sample")]
    rows = RetentionProbe(options=RetentionOptions(sample=3, seed=2)).measure(_ctx(lm, history))
    chosen = {e.id for e in capped(edits, 3, 2)}
    by_full = {(r.metric, r.protocol, r.edit_id): r.value for r in full}
    for protocol in ("es", "exact"):
        scored = [r for r in rows if r.metric == "retention" and r.protocol == protocol]
        assert {r.edit_id for r in scored} == chosen
        assert all(r.value == by_full[("retention", protocol, r.edit_id)] for r in scored)
        meta = {r.metric: r.value for r in rows if r.protocol == protocol and r.edit_id is None}
        assert meta == {
            "retained_fraction": pytest.approx(np.mean([r.value for r in scored])),
            "sample_size": 3.0,
            "sample_population": 7.0,
        }


def test_summary_of_a_sampled_run_keeps_intervals_and_does_not_count_unsampled_edits_as_forgotten(
    tmp_path, stream_file
):
    from lifelong.core.models import load_model
    from lifelong.replay import replay
    from lifelong.run import RunConfig
    from lifelong.summary import format_summary, summary_lines
    from probes.metrics import observed, retention_matrix

    run = replay(
        RunConfig(
            model="tiny-llama",
            stream=str(stream_file),
            editor_overrides=dict(TINY_FT),
            probes=["retention:schedule=every:2,sample=2"],
        ),
        tmp_path / "run",
        lm=load_model("tiny-llama"),
        progress=False,
    ).run
    results = run.results()
    m = retention_matrix(results, "es")
    assert m.sampled[-1] and m.population[-1] == len(m.edit_ids)
    assert (~np.isnan(m.values[-1])).sum() == 2
    lines = {(ln.measure, ln.protocol): ln for ln in summary_lines(run)}
    last = lines[("retained fraction at last step", "es")].estimate
    assert last.n == 2 and last.method == "wilson, sampled" and last.low <= last.value <= last.high
    assert last.high - last.low < np.diff(wilson(last.value * 2, 2))[0]
    retainability = lines[("retainability", "es")].estimate
    assert not np.isnan(retainability.value) and retainability.low is not None
    share = lines[("edits forgotten (share of those that took hold)", "es")].estimate
    took_seen = int(((m.own_score == 1) & observed(m)).sum())
    assert share.n == took_seen
    assert not observed(m).all()  # some edits were never sampled again: left out, not "kept"
    assert "seeded sample" in format_summary(run)
    assert results.filter(pl.col("metric") == "sample_size")["value"].max() == 2
