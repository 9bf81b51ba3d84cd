"""The weight-drift probe's norm ratio, largest relative update and collapse warning (issue #38): the
warning comes no later than the perplexity ratio passes 2 on KN and MEND runs, never on a 100-step GRACE
run, and `show`, the dashboard and the replay's progress line carry it."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import polars as pl
import pytest
import torch

from lifelong.core.models import load_model
from lifelong.editors.mend.training import TRAINING_PRESETS, train_hypernetwork
from lifelong.replay import replay
from lifelong.run import RunConfig
from lifelong.summary import format_summary, summary_json
from probes import make_probe
from probes.base import ProbeContext
from probes.weight_drift import WARN_RELATIVE, warning_step
from streams import EditStream
from streams.errors import UserError
from tests.conftest import make_edits
from tests.test_general_probes import TEXT, train_to_repeat

GRACE = {"layer": "2", "eps_init": "1.0", "max_steps": "1"}


def _drift_rows(probe, base: dict, now: dict) -> dict:
    ctx = ProbeContext(step=1, timestamp=None, batch=(), history=[], scorer=SimpleNamespace(weights=lambda: now))
    ctx.base_params = base
    return {(r.metric, r.protocol, r.edit_id): r.value for r in probe.measure(ctx)}


def test_norm_ratio_largest_update_and_the_threshold():
    base = {"a": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([[1.0, 0.0]])}  # ‖a‖ = 5, ‖b‖ = 1
    now = {"a": torch.tensor([[3.0, 4.2]]), "b": torch.tensor([[1.0, 0.3]])}
    rows = _drift_rows(make_probe("weight_drift"), base, now)
    assert rows[("norm_ratio", "per_matrix", "a")] == pytest.approx(math.hypot(3, 4.2) / 5)
    assert rows[("relative", "per_matrix", "a")] == pytest.approx(0.04)
    assert rows[("relative", "max", None)] == pytest.approx(0.3)  # b's 0.3 beats a's 0.04
    assert rows[("relative", "sum", None)] == pytest.approx(0.34)
    assert rows[("norm_ratio", "max", None)] == pytest.approx(math.hypot(1, 0.3))
    assert rows[("drift_warning", "sum", None)] == float(WARN_RELATIVE <= 0.34)
    assert _drift_rows(make_probe("weight_drift:warn_relative=0.33"), base, now)[("drift_warning", "sum", None)] == 1
    assert _drift_rows(make_probe("weight_drift:warn_relative=0.35"), base, now)[("drift_warning", "sum", None)] == 0
    # No edited matrix (GRACE's scope): the weights are θ0's.
    empty = _drift_rows(make_probe("weight_drift"), {}, {})
    assert (empty[("norm_ratio", "max", None)], empty[("relative", "sum", None)]) == (1.0, 0.0)
    assert empty[("drift_warning", "sum", None)] == 0
    for bad in ("0", "-1", "nan"):
        with pytest.raises(UserError, match="warn_relative"):
            make_probe(f"weight_drift:warn_relative={bad}")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny model fitted to a short text (so edits raise its perplexity on it), that text, a stream."""
    path = tmp_path_factory.mktemp("drift")
    (path / "corpus.txt").write_text(TEXT)
    EditStream(make_edits(3)).to_jsonl(path / "s.jsonl")
    lm = load_model("tiny-llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_num_threads(1)
        train_to_repeat(lm, TEXT, steps=40)
    return path, {k: v.clone() for k, v in lm.model.state_dict().items()}


def _run(work, tmp_path, editor: str, overrides: dict, stream=None, probes=None, progress=False):
    path, state = work
    lm = load_model("tiny-llama")
    lm.model.load_state_dict(state)
    cfg = RunConfig(
        model="tiny-llama",
        editor=editor,
        editor_overrides=overrides,
        stream=str(stream or path / "s.jsonl"),
        probe_every=100,
        probes=probes or [f"perplexity:schedule=every:1,chunk_tokens=64,corpus={path / 'corpus.txt'}", "weight_drift"],
    )
    return replay(cfg, tmp_path / editor, lm=lm, progress=progress).run


def _first_over_2(results: pl.DataFrame) -> int:
    ratio = results.filter(
        (pl.col("probe") == "perplexity") & (pl.col("metric") == "ratio") & (pl.col("protocol") == "corpus")
    )
    over = ratio.filter(pl.col("value") > 2)
    assert over.height, "the run's perplexity never passed 2: the ordering would be untested"
    return int(over["step"].min())


@pytest.fixture(scope="module")
def kn_run(work, tmp_path_factory):
    return _run(work, tmp_path_factory.mktemp("kn"), "kn", {"layers": "0-3", "ig_steps": "2"})


def test_kn_warns_before_its_perplexity_passes_2(kn_run):
    results = kn_run.results()
    step = warning_step(results)
    assert step is not None and step <= _first_over_2(results)


def test_mend_warns_no_later_than_its_perplexity_passes_2(work, tmp_path):
    path, _ = work
    EditStream(make_edits(40, start=200)).to_jsonl(path / "train.jsonl")
    # A hypernetwork trained briefly with a large step size: cheap, and its edits collapse the tiny model.
    hypernet = train_hypernetwork(
        load_model("tiny-llama"),
        [1, 2, 3],
        str(path / "train.jsonl"),
        dataclasses.replace(TRAINING_PRESETS["cpu-small"], steps=10, edit_lr=1e-2, checkpoint_every=10),
        directory=tmp_path / "hypernet",
        progress=False,
    )
    results = _run(work, tmp_path, "mend", {"layers": "1-3", "hypernet": str(hypernet)}).results()
    step = warning_step(results)
    assert step is not None and step <= _first_over_2(results)


def test_grace_never_warns_over_100_steps(work, tmp_path):
    path, _ = work
    stream = path / "s100.jsonl"
    EditStream(make_edits(100)).to_jsonl(stream)
    results = _run(work, tmp_path, "grace", GRACE, stream=stream, probes=["weight_drift"]).results()
    warning = results.filter(pl.col("metric") == "drift_warning")
    assert warning["step"].to_list() == list(range(1, 101))  # measured after every step
    assert warning["value"].sum() == 0 and warning_step(results) is None


def test_default_threshold_keeps_the_former_identity(kn_run, work, tmp_path):
    # Runs from before the warning recorded weight_drift without options: they must keep resuming.
    assert {"name": "weight_drift", "schedule": "every:1"} in kn_run.manifest()["identity"]["probes"]
    run = _run(work, tmp_path, "grace", GRACE, probes=["weight_drift:warn_relative=0.2"])
    recorded = [p for p in run.manifest()["identity"]["probes"] if p["name"] == "weight_drift"]
    assert recorded == [{"name": "weight_drift", "schedule": "every:1", "options": {"warn_relative": 0.2}}]


def test_show_and_summary_carry_the_warning(kn_run):
    text = format_summary(kn_run)
    step = warning_step(kn_run.results())
    assert f"collapse warning: weight drift from step {step} " in text
    assert f">= {WARN_RELATIVE:g})" in text
    results = summary_json(kn_run)["results"]
    assert results["weight_drift/warning_step"]["sum"]["value"] == step
    assert results["weight_drift/relative_sum@last"]["sum"]["value"] >= WARN_RELATIVE
    assert results["weight_drift/norm_ratio_max@last"]["max"]["value"] > 1


def test_dashboard_marks_the_warning(kn_run):
    from lifelong.plots import dashboard_figure

    fig = dashboard_figure(kn_run)
    step = warning_step(kn_run.results())
    labels = [[line.get_label() for line in ax.get_lines()] for ax in fig.axes if ax.get_lines()]
    assert all(f"collapse warning ({step})" in panel for panel in labels)  # on every panel
    assert any(f"warning ({WARN_RELATIVE:g})" in panel for panel in labels)  # the threshold on the drift panel
    assert f"collapse warning (weight drift) at step {step}" in fig._suptitle.get_text()


def test_progress_line_warns_once(work, tmp_path, capsys):
    run = _run(work, tmp_path, "kn", {"layers": "0-3", "ig_steps": "2"}, probes=["weight_drift"], progress=True)
    err = capsys.readouterr().err
    assert err.count("collapse warning: weight drift from step") == 1
    assert f"from step {warning_step(run.results())} " in err
