"""The run dashboard, `lifelong compare` and the general-ability summary lines."""

from __future__ import annotations

import polars as pl
import pytest

from lifelong.cli import main
from lifelong.plots import _panels, plot_dashboard
from lifelong.run import RunDir
from tests.conftest import TINY_FT

PROBES = [
    "--probe",
    "perplexity:schedule=every:2,chunk_tokens=64,max_tokens=256,max_sentences=8",
    "--probe",
    "downstream:schedule=every:2,tasks=sentiment+facts,items=4",
    "--probe",
    "weight_drift",
]


def replay(capsys, stream_file, out, lr="0.05"):
    sets = [f"--set={k}={v}" for k, v in {**TINY_FT, "lr": lr}.items()]
    code = main(
        [
            "replay",
            "--model",
            "tiny-llama",
            "--stream",
            str(stream_file),
            "--steps",
            "4",
            "--probe-every",
            "2",
            "--out",
            str(out),
            "--quiet",
            *sets,
            *PROBES,
        ]
    )
    out_text, err = capsys.readouterr()
    assert code == 0, err
    return out_text


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from streams import EditStream
    from tests.conftest import make_edits

    base = tmp_path_factory.mktemp("dash")
    stream = base / "s.jsonl"
    EditStream(make_edits()).to_jsonl(stream)

    for name, lr in (("a", "0.05"), ("b", "0.2")):
        code = main(
            [
                "replay",
                "--model",
                "tiny-llama",
                "--stream",
                str(stream),
                "--steps",
                "4",
                "--probe-every",
                "2",
                "--out",
                str(base / name),
                "--quiet",
                *[f"--set={k}={v}" for k, v in {**TINY_FT, "lr": lr}.items()],
                *PROBES,
            ]
        )
        assert code == 0
    return base / "a", base / "b"


def test_replay_writes_a_dashboard_and_summary_lines(tmp_path, stream_file, capsys):
    out = replay(capsys, stream_file, tmp_path / "run")
    assert (tmp_path / "run" / "plots" / "dashboard.png").stat().st_size > 10_000
    assert "dashboard.png" in out
    for line in (
        "perplexity ratio to θ0 at last step",
        "perplexity collapse step (ratio >= 2)",
        "downstream drift at last step (difference)",
        "weight drift ||W_t - W_0||_F at last step",
    ):
        assert line in out, line
    results = RunDir(tmp_path / "run").results()
    assert _panels(results) == ["retention", "perplexity", "downstream", "weight_drift"]


def test_dashboard_draws_distortion_when_chain_rows_exist(two_runs):
    run = RunDir(two_runs[0])
    results = run.results()
    run_id = results["run_id"][0]
    chains = pl.DataFrame(
        [
            {
                "run_id": run_id,
                "step": s,
                "timestamp": None,
                "probe": "chains",
                "metric": "distortion_js",
                "protocol": "completion",
                "edit_id": f"c{c}",
                "value": 0.1 * s,
            }
            for s in (2, 4)
            for c in (1, 2)
        ],
        schema=results.schema,
    )
    from lifelong.run import atomic_write_parquet

    # Rows added by hand: recorded with their digest, as consolidate writes it (else refused as damaged).
    run.results_digest_path.write_text(atomic_write_parquet(pl.concat([results, chains]), run.results_path))
    assert "distortion" in _panels(run.results())
    path = plot_dashboard(run)
    assert path.name == "dashboard.png" and path.stat().st_size > 10_000


