"""Pictures of a run. Each ``*_figure`` function returns a matplotlib ``Figure`` (built without pyplot,
so it leaves the caller's backend alone and displays inline in a notebook); the ``plot_*`` functions
write those figures as PNGs under ``DIR/plots/``."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import cast

import numpy as np

from lifelong.core.stats import Estimate, newcombe_difference, rate, sampled_wilson
from lifelong.run import RunDir
from probes import metric_table as mt
from probes.metrics import retained_fraction, retention_matrix
from streams.errors import UserError

BAND_ALPHA = 0.15


def rate_band(rows, population=None, kinds: set[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per point, the 95% interval of a rate over that point's items (NaN = not measured): Wilson for 0/1
    items, bootstrap otherwise; NaN where a point has no interval. ``population`` (per point, NaN where
    the items are all there are): the items are a sample of that many, so Wilson with the finite-population
    correction. ``kinds`` collects the intervals' kinds ('Wilson', 'bootstrap'), for the labels."""
    low, high = [], []
    for k, row in enumerate(rows):
        e = rate(row)
        if kinds is not None and e.method:
            kinds.add(INTERVAL_NAMES.get(e.method, e.method))
        if population is not None and e.n is not None and not np.isnan(population[k]) and e.method == "wilson":
            lo, hi = sampled_wilson(e.value * e.n, e.n, int(population[k]))
            e = Estimate(e.value, e.n, lo, hi)
        low.append(np.nan if e.low is None else e.low)
        high.append(np.nan if e.high is None else e.high)
    return np.array(low, dtype=float), np.array(high, dtype=float)


INTERVAL_NAMES = {"wilson": "Wilson", "bootstrap": "bootstrap", "t": "t"}


def _band(ax, x, rows, color=None, population=None) -> set[str]:
    """Shade the 95% interval of a curve that is a rate over items at each step (an error bar for a
    single step); the kinds of interval drawn."""
    kinds: set[str] = set()
    low, high = rate_band(rows, population, kinds)
    _shade(ax, x, low, high, color)
    return kinds


def _shade(ax, x, low, high, color=None) -> bool:
    """A 95% band between ``low`` and ``high`` over ``x``, or an error bar where one step has it (a band
    over one point draws nothing); False when there is no interval to draw."""
    x, low, high = (np.asarray(a, dtype=float) for a in (x, low, high))
    known = ~(np.isnan(low) | np.isnan(high))
    if not known.any():
        return False
    if known.sum() == 1:
        i = int(np.flatnonzero(known)[0])
        middle, half = (low[i] + high[i]) / 2, (high[i] - low[i]) / 2  # the bar spans [low, high]
        ax.errorbar([x[i]], [middle], yerr=[[half]], fmt="none", color=color, capsize=4)
    else:
        ax.fill_between(x, low, high, color=color, alpha=BAND_ALPHA, lw=0)
    return True


def interval_words(kinds: set[str], single: bool) -> str:
    """'95% Wilson bands', '95% bootstrap interval', '95% Wilson or bootstrap bands': what a title names."""
    what = " or ".join(sorted(kinds)) if kinds else "no"
    return f"95% {what} {'interval' if single else 'bands'}" if kinds else "no interval"


def integer_steps(ax) -> None:
    """Step ticks at whole steps only (matplotlib would put one at 0.5 on a short run)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


def wrapped(title: str, inches: float) -> str:
    """A figure title broken into lines that fit ``inches`` of width at the 11-point title font."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width=max(20, int(inches * 10.5))))


