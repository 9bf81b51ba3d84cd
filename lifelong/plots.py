"""Pictures of a run, written as PNGs under ``DIR/plots/``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lifelong.run import RunDir
from probes.metrics import retained_fraction, retention_matrix


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_run(run: RunDir) -> list[Path]:
    """Retained fraction over steps, and the retention matrix as a heat map."""
    plt = _pyplot()
    results = run.results()
    title = f"{run.manifest()['identity']['editor']} on {run.manifest()['identity']['model']}"
    run.plots_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for protocol, style in (("es", "-o"), ("exact", "--s")):
        m = retention_matrix(results, protocol)
        if len(m.steps):
            ax.plot(m.steps, retained_fraction(m.values), style, ms=3, label=f"retained fraction ({protocol})")
            own = [np.mean(m.own_score[m.own_step <= s]) for s in m.steps]
            ax.plot(m.steps, own, ":", color="C0" if protocol == "es" else "C1",
                    label=f"efficacy at own step, mean so far ({protocol})")
    ax.set_xlabel("stream step")
    ax.set_ylabel("fraction of edits so far")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"Retention — {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    written.append(_save(fig, run.plots_dir / "retention.png"))
    plt.close(fig)

    m = retention_matrix(results, "es")
    if len(m.steps) and len(m.edit_ids):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#eeeeee")
        # Row k covers the steps since the previous probe, so the y axis is in stream steps.
        y_edges = np.r_[0, m.steps] + 0.5
        x_edges = np.arange(len(m.edit_ids) + 1) + 0.5
        mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(m.values), cmap=cmap, vmin=0, vmax=1)
        ax.set_xlabel("edit (in stream order)")
        ax.set_ylabel("stream step (probed at row tops)")
        ax.set_title(f"Retention matrix A[t, i] (ES; grey: not yet made) — {title}", fontsize=9)
        fig.colorbar(mesh, ax=ax, label="edit i holds after step t")
        fig.tight_layout()
        written.append(_save(fig, run.plots_dir / "retention_matrix.png"))
        plt.close(fig)
    chains = plot_chains(run)
    if chains is not None:
        written.append(chains)
    return written


def plot_chains(run: RunDir) -> Path | None:
    """Distortion (and conflict magnitude) over steps from the chain probe's rows; None without them.

    Dots: each chain at its completion step; solid line: running mean of those; dashed line: the mean
    over the chains re-measured at a step (``remeasure``), which shows whether distortion keeps growing.
    """
    import polars as pl

    rows = run.results().filter(pl.col("probe") == "chains")
    panels = [(m, label) for m, label in (("distortion_js", "distortion D (JS, nats)"),
                                          ("conflict_magnitude", "conflict magnitude CM"))
              if rows.filter(pl.col("metric") == m).height]
    if not panels:
        return None
    plt = _pyplot()
    ident = run.manifest()["identity"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels):
        done = rows.filter((pl.col("metric") == metric) & (pl.col("protocol") == "completion")).sort("step")
        steps, values = done["step"].to_numpy(), done["value"].to_numpy()
        ax.plot(steps, values, "o", ms=3, alpha=0.5, label="each chain, at completion")
        ax.plot(steps, np.cumsum(values) / np.arange(1, len(values) + 1), "-", label="running mean at completion")
        later = (rows.filter((pl.col("metric") == metric) & (pl.col("protocol") == "later"))
                 .group_by("step").agg(pl.col("value").mean()).sort("step"))
        if later.height:
            ax.plot(later["step"], later["value"], "--s", ms=3, label="mean of re-measured chains")
        ax.set_xlabel("stream step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Chains — {ident['editor']} on {ident['model']}, stream {ident['stream']}", fontsize=10)
    fig.tight_layout()
    path = _save(fig, run.plots_dir / "chains.png")
    plt.close(fig)
    return path


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    return path