def test_compare_overlays_runs_and_writes_one_table(two_runs, tmp_path, capsys):
    code = main(["compare", str(two_runs[0]), str(two_runs[1]), "--out", str(tmp_path / "cmp")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    table = pl.read_csv(tmp_path / "cmp" / "compare.csv")
    # each run's figure comes with its n and 95% interval (issue #15)
    assert table.columns == [
        "measure",
        "protocol",
        "ft (a)",
        "ft (a) n",
        "ft (a) low",
        "ft (a) high",
        "ft (b)",
        "ft (b) n",
        "ft (b) low",
        "ft (b) high",
    ]
    es = table.filter((pl.col("measure") == "efficacy at own step") & (pl.col("protocol") == "es"))
    assert es["ft (a) n"][0] == 4 and es["ft (a) low"][0] <= es["ft (a)"][0] <= es["ft (a) high"][0]
    row = table.filter((pl.col("measure") == "perplexity ratio to θ0 at last step") & (pl.col("protocol") == "corpus"))
    assert row.height == 1 and row["ft (a)"][0] > 0 and row["ft (a)"][0] != row["ft (b)"][0]
    assert "ft (a)" in out and "perplexity ratio to θ0 at last step" in out
    assert f"n={es['ft (a) n'][0]}" in out


def test_compare_aggregates_seeds_of_one_configuration(tmp_path, capsys):
    """Two seeds, each drawing its own 3 of 12 edits (--sample): disjoint samples, pooled as one."""
    from streams import EditStream
    from tests.conftest import make_edits

    stream_file = tmp_path / "twelve.jsonl"
    EditStream(make_edits(12)).to_jsonl(stream_file)
    drawn = [{e.id for e in EditStream(make_edits(12)).sample(3, seed)} for seed in (0, 1)]
    assert not drawn[0] & drawn[1]  # the seeds chosen draw disjoint samples
    sets = [f"--set={k}={v}" for k, v in TINY_FT.items()]
    for seed in (0, 1):
        assert (
            main(
                [
                    "replay",
                    "--model",
                    "tiny-llama",
                    "--stream",
                    str(stream_file),
                    "--steps",
                    "3",
                    "--probe-every",
                    "3",
                    "--seed",
                    str(seed),
                    "--sample",
                    "3",
                    "--out",
                    str(tmp_path / f"s{seed}"),
                    "--quiet",
                    *sets,
                ]
            )
            == 0
        )
    capsys.readouterr()
    code = main(["compare", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "cmp")])
    out, err = capsys.readouterr()
    assert code == 0, err
    table = pl.read_csv(tmp_path / "cmp" / "compare.csv")
    name = "ft (2 seeds)"
    assert table.columns == ["measure", "protocol"] + [
        f"{name} {c}"
        for c in ("pooled", "pooled n", "pooled low", "pooled high", "seed mean", "seeds n", "seed low", "seed high")
    ]
    es = table.filter((pl.col("measure") == "efficacy at own step") & (pl.col("protocol") == "es")).row(0, named=True)
    per_seed = [
        RunDir(tmp_path / f"s{s}")
        .results()
        .filter(
            (pl.col("probe") == "edit_quality")
            & (pl.col("metric") == "efficacy")
            & (pl.col("protocol") == "es")
            & (pl.col("step") > 0)
        )["value"]
        for s in (0, 1)
    ]
    assert es[f"{name} pooled n"] == 6 and es[f"{name} seeds n"] == 2
    assert es[f"{name} pooled"] == pytest.approx(float(pl.concat(per_seed).mean()))
    assert es[f"{name} seed mean"] == pytest.approx((per_seed[0].mean() + per_seed[1].mean()) / 2)
    assert es[f"{name} pooled low"] <= es[f"{name} pooled"] <= es[f"{name} pooled high"]
    assert "2 runs differ only in seed (0, 1)" in out and "pooled" in out and "seed mean" in out
    assert "counted once" not in out and "not pooled" not in out


def test_compare_errors(two_runs, tmp_path, capsys):
    assert main(["compare", str(two_runs[0])]) == 2
    assert "compare needs at least two run directories" in capsys.readouterr().err
    assert main(["compare", str(two_runs[0]), str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_compare_warns_about_different_models(two_runs, tmp_path, stream_file, capsys):
    other = tmp_path / "gpt2"
    code = main(
        [
            "replay",
            "--model",
            "tiny-gpt2",
            "--stream",
            str(stream_file),
            "--steps",
            "2",
            "--out",
            str(other),
            "--quiet",
            *[f"--set={k}={v}" for k, v in TINY_FT.items()],
        ]
    )
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["compare", str(two_runs[0]), str(other), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "edited different models" in out and "replayed different streams" in out


def test_retention_matrix_paints_only_measured_cells(tmp_path):
    """Retention every 5 steps: the matrix has rows for steps 5 and 10 only (steps 1-4 are not painted as
    if measured), edit 7 is blank at step 5, held/lost cells keep their 0/1 values; beyond
    MATRIX_COLUMNS edits the columns are bins holding the share of their edits that hold."""
    import numpy as np

    from lifelong.plots import MATRIX_COLUMNS, matrix_cells, plot_retention_matrix
    from probes.metrics import retention_matrix

    rows = []
    for step in (5, 10):
        for i in range(1, step + 1):
            rows.append(
                {
                    "step": step,
                    "probe": "retention",
                    "metric": "retention",
                    "protocol": "es",
                    "edit_id": f"e{i}",
                    "value": float(i % 3 != 0),
                }
            )
    for i in range(1, 11):
        rows.append(
            {
                "step": i,
                "probe": "edit_quality",
                "metric": "efficacy",
                "protocol": "es",
                "edit_id": f"e{i}",
                "value": 1.0,
            }
        )
    m = retention_matrix(pl.DataFrame(rows))
    cells, spans = matrix_cells(m.values)
    assert list(m.steps) == [5, 10] and cells.shape == (2, 10) and spans[6] == (6, 6)
    col = m.edit_ids.index("e7")
    assert np.isnan(cells[0, col]) and cells[1, col] == 1.0 and cells[1, m.edit_ids.index("e3")] == 0.0
    assert plot_retention_matrix(m, "t", tmp_path / "m.png").stat().st_size > 1000

    wide = np.tile(np.array([[1.0, 0.0, np.nan]]), (2, 70))  # 210 edits
    binned, spans = matrix_cells(wide)
    assert binned.shape == (2, MATRIX_COLUMNS) and spans[0][0] == 0 and spans[-1][1] == 209
    a, b = spans[0]
    assert binned[0, 0] == pytest.approx(np.nanmean(wide[0, a : b + 1]))


def test_retention_matrix_stays_readable_at_thousands_of_probes():
    """1,000 probed steps (10,000 edits probed every 10) bin into MATRIX_ROWS rows, each the mean of its
    measured cells (an edit not yet made in part of a bin counts only where measured), and the figure
    keeps a bounded size: before row binning it was 30,180 pixels tall."""
    import numpy as np

    from lifelong.plots import MATRIX_ROWS, bin_rows, retention_matrix_figure
    from probes.metrics import RetentionMatrix

    steps, edits = 1000, 120
    rng = np.random.default_rng(0)
    values = (rng.random((steps, edits)) < 0.7).astype(float)
    made = (np.arange(steps)[:, None] + 1) * edits // steps > np.arange(edits)[None, :]
    values[~made] = np.nan
    cells, spans = bin_rows(values)
    assert cells.shape == (MATRIX_ROWS, edits) and spans[0][0] == 0 and spans[-1][1] == steps - 1
    a, b = spans[-1]
    assert cells[-1, 0] == pytest.approx(np.nanmean(values[a : b + 1, 0]))
    assert np.isnan(cells[0, -1])  # the last edit is made in the last bin only
    assert bin_rows(values[:40])[0].shape == (40, edits)  # few probes: untouched

    m = RetentionMatrix(
        steps=np.arange(10, 10 * steps + 1, 10),
        edit_ids=[f"e{i}" for i in range(edits)],
        own_step=np.arange(edits) * steps // edits * 10 + 10,
        values=values,
        own_score=np.ones(edits),
    )
    fig = retention_matrix_figure(m, "t")
    width, height = fig.get_size_inches() * fig.dpi
    assert height < 2500 and width < 2500


def test_retention_matrix_rows_are_not_squeezed_by_long_edit_ids():
    """Four probed steps under 45-character edit ids (the demo's chain ids): the rotated ids took
    most of a 3-inch figure and left the rows a 0.6-inch sliver; the rows keep at least 1.5 in."""
    import numpy as np

    from lifelong.plots import retention_matrix_figure
    from probes.metrics import RetentionMatrix

    edits = 20
    values = np.ones((4, edits))
    m = RetentionMatrix(
        steps=np.array([5, 10, 15, 20]),
        edit_ids=[f"round-official-language-switzerland-german-{i}" for i in range(edits)],
        own_step=np.arange(1, edits + 1),
        values=values,
        own_score=np.ones(edits),
    )
    fig = retention_matrix_figure(m, "t")
    fig.canvas.draw()
    (ax,) = fig.axes
    assert ax.get_window_extent().height / fig.dpi >= 1.5


def test_figures_are_returned_without_touching_the_backend(two_runs):
    """The ``*_figure`` functions give matplotlib Figures (what a notebook displays inline) and leave the
    caller's backend and pyplot's figure list alone; the PNG writers save those same figures."""
    import matplotlib
    from matplotlib.figure import Figure

    from lifelong.plots import compare_figure, dashboard_figure, retention_figure, retention_matrix_figure
    from probes.metrics import retention_matrix

    backend = matplotlib.get_backend()
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    runs = [RunDir(p) for p in two_runs]
    dashboard = dashboard_figure(runs[1])
    retention = retention_figure(runs[1])
    matrix = retention_matrix_figure(retention_matrix(runs[1].results(), "es"), "t")
    compare = compare_figure(runs)
    for fig in (dashboard, retention, matrix, compare):
        assert isinstance(fig, Figure)
    assert len([a for a in dashboard.axes if a.axison]) == len(_panels(runs[1].results()))
    assert "Retention" in retention.axes[0].get_title()
    assert len(compare.axes[0].get_lines()) >= 2  # both runs drawn on the first panel
    assert matplotlib.get_backend() == backend and plt.get_fignums() == open_before


# -- intervals, ticks and the spare cell


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """One probed step; retention, perplexity and downstream: three panels in a 2 x 2 grid."""
    from streams import EditStream
    from tests.conftest import make_edits

    base = tmp_path_factory.mktemp("one")
    stream = base / "s.jsonl"
    EditStream(make_edits()).to_jsonl(stream)
    argv = ["replay", "--model", "tiny-llama", "--stream", str(stream), "--steps", "1", "--out", str(base / "r")]
    argv += ["--quiet", *[f"--set={k}={v}" for k, v in TINY_FT.items()]]
    argv += ["--probe", "perplexity:schedule=every:1,chunk_tokens=64,max_tokens=256,max_sentences=8"]
    argv += ["--probe", "downstream:schedule=every:1,tasks=sentiment+facts,items=4"]
    assert main(argv) == 0
    return RunDir(base / "r")


def _integer_ticks(ax) -> bool:
    left, right = ax.get_xlim()
    shown = [t for t in ax.get_xticks() if left <= t <= right]
    return bool(shown) and all(float(t).is_integer() for t in shown)


def test_a_single_probed_step_draws_an_interval_bar_and_no_cell_is_empty(one_step_run):
    from matplotlib.collections import LineCollection

    from lifelong.plots import dashboard_figure, retention_figure

    fig = dashboard_figure(one_step_run)
    assert len(fig.axes) == 4
    drawn = [ax for ax in fig.axes if ax.get_lines() or ax.collections or ax.texts]
    assert len(drawn) == 4, "the spare cell holds the headline figures"
    retention, headline = fig.axes[0], fig.axes[3]
    title = retention.get_title()
    assert "95% Wilson interval" in title and "band" not in title
    assert any(isinstance(c, LineCollection) for c in retention.collections), "an error bar at the one step"
    text = headline.texts[0].get_text()
    assert text.startswith("1 step done") and "ES at own step: " in text and "(Wilson)" in text
    assert "perplexity ratio (corpus) at step 1: " in text and "downstream drift" in text
    assert all(_integer_ticks(ax) for ax in fig.axes[:3])
    figure = retention_figure(one_step_run)
    assert _integer_ticks(figure.axes[0]), "no half-step ticks on retention.png"
    assert all("95% Wilson interval" in t.get_text() for t in figure.axes[0].get_legend().get_texts()[::2])


def test_perplexity_and_downstream_curves_carry_their_intervals(two_runs):
    from matplotlib.collections import PolyCollection

    from lifelong.plots import dashboard_figure, ratio_band

    run = RunDir(two_runs[0])
    fig = dashboard_figure(run)
    panels = {ax.get_title().split(" (")[0]: ax for ax in fig.axes}
    perplexity = panels["Perplexity ratio to θ0"]
    labels = [t.get_text() for t in perplexity.get_legend().get_texts()]
    assert any(label.startswith("corpus") and "95% t over chunks" in label for label in labels)
    assert any(label.startswith("sentence_mean") and "no interval" in label for label in labels)
    assert any(isinstance(c, PolyCollection) for c in perplexity.collections)
    results = run.results()
    rows = results.filter((pl.col("metric") == "ratio_low") & (pl.col("protocol") == "corpus")).sort("step")
    low, _ = ratio_band(results, rows["step"].to_numpy(), "corpus")
    assert low.tolist() == rows["value"].to_list()
    downstream = next(ax for title, ax in panels.items() if title.startswith("Downstream"))
    labels = [t.get_text() for t in downstream.get_legend().get_texts()]
    assert any(label.startswith("mean over tasks (95% Newcombe") for label in labels)
    assert any(isinstance(c, PolyCollection) for c in downstream.collections)
    assert all(_integer_ticks(ax) for ax in fig.axes if ax.axison)


def test_the_downstream_interval_is_newcombe_per_task_combined_by_mover():
    import math

    from lifelong.core.stats import newcombe_difference
    from lifelong.plots import downstream_band

    def row(step, task, value):
        return {"step": step, "probe": "downstream", "metric": "score", "protocol": task, "value": value}

    table = pl.DataFrame(
        [row(0, "sentiment", 0.5), row(0, "facts", 0.75), row(2, "sentiment", 0.25), row(2, "facts", 0.75)]
    )
    low, high = downstream_band(table, [0, 2], {"sentiment": 4, "facts": 4})
    (a_lo, a_hi), (b_lo, b_hi) = newcombe_difference(1, 4, 2, 4), newcombe_difference(3, 4, 3, 4)
    assert math.isnan(low[0]) and math.isnan(high[0])  # θ0 against itself: no difference to bound
    assert low[1] == pytest.approx((-0.25 - math.hypot(-0.25 - a_lo, 0 - b_lo)) / 2)
    assert high[1] == pytest.approx((-0.25 + math.hypot(a_hi + 0.25, b_hi - 0)) / 2)
    assert low[1] < -0.125 < high[1]
    # a task not scored 0/1 per item (ROUGE), or item counts unknown: no interval rather than a wrong one
    rouge = table.with_columns(pl.col("protocol").replace("facts", "samsum"))
    assert math.isnan(downstream_band(rouge, [2], {"sentiment": 4, "samsum": 4})[0][0])
    assert math.isnan(downstream_band(table, [2], None)[0][0])


def test_the_edit_quality_panel_names_the_intervals_it_draws(two_runs):
    """Wilson for 0/1 items, a bootstrap for graded ones: the title says which were drawn."""
    from lifelong.plots import _draw_quality, compare_figure, new_figure

    def quality(values: dict) -> pl.DataFrame:
        return pl.DataFrame(
            [
                {"step": 1, "probe": "edit_quality", "metric": metric, "protocol": protocol, "value": v}
                for (metric, protocol), items in values.items()
                for v in items
            ]
        )

    binary = {("efficacy", "es"): [0.0, 1.0, 1.0], ("generalization", "ps"): [1.0, 0.0], ("locality", "ns"): [1.0]}
    graded = {**binary, ("generalization", "ps"): [0.2, 0.7, 0.9]}
    for values, words in ((binary, "95% Wilson intervals"), (graded, "95% Wilson or bootstrap intervals")):
        ax = new_figure().subplots()
        _draw_quality(ax, [quality(values)], [[0]], ["a"], ["a"])
        assert ax.get_title() == f"Edit quality ({words})"
    fig = compare_figure([RunDir(p) for p in two_runs])
    assert any(ax.get_title() == "Edit quality (95% Wilson intervals)" for ax in fig.axes)  # 0/1 items here