def new_figure(**kwargs):
    """A bare ``Figure``: not registered with pyplot, so nothing needs closing and no backend is chosen."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _title(run: RunDir) -> str:
    return f"{run.manifest()['identity']['editor']} on {run.manifest()['identity']['model']}"


def plot_run(run: RunDir, directory: Path | None = None) -> list[Path]:
    """The dashboard, the retention curve, the retention matrix and (with chain rows) the chains figure,
    as PNGs in ``directory`` (default: the run's ``plots/``)."""
    directory = Path(directory) if directory is not None else run.plots_dir
    directory.mkdir(parents=True, exist_ok=True)
    written = [plot_dashboard(run, directory)]
    written.append(_save(retention_figure(run), directory / "retention.png"))
    m = retention_matrix(run.results(), "es")
    if len(m.steps) and len(m.edit_ids):
        written.append(plot_retention_matrix(m, _title(run), directory / "retention_matrix.png"))
    chains = plot_chains(run, directory)
    if chains is not None:
        written.append(chains)
    return written


def retention_figure(run: RunDir):
    """Retained fraction over steps (shaded: 95% Wilson band over the edits at each step) and the
    efficacy at each edit's own step, for the ES and exact protocols."""
    results = run.results()
    fig = new_figure(figsize=(7, 4))
    ax = fig.subplots()
    for protocol, style in (("es", "-o"), ("exact", "--s")):
        m = retention_matrix(results, protocol)
        if len(m.steps):
            color = "C0" if protocol == "es" else "C1"
            (line,) = ax.plot(m.steps, retained_fraction(m.values), style, ms=3, color=color)
            kinds = _band(ax, m.steps, m.values, color, m.population)
            line.set_label(f"retained fraction ({protocol}, {interval_words(kinds, len(m.steps) == 1)})")
            own = [np.mean(m.own_score[m.own_step <= s]) for s in m.steps]
            ax.plot(m.steps, own, ":", color=color, label=f"efficacy at own step, mean so far ({protocol})")
    ax.set_xlabel("stream step")
    _shared_steps([ax], int(cast(int, results["step"].max())))  # whole steps only, from θ0
    ax.set_ylabel("fraction of edits so far")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"Retention — {_title(run)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


MATRIX_COLUMNS = 60  # more edits than this are binned: each column then shows a bin's share of edits holding


def _bin_axis(values: np.ndarray, bins: int, axis: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``values`` with ``axis`` cut into ``bins`` runs of consecutive entries when longer, each the mean
    of its measured (non-NaN) cells, NaN where none was; and each bin's (first, last) index."""
    n = values.shape[axis]
    if n <= bins:
        return values, [(i, i) for i in range(n)]
    edges = np.linspace(0, n, bins + 1).round().astype(int)
    spans = [(int(a), int(b) - 1) for a, b in zip(edges[:-1], edges[1:])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a bin with nothing measured: NaN
        parts = [np.nanmean(np.take(values, range(a, b + 1), axis=axis), axis=axis) for a, b in spans]
    return np.stack(parts, axis=axis), spans


def matrix_cells(values: np.ndarray, columns: int = MATRIX_COLUMNS) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The retention matrix as painted: one row per probed step, one column per edit, or per bin of
    consecutive edits (their mean, NaN where none was made yet) when there are more than ``columns``;
    and each column's (first, last) edit index."""
    return _bin_axis(values, columns, axis=1)


MATRIX_ROWS = 60  # more probed steps than this are binned too (a 10,000-step run probed every 10 has 1,000)


def bin_rows(cells: np.ndarray, rows: int = MATRIX_ROWS) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``cells`` with its rows (probed steps) binned when there are more than ``rows``: each bin is the
    mean of its measured cells (NaN where none was measured); and each row's (first, last) index."""
    return _bin_axis(cells, rows, axis=0)


def plot_retention_matrix(m, title: str, path: Path) -> Path:
    """:func:`retention_matrix_figure` written to ``path``."""
    return _save(retention_matrix_figure(m, title), path)


def retention_matrix_figure(m, title: str):
    """A[t, i]: a row per probed step only (steps between probes are not painted: nothing was measured
    there), a column per edit labelled by its id (binned beyond MATRIX_COLUMNS edits), blank where
    edit i was not made yet; two colours for held / lost, or a share-held scale for bins."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    cells, spans = matrix_cells(m.values)
    cells, row_spans = bin_rows(cells)
    rows_binned = len(row_spans) < len(m.steps)
    binned = len(spans) < len(m.edit_ids) or rows_binned
    columns_binned = len(spans) < len(m.edit_ids)
    every = max(1, len(spans) // 30)
    ticks = list(range(0, len(spans), every))
    labels = [m.edit_ids[spans[j][0]] if not columns_binned else f"{spans[j][0] + 1}-{spans[j][1] + 1}" for j in ticks]
    # Height: the rows (at least 1.5 in, so a few probed steps stay visible) plus the rotated edit ids
    # under them (~0.06 in per character at 6 pt), which otherwise squeeze the rows to slivers.
    label_height = 0.06 * max((len(label) for label in labels), default=0)
    height = max(1.5, 0.25 * len(row_spans)) + label_height + 1.2
    fig = new_figure(figsize=(max(7.0, 0.18 * len(spans) + 2), height))
    ax = fig.subplots()
    masked = np.ma.masked_invalid(cells)
    if binned:
        mesh = ax.imshow(masked, aspect="auto", interpolation="nearest", cmap=colormaps["RdYlGn"], vmin=0, vmax=1)
        fig.colorbar(mesh, ax=ax, label="share of the bin's edits holding")
    else:
        ax.imshow(
            masked, aspect="auto", interpolation="nearest", cmap=ListedColormap(["#d7301f", "#1a9850"]), vmin=0, vmax=1
        )
        ax.legend(
            handles=[
                Patch(color="#1a9850", label="holds"),
                Patch(color="#d7301f", label="lost"),
                Patch(
                    facecolor="white",
                    edgecolor="#999999",
                    label="not measured: not made\nyet, superseded" + (",\nor not sampled" if m.sampled.any() else ""),
                ),
            ],
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
        )
    every_row = max(1, len(row_spans) // 30)  # at most ~30 labels on either axis
    row_ticks = list(range(0, len(row_spans), every_row))
    first, last = ([m.steps[row_spans[j][k]] for j in row_ticks] for k in (0, 1))
    ax.set_yticks(row_ticks, [f"{a}" if not rows_binned else f"{a}-{b}" for a, b in zip(first, last)], fontsize=7)
    ax.set_xticks(ticks, labels, rotation=90, fontsize=6)
    ax.set_xlabel("edit id, in stream order" if not columns_binned else "edits (by position in the stream), binned")
    ax.set_ylabel("probed step" if not rows_binned else "probed steps, binned")
    ax.set_title(f"Retention matrix A[t, i] (ES), rows: probed steps only — {title}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_chains(run: RunDir, directory: Path | None = None) -> Path | None:
    """:func:`chains_figure` written as ``chains.png``; None without chain rows."""
    fig = chains_figure(run)
    return None if fig is None else _save(fig, Path(directory or run.plots_dir) / "chains.png")


def chains_figure(run: RunDir):
    """Distortion (and conflict magnitude) over steps from the chain probe's rows; None without them.

    Dots: each chain at its completion step; solid line: running mean of those; dashed line: the mean
    over the chains re-measured at a step (``remeasure``), which shows whether distortion keeps growing.
    """
    import polars as pl

    rows = run.results().filter(pl.col("probe") == mt.CHAINS)
    panels = [
        (m, label)
        for m, label in (
            (mt.DISTORTION_JS, "distortion D (JS, nats)"),
            (mt.CONFLICT_MAGNITUDE, "conflict magnitude CM"),
        )
        if rows.filter(pl.col("metric") == m).height
    ]
    if not panels:
        return None
    ident = run.manifest()["identity"]
    fig = new_figure(figsize=(6.5 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels):
        done = rows.filter((pl.col("metric") == metric) & pl.col("protocol").str.starts_with("completion")).sort("step")
        steps, values = done["step"].to_numpy(), done["value"].to_numpy()
        ax.plot(steps, values, "o", ms=3, alpha=0.5, label="each chain, at completion")
        ax.plot(steps, np.cumsum(values) / np.arange(1, len(values) + 1), "-", label="running mean at completion")
        later = (
            rows.filter((pl.col("metric") == metric) & pl.col("protocol").str.starts_with("later"))
            .group_by("step")
            .agg(pl.col("value").mean())
            .sort("step")
        )
        if later.height:
            ax.plot(later["step"], later["value"], "--s", ms=3, label="mean of re-measured chains")
        ax.set_xlabel("stream step")
        integer_steps(ax)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Chains — {ident['editor']} on {ident['model']}, stream {ident['stream']}", fontsize=10)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # cleaned up by a resume if left behind
    fig.savefig(tmp, dpi=120, format="png")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------- dashboard and comparison


def _series(results, probe: str, metric: str, protocol: str | None = None, edit_id: str | None = None):
    """(steps, values) of one metric, averaged over edits/items at each step."""
    import polars as pl

    rows = results.filter((pl.col("probe") == probe) & (pl.col("metric") == metric))
    if protocol is not None:
        rows = rows.filter(pl.col("protocol") == protocol)
    if edit_id is not None:
        rows = rows.filter(pl.col("edit_id") == edit_id)
    if not rows.height:
        return np.array([]), np.array([])
    agg = rows.group_by("step").agg(pl.col("value").mean()).sort("step")
    return agg["step"].to_numpy(), agg["value"].to_numpy()


def ratio_band(results, steps, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """The perplexity ratio's 95% interval at ``steps`` (its ``ratio_low``/``ratio_high`` rows: a t
    interval over the corpus's chunks), NaN where a step has none (θ0, the sentence_mean variant)."""
    bounds = []
    for metric in (mt.RATIO_LOW, mt.RATIO_HIGH):
        at, values = _series(results, "perplexity", metric, protocol)
        known = dict(zip(at.tolist(), values.tolist()))
        bounds.append(np.array([known.get(int(step), np.nan) for step in steps], dtype=float))
    return bounds[0], bounds[1]


@functools.lru_cache(maxsize=64)
def scored_zero_one(task: str) -> bool:
    """Whether a downstream task scores each item 0 or 1 (choices, exact match, a number), so its score
    is a proportion over its items; False for ROUGE and entity F1, and for a task whose file is absent."""
    from probes.tasks import Choice, load_task

    try:
        first = load_task(task)[:1]
    except UserError:
        return False
    return bool(first) and (isinstance(first[0], Choice) or getattr(first[0], "metric", "") in ("em", "number"))


def downstream_band(results, steps, items: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """The 95% interval of the mean over tasks of score − score at θ0, at ``steps``: per task Newcombe's
    interval of the difference of two proportions over its items, taken as unpaired (the same items at
    both steps make the true interval narrower: this one is conservative), the tasks combined by MOVER
    (independent tasks). NaN at θ0 (no difference) and wherever a task is not scored 0/1 or its item
    count is unknown (a run begun before the reference kept it)."""
    import polars as pl

    nan = np.full(len(steps), np.nan)
    scores = results.filter((pl.col("probe") == "downstream") & (pl.col("metric") == "score"))
    tasks = sorted(set(scores["protocol"]) - {"mean"})
    tasks = [t for t in tasks if t.split(";", 1)[0] != "mean"]
    if (
        not tasks
        or not items
        or not all(items.get(t.split(";", 1)[0]) and scored_zero_one(t.split(";", 1)[0]) for t in tasks)
    ):
        return nan, nan.copy()
    per_task = {t: dict(zip(*_series(results, "downstream", "score", t))) for t in tasks}
    low, high = nan.copy(), nan.copy()
    for j, step in enumerate(int(x) for x in steps):
        if step == 0 or not all(step in per_task[t] and 0 in per_task[t] for t in tasks):
            continue
        total, below, above = 0.0, 0.0, 0.0
        for t in tasks:
            n = int(items[t.split(";", 1)[0]])
            now, base = round(per_task[t][step] * n), round(per_task[t][0] * n)
            lo, hi = newcombe_difference(now, n, base, n)
            d = (now - base) / n
            total, below, above = total + d, below + (d - lo) ** 2, above + (hi - d) ** 2
        k = len(tasks)
        low[j] = max(-1.0, (total - np.sqrt(below)) / k)
        high[j] = min(1.0, (total + np.sqrt(above)) / k)
    return low, high


def _panels(results, outside: dict | None = None) -> list[str]:
    """Which dashboard panels this run has data for, in a fixed order; then one per probe not built in
    (``outside``: name -> class, from :func:`lifelong.summary.outside_probes`)."""
    probes = set(results["probe"].unique())
    has_js = mt.DISTORTION_JS in set(results["metric"].unique())
    return [
        name
        for name, present in (
            ("retention", "retention" in probes),
            ("perplexity", "perplexity" in probes),
            ("downstream", "downstream" in probes),
            ("distortion", has_js),
            ("weight_drift", "weight_drift" in probes),
        )
        if present
    ] + [name for name in outside or {} if name in probes]


def _draw_panel(
    ax,
    name: str,
    results,
    color=None,
    label: str | None = None,
    detail: bool = True,
    threshold: float = 2.0,
    items: dict | None = None,
    outside: dict | None = None,
    warn_relative: float | None = None,
) -> None:
    """One panel of one run; ``detail`` draws every protocol/task (dashboard), else the headline line only;
    a probe not built in draws its own (``outside``: name -> class)."""
    one = lambda protocol: protocol if detail else label  # noqa: E731  (legend entry of one line)
    if outside and name in outside:
        import polars as pl

        outside[name].plot_panel(ax, results.filter(pl.col("probe") == name), color=color, label=label)
    elif name == "retention":
        kinds: set[str] = set()
        single = True
        for protocol, style in (("es", "-"), ("exact", "--")):
            m = retention_matrix(results, protocol)
            if len(m.steps) and (detail or protocol == "es"):
                (line,) = ax.plot(
                    m.steps, retained_fraction(m.values), style, marker="o", ms=3, color=color, label=one(protocol)
                )
                kinds |= _band(ax, m.steps, m.values, line.get_color())
                single = single and len(m.steps) == 1
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("retained fraction of edits so far")
        words = interval_words(kinds, single)
        ax.set_title(
            f"Retention (ES: new target beats old; exact: greedy match; {words})"
            if detail
            else f"Retention (ES; {words})",
            fontsize=9,
        )
    elif name == "perplexity":
        for protocol, style in (("corpus", "-"), ("sentence_mean", "--")):
            steps, values = _series(results, "perplexity", "ratio", protocol)
            if len(steps) and (detail or protocol == "corpus"):
                (line,) = ax.plot(steps, values, style, marker="o", ms=3, color=color)
                low, high = ratio_band(results, steps, protocol)
                shaded = _shade(ax, steps, low, high, line.get_color())
                # only the corpus variant's rows carry an interval (chunks as clusters)
                band = "95% t over chunks" if shaded else "no interval"
                line.set_label(f"{one(protocol)} (last {values[-1]:.3g}x; {band})")
        shown = f"collapse threshold ({threshold:g}x)"
        ax.axhline(
            threshold,
            color="crimson",
            lw=0.8,
            ls=":",  # one legend entry, however many runs
            label="_nolegend_" if shown in ax.get_legend_handles_labels()[1] else shown,
        )
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_ylabel("perplexity / perplexity at θ0")
        ax.set_title("Perplexity ratio to θ0" + (" (corpus, sentence_mean)" if detail else " (corpus)"), fontsize=9)
        top = max([float(np.nanmax(_series(results, "perplexity", "ratio")[1]))] + [threshold])
        if top > 20:
            ax.set_yscale("log")
    elif name == "downstream":
        import polars as pl

        if detail:
            tasks = sorted(
                set(results.filter((pl.col("probe") == "downstream") & (pl.col("metric") == "diff"))["protocol"])
                - {"mean"}
            )
            markers = "s^vDP*Xph<>"
            for i, task in enumerate(tasks):
                steps, values = _series(results, "downstream", "diff", task)
                # Scores move in steps of 1/items, so tasks often coincide: offset each a little.
                offset = (i - (len(tasks) - 1) / 2) * 0.12 * max(1, float(results["step"].max()) / 20)
                ax.plot(
                    steps + offset,
                    values,
                    "-",
                    marker=markers[i % len(markers)],
                    ms=4,
                    lw=0.9,
                    color=f"C{(i + 2) % 10}",
                    alpha=0.85,
                    label=task,
                )
        steps, values = _series(results, "downstream", "diff", "mean")
        (line,) = ax.plot(steps, values, "-", marker="o", ms=4, lw=2.2, color=color or "black")
        low, high = downstream_band(results, steps, items)
        shaded = _shade(ax, steps, low, high, line.get_color())
        band = "95% Newcombe per task, unpaired (conservative), MOVER over tasks" if shaded else "no interval"
        if detail or (label and not label.startswith("_")):
            line.set_label(f"{'mean over tasks' if detail else label} ({band})")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_ylabel("score − score at θ0")
        sizes = sorted(set((items or {}).values()))
        grain = f"; {sizes[0]} items per task: one item = {1 / sizes[0]:.3g}" if len(sizes) == 1 and sizes[0] else ""
        ax.set_title(f"Downstream drift (task score minus θ0{grain})", fontsize=9)
    elif name == "distortion":
        import polars as pl

        probe = _chain_probe(results)
        protocols = sorted(
            set(results.filter((pl.col("probe") == probe) & (pl.col("metric") == mt.DISTORTION_JS))["protocol"]),
            key=lambda p: (not p.startswith("completion"), p),
        )
        for j, protocol in enumerate(protocols if detail else protocols[:1]):
            steps, values = _series(results, probe, mt.DISTORTION_JS, protocol)
            ax.plot(
                steps,
                values,
                "-" if j == 0 else "--",
                marker="o",
                ms=3,
                color=color,
                label=f"{protocol} (mean over chains)" if detail else f"{label} ({protocol})",
            )
        ax.set_ylabel("JS divergence (nats)")
        ax.set_title("Knowledge distortion D_JS after round/conflict chains", fontsize=9)
    elif name == "weight_drift":
        steps, values = _series(results, mt.WEIGHT_DRIFT, mt.RELATIVE, "sum")
        if detail and warn_relative is not None and len(steps):  # the collapse warning's measure and threshold
            ax.plot(steps, values, "-", marker="o", ms=3, color=color or "C0", label="summed over the edited matrices")
            largest = _series(results, mt.WEIGHT_DRIFT, mt.RELATIVE, "max")
            ax.plot(*largest, ":", marker="o", ms=3, color=color or "C0", label="largest matrix")
            ax.axhline(warn_relative, color="darkorange", ls=":", lw=1.2, label=f"warning ({warn_relative:g})")
            ax.set_ylabel(r"$\|W_t - W_0\|_F / \|W_0\|_F$")
            ax.set_title("Weight drift from θ0 (relative update)", fontsize=9)
        else:
            steps, values = _series(results, "weight_drift", "frobenius", "total")
            ax.plot(steps, values, "-", color=color, label=label or "all edited matrices")
            ax.set_ylabel(r"$\|W_t - W_0\|_F$")
            ax.set_title("Weight drift from θ0", fontsize=9)
    ax.set_xlabel("stream step")
    ax.grid(alpha=0.3)


def _shared_steps(axes, last_step: int) -> None:
    """Every panel on the same integer step axis, from θ0 (step 0) to the last step."""
    for ax in axes:
        ax.set_xlim(-0.03 * max(last_step, 1), last_step * 1.03 + 0.1)
        integer_steps(ax)


def _chain_probe(results) -> str:
    import polars as pl

    probes = results.filter(pl.col("metric") == mt.DISTORTION_JS)["probe"].unique().to_list()
    return probes[0] if probes else mt.CHAINS


def _mark_collapse(ax, step: int | None, color="crimson", label: str | None = "collapse step") -> None:
    if step is not None:
        ax.axvline(step, color=color, ls="--", lw=1.2, label=label)


def plot_dashboard(run: RunDir, directory: Path | None = None) -> Path:
    """:func:`dashboard_figure` written as ``dashboard.png`` in ``directory`` (default: the run's ``plots/``)."""
    return _save(dashboard_figure(run), Path(directory or run.plots_dir) / "dashboard.png")


def dashboard_figure(run: RunDir):
    """Every general-ability panel this run has, the collapse step marked on each, and a panel for each
    probe not built in."""
    from lifelong.summary import outside_probes
    from probes.perplexity import collapse_step
    from probes.weight_drift import warning_step

    results = run.results()
    ident = run.manifest()["identity"]
    outside = outside_probes(run)
    panels = _panels(results, outside)
    threshold = (run.load_reference() or {}).get("perplexity", {}).get("threshold", 2.0)
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig = new_figure(figsize=(6.2 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    items = (run.load_reference() or {}).get("downstream", {}).get("items")
    collapse = collapse_step(results)
    warning = warning_step(results)
    warn_relative = (run.load_reference() or {}).get(mt.WEIGHT_DRIFT, {}).get("warn_relative")
    for ax, name in zip(axes.flat, panels):
        _draw_panel(ax, name, results, threshold=threshold, items=items, outside=outside, warn_relative=warn_relative)
        _mark_collapse(ax, collapse, label=f"collapse step ({collapse})")
        _mark_collapse(ax, warning, color="darkorange", label=f"collapse warning ({warning})")
        ax.legend(fontsize=7, loc="best")
    _shared_steps(list(axes.flat)[: len(panels)], int(cast(int, results["step"].max())))
    steps = max(run.completed_step(), 0)
    spare = list(axes.flat)[len(panels) :]
    for ax in spare:
        ax.axis("off")
    if spare:  # the grid's last cell: the run's headline figures rather than a blank
        _headline_panel(spare[0], results, steps, items, collapse)
    note = (
        f"perplexity collapse at step {collapse}"
        if collapse is not None
        else ("no perplexity collapse" if "perplexity" in panels else "perplexity not probed")
    )
    if warning is not None:
        note += f"; collapse warning (weight drift) at step {warning}"
    title = f"{ident['editor']} on {ident['model']}, stream {Path(str(ident['stream'])).name}, {steps} steps — {note}"
    fig.suptitle(wrapped(title, 6.2 * cols), fontsize=11)
    fig.tight_layout()
    return fig


def headline_lines(results, steps: int, items: dict | None, collapse: int | None) -> list[str]:
    """The run's headline figures, each with its 95% interval and n where it has one, for the dashboard's
    spare cell: edit quality at each edit's own step, then the last probed value of each curve."""
    from lifelong.core.stats import format_estimate
    from lifelong.summary import item_values

    lines = [f"{steps} step{'s' if steps != 1 else ''} done"]
    for metric, protocol, short in QUALITY_BARS:
        values = item_values(results, "edit_quality", metric, protocol)
        if len(values):
            e = rate(values)
            lines.append(f"{short} at own step: {format_estimate(e)} ({INTERVAL_NAMES.get(e.method, 'no interval')})")
    m = retention_matrix(results, "es")
    if len(m.steps):
        low, high = rate_band(m.values[-1:], m.population[-1:] if m.population is not None else None)
        e = rate(m.values[-1])
        e = Estimate(e.value, e.n, None if np.isnan(low[0]) else low[0], None if np.isnan(high[0]) else high[0])
        lines.append(f"retained fraction (ES) at step {m.steps[-1]}: {format_estimate(e)}")
    at, ratio = _series(results, "perplexity", "ratio", "corpus")
    if len(at):
        e = _last_estimate(ratio, *ratio_band(results, at[-1:], "corpus"))
        lines.append(f"perplexity ratio (corpus) at step {at[-1]}: {format_estimate(e)}")
        lines.append(f"collapse step: {collapse}" if collapse is not None else "no perplexity collapse")
    at, diff = _series(results, "downstream", "diff", "mean")
    if len(at):
        e = _last_estimate(diff, *downstream_band(results, at[-1:], items))
        lines.append(f"downstream drift (mean over tasks) at step {at[-1]}: {format_estimate(e)}")
    at, drift = _series(results, "weight_drift", "frobenius", "total")
    if len(at):
        lines.append(f"weight drift ‖W_t − W_0‖_F at step {at[-1]}: {drift[-1]:.4g}")
    return lines


def _last_estimate(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> Estimate:
    """The last value of a curve with its interval (``low``/``high``: one entry each, NaN for none)."""
    known = not (np.isnan(low[0]) or np.isnan(high[0]))
    return Estimate(float(values[-1]), None, float(low[0]) if known else None, float(high[0]) if known else None)


def _headline_panel(ax, results, steps: int, items: dict | None, collapse: int | None) -> None:
    ax.set_title("Headline figures (95% intervals)", fontsize=9)
    text = "\n".join(headline_lines(results, steps, items, collapse))
    ax.text(0.02, 0.95, text, transform=ax.transAxes, va="top", ha="left", fontsize=8, family="monospace", wrap=True)


def run_labels(runs: list[RunDir]) -> list[str]:
    """Editor names, with the directory name added where two runs share an editor."""
    editors = [r.manifest()["identity"]["editor"] for r in runs]
    return [e if editors.count(e) == 1 else f"{e} ({r.path.name})" for e, r in zip(editors, runs)]


QUALITY_BARS = (("efficacy", "es", "ES"), ("generalization", "ps", "PS"), ("locality", "ns", "NS"))


def _draw_quality(ax, tables, groups, names, single) -> None:
    """Edit quality at each edit's own step, one bar group per measure and one bar per configuration
    (its seeds' items pooled), with a 95% interval (Wilson for 0/1 items, else a bootstrap; the title
    names those drawn)."""
    from lifelong.summary import item_values

    width = 0.8 / len(groups)
    kinds: set[str] = set()
    for j, group in enumerate(groups):
        means, lows, highs = [], [], []
        for metric, protocol, _ in QUALITY_BARS:
            values = np.concatenate([item_values(tables[i], "edit_quality", metric, protocol) for i in group])
            e = rate(values)
            if e.method:
                kinds.add(INTERVAL_NAMES.get(e.method, e.method))
            means.append(e.value)
            lows.append(e.value - (e.low if e.low is not None else e.value))
            highs.append((e.high if e.high is not None else e.value) - e.value)
        x = np.arange(len(QUALITY_BARS)) + (j - (len(groups) - 1) / 2) * width
        label = names[j] if len(group) > 1 else single[group[0]]
        ax.bar(x, means, width, yerr=[lows, highs], capsize=2, color=f"C{j % 10}", label=label)
    ax.set_xticks(range(len(QUALITY_BARS)), [label for *_, label in QUALITY_BARS])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of prompts, at the edit's own step")
    # named after the intervals drawn: Wilson for 0/1 items, a bootstrap for graded ones (stats.rate)
    words = f"95% {' or '.join(sorted(kinds))} intervals" if kinds else "no interval"
    ax.set_title(f"Edit quality ({words})", fontsize=9)
    ax.legend(fontsize=7, loc="best")


def plot_compare(runs: list[RunDir], path: Path) -> Path:
    """:func:`compare_figure` written to ``path``."""
    return _save(compare_figure(runs), Path(path))


def compare_figure(runs: list[RunDir]):
    """Several runs overlaid, one colour per configuration (seeds of one configuration share it and its
    legend entry), one panel per measure any of them has."""
    from lifelong.summary import configuration_labels, configurations
    from probes.perplexity import collapse_step

    tables = [r.results() for r in runs]
    groups = configurations(runs)
    group_of = {i: j for j, g in enumerate(groups) for i in g}
    names = configuration_labels(runs, groups)
    single = run_labels(runs)
    labels = [single[i] if len(groups[group_of[i]]) == 1 else names[group_of[i]] for i in range(len(runs))]
    panels = [
        p
        for p in ("retention", "perplexity", "downstream", "distortion", "weight_drift")
        if any(p in _panels(t) for t in tables)
    ]
    if not panels:
        raise UserError("none of the runs has rows to compare")
    quality = any((t["probe"] == "edit_quality").any() for t in tables)
    cols = 2 if len(panels) + quality > 1 else 1
    rows = (len(panels) + quality + cols - 1) // cols
    fig = new_figure(figsize=(6.2 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    if quality:
        _draw_quality(axes.flat[len(panels)], tables, groups, names, single)
    for ax, name in zip(axes.flat, panels):
        for i, (results, label, run) in enumerate(zip(tables, labels, runs)):
            if name in _panels(results):
                threshold = (run.load_reference() or {}).get("perplexity", {}).get("threshold", 2.0)
                first = groups[group_of[i]][0] == i  # one legend entry per configuration
                color = f"C{group_of[i] % 10}"
                _draw_panel(
                    ax,
                    name,
                    results,
                    color=color,
                    label=label if first else "_nolegend_",
                    detail=False,
                    threshold=threshold,
                    items=(run.load_reference() or {}).get("downstream", {}).get("items"),
                )
                _mark_collapse(
                    ax, collapse_step(results), color=color, label=f"{label}: collapse" if first else "_nolegend_"
                )
        ax.legend(fontsize=7, loc="best")
    _shared_steps(list(axes.flat)[: len(panels)], max(int(cast(int, t["step"].max())) for t in tables))
    for ax in list(axes.flat)[len(panels) + quality :]:
        ax.axis("off")
    streams = {str(r.manifest()["identity"].get("stream_hash")) for r in runs}
    models = list(dict.fromkeys(str(r.manifest()["identity"]["model"]) for r in runs))
    note = "" if len(streams) == 1 else " (different streams!)"
    on = models[0] if len(models) == 1 else f"{' / '.join(models)} (different models!)"
    fig.suptitle(wrapped(f"{' vs '.join(dict.fromkeys(labels))} on {on}{note}", 6.2 * cols), fontsize=11)
    fig.tight_layout()
    return fig
