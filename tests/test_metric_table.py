"""The metric table (probes/metric_table.py): it names every metric the probes emit, with ranges the
values keep, and the testing kit's range check fires on it."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

from lifelong.run import RunConfig
from probes import PROBES, Probe, ProbeSuite, Row
from probes.metric_table import (
    CHAINS,
    DISTORTION_JS,
    DOWNSTREAM,
    FAILURE_RATE,
    METRICS,
    ROUGE1,
    ROUGE2,
    ROUGE_L,
    ROUND_SUCCESS,
    Metric,
    out_of_range,
)
from streams import ChainLink, Edit, EditStream, Neighbor
from tests.conftest import TINY_FT
from tests.test_chains_probe import chain_stream

# Only generation tasks with summaries (samsum, from the shared data) emit ROUGE rows.
NOT_ON_TINY = {(DOWNSTREAM, ROUGE1), (DOWNSTREAM, ROUGE2), (DOWNSTREAM, ROUGE_L)}


def test_the_table_names_registered_probes():
    assert {probe for probe, _ in METRICS} == set(PROBES)
    for (probe, name), entry in METRICS.items():
        assert (entry.probe, entry.name) == (probe, name) and entry.low < entry.high and entry.description


def test_every_metric_a_tiny_replay_emits_is_in_the_table_and_in_range(tmp_path):
    """Every probe that runs on a tiny model, on a stream with round, reverse, composite and coverage chains;
    the downstream probe under both protocols; retention from a sample (its size and population rows)."""
    from lifelong.replay import replay

    path = tmp_path / "chains.jsonl"
    edits = [
        replace(e, neighborhood=(Neighbor("The capital of Land is", "Town"),)) if e.id == "f1" else e
        for e in chain_stream()
    ]  # a neighbor, for locality
    EditStream(edits).to_jsonl(path)
    common = dict(model="tiny-llama", stream=str(path), editor_overrides=dict(TINY_FT))
    full = replay(
        RunConfig(
            **common,
            steps=9,
            probe_every=3,
            probes=[
                "chains:remeasure=2,tfd_ref=both",
                "weight_drift",
                "retention:schedule=every:3,sample=2",
                "perplexity:schedule=every:3,max_tokens=256,max_sentences=8",
                "downstream:schedule=every:9,items=2",
                "fluency:schedule=every:9",  # the paper presets' probes (probes/paper.py)
                "final_quality:token_acc=true",
            ],
        ),
        tmp_path / "full",
        progress=False,
    )
    seed = replay(
        RunConfig(**common, steps=1, probes=["downstream:items=2,protocol=seed"]), tmp_path / "seed", progress=False
    )
    results = pl.concat([full.run.results(), seed.run.results()])
    emitted = set(results.select("probe", "metric").unique().iter_rows())
    assert emitted - set(METRICS) == set()
    assert set(METRICS) - emitted == NOT_ON_TINY  # no stale names in the table either
    assert out_of_range(results.select("probe", "metric", "protocol", "edit_id", "step", "value").iter_rows()) == []


def test_out_of_range_names_the_row():
    row = (CHAINS, DISTORTION_JS, "completion;p=meantok", "r1", 3)
    assert out_of_range([(*row, 0.5)]) == []
    (bad,) = out_of_range([(*row, 0.8)])
    assert bad == "chains/distortion_js/completion;p=meantok edit r1 step 3 = 0.8 not in [0, ln 2]"
    assert out_of_range([(*row, math.nan)])  # undefined distortion is a bug; undefined FR is not
    assert out_of_range([(CHAINS, FAILURE_RATE, "completion;p=meantok", None, 3, math.nan)]) == []
    assert out_of_range([("my_probe", DISTORTION_JS, "x", None, 1, 9.0)]) == []  # not a built-in probe's metric


class FakeDistortion(Probe):
    """Writes one distortion row per step with a set value, as a broken chain probe might."""

    name = CHAINS
    value = 0.0

    def measure(self, ctx):
        return [Row(self.name, DISTORTION_JS, "completion;p=meantok", self.value, "c0")] if ctx.step else []


@pytest.mark.parametrize("value, fails", [(math.log(2) + 0.01, True), (math.log(2) - 0.01, False)])
def test_kit_fails_an_out_of_range_distortion(value, fails, monkeypatch, tmp_path):
    import lifelong.replay
    from lifelong.testing import check_editor
    from tests.test_testing_kit import ToyEditor

    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))
    default_suite = lifelong.replay.default_suite
    monkeypatch.setattr(FakeDistortion, "value", value)
    monkeypatch.setattr(
        lifelong.replay,
        "default_suite",
        lambda config: ProbeSuite([p for p in default_suite(config).probes if p.name != CHAINS] + [FakeDistortion()]),
    )  # in place of the kit's chain probe
    report = check_editor(ToyEditor, invariants=["metric_bounds"], max_examples=1, shrink=False)
    if fails:
        assert report.failed == ["metric_bounds"]
        assert "chains/distortion_js/completion;p=meantok edit c0" in report.failures[0].message
        assert "not in [0, ln 2]" in report.failures[0].message
    else:
        assert report.passed == ["metric_bounds"]


def test_kit_replays_with_the_chain_probe_and_checks_its_rows(monkeypatch, tmp_path):
    """A round chain through the kit's own replay: with round_success's range made impossible, the kit
    names the chain probe's row (so chain rows are there, and checked)."""
    from lifelong.testing import EditorUnderTest, InvariantViolation
    from lifelong.testing.invariants import metric_bounds
    from tests.test_testing_kit import ToyEditor

    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))
    day = datetime(2024, 1, 1, tzinfo=timezone.utc)
    out = Edit(
        id="e0",
        timestamp=day,
        subject="Ada",
        relation_id="capital",
        prompt="The capital of {} is",
        target_new="Oslo",
        target_true="Rome",
        candidates=("Rome", "Oslo", "Lima", "Bern"),
        chain=ChainLink("c0", "round-out"),
    )
    back = replace(
        out,
        id="e1",
        timestamp=day + timedelta(days=1),
        target_new="Rome",
        target_true="Oslo",
        chain=ChainLink("c0", "round-back"),
    )
    stream = EditStream([out, back])
    metric_bounds(EditorUnderTest(ToyEditor), stream)  # in range as tabled
    monkeypatch.setitem(METRICS, (CHAINS, ROUND_SUCCESS), Metric(CHAINS, ROUND_SUCCESS, 2, 3, "no value fits"))
    with pytest.raises(InvariantViolation, match=r"chains/round_success/completion;p=meantok edit c0 step 2"):
        metric_bounds(EditorUnderTest(ToyEditor), stream)
