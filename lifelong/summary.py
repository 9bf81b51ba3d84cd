"""The run summary table printed by ``lifelong show`` and at the end of ``lifelong replay``."""

from __future__ import annotations

import math

import polars as pl

from lifelong.run import RunDir
from probes.metrics import retention_summary


def _mean(results: pl.DataFrame, probe: str, metric: str, protocol: str, own_step: bool = True) -> float:
    rows = results.filter(
        (pl.col("probe") == probe) & (pl.col("metric") == metric) & (pl.col("protocol") == protocol)
        & ((pl.col("step") > 0) if own_step else (pl.col("step") == 0))
    )
    return float(rows["value"].mean()) if rows.height else float("nan")


CHAIN_LINES = (
    ("round success (Succ)", "round_success"),
    ("distortion D (JS, nats)", "distortion_js"),
    ("distortion (Pitfalls variant)", "distortion_js_pitfalls"),
    ("ignore rate (IR)", "ignore_rate"),
    ("failure rate (FR)", "failure_rate"),
    ("conflict score explicit (CS)", "conflict_score_explicit"),
    ("conflict score implicit (CS)", "conflict_score_implicit"),
    ("conflict magnitude (CM)", "conflict_magnitude"),
    ("tied fact damage (TFD)", "tied_fact_damage"),
)


def chain_lines(results: pl.DataFrame) -> list[tuple[str, str, float]]:
    """Means of the chain probe's rows over chains (METRICS.md §4): at completion, and at the last
    re-measurement step when there is one; FR is the run-level value at the last such step. The
    protocol column keeps the probability kind (``completion;p=meantok``; ``later`` shown as ``last``)."""
    from probes.chains import protocol_when

    rows = results.filter(pl.col("probe") == "chains")
    lines = []
    for when in ("completion", "later"):
        for protocol in sorted(p for p in set(rows["protocol"]) if protocol_when(p) == when):
            sel = rows.filter(pl.col("protocol") == protocol)
            if when == "later":
                sel = sel.filter(pl.col("step") == sel["step"].max())
            shown = protocol if when == "completion" else "last" + protocol[len("later"):]
            for label, metric in CHAIN_LINES:
                m = sel.filter(pl.col("metric") == metric)
                if metric == "failure_rate":
                    m = m.sort("step").tail(1)
                if m.height:
                    lines.append((label, shown, float(m["value"].mean())))
    return lines


def summary_table(run: RunDir) -> pl.DataFrame:
    """One row per headline figure: (measure, protocol, value)."""
    results = run.results()
    progress = run.progress()
    table: list[tuple[str, str, float]] = [
        ("pre-edit efficacy (θ0)", "es", _mean(results, "edit_quality", "efficacy", "es", own_step=False)),
        ("efficacy at own step", "es", _mean(results, "edit_quality", "efficacy", "es")),
        ("efficacy at own step", "exact", _mean(results, "edit_quality", "efficacy", "exact")),
        ("generalization (paraphrases)", "ps", _mean(results, "edit_quality", "generalization", "ps")),
        ("generalization (paraphrases)", "exact", _mean(results, "edit_quality", "generalization", "exact")),
        ("locality (neighborhood)", "ns", _mean(results, "edit_quality", "locality", "ns")),
        ("locality (neighborhood)", "unchanged", _mean(results, "edit_quality", "locality", "unchanged")),
    ]
    for protocol in ("es", "exact"):
        ret = retention_summary(results, protocol)
        if ret:
            table += [
                ("retained fraction at last step", protocol, ret["retained_fraction"]),
                ("retainability", protocol, ret["retainability"]),
                ("edits forgotten (count)", protocol, ret["forgotten"]),
                ("median steps to forget", protocol, ret["median_steps_to_forget"]),
            ]
            if ret["superseded"]:
                table.append(("edits superseded by a later edit (count)", protocol, ret["superseded"]))
    table += chain_lines(results)
    table += general_ability_lines(results, run.load_reference() or {})
    seconds = [v for k, v in progress["seconds"].items() if int(k) > 0]
    if seconds:
        table += [
            ("seconds per step: edit", "wall", sum(s["edit"] for s in seconds) / len(seconds)),
            ("seconds per step: probes", "wall", sum(s["probe"] for s in seconds) / len(seconds)),
        ]
    return pl.DataFrame(table, schema={"measure": pl.String, "protocol": pl.String, "value": pl.Float64},
                        orient="row")


def _last(results: pl.DataFrame, probe: str, metric: str, protocol: str) -> float:
    rows = results.filter((pl.col("probe") == probe) & (pl.col("metric") == metric) & (pl.col("protocol") == protocol))
    return float(rows.sort("step")["value"][-1]) if rows.height else float("nan")


def general_ability_lines(results: pl.DataFrame, reference: dict | None = None) -> list[tuple[str, str, float]]:
    """Perplexity ratio and collapse step, downstream drift and weight drift, when those probes ran."""
    from probes.perplexity import PROTOCOLS, collapse_step

    lines: list[tuple[str, str, float]] = []
    probes = set(results["probe"].unique())
    if "perplexity" in probes:
        ppl = results.filter(pl.col("probe") == "perplexity")
        threshold = (reference or {}).get("perplexity", {}).get("threshold", 2.0)
        for protocol in PROTOCOLS:
            if ppl.filter(pl.col("protocol") == protocol).height:
                step = collapse_step(results, protocol)
                lines += [("perplexity at θ0", protocol, _last(results.filter(pl.col("step") == 0), "perplexity",
                                                              "perplexity", protocol)),
                          ("perplexity ratio to θ0 at last step", protocol,
                           _last(results, "perplexity", "ratio", protocol)),
                          (f"perplexity collapse step (ratio >= {threshold:g})", protocol,
                           float("nan") if step is None else float(step))]
    if "downstream" in probes:
        down = results.filter(pl.col("probe") == "downstream")
        tasks = sorted(set(down.filter(pl.col("metric") == "score")["protocol"]) - {"mean"})
        for task in [*tasks, "mean"]:
            lines += [("downstream score at θ0", task, _last(down.filter(pl.col("step") == 0), "downstream", "score", task)),
                      ("downstream drift at last step (difference)", task, _last(down, "downstream", "diff", task)),
                      ("downstream drift at last step (ratio)", task, _last(down, "downstream", "ratio", task))]
    if "weight_drift" in probes:
        lines += [("weight drift ||W_t - W_0||_F at last step", "total",
                   _last(results, "weight_drift", "frobenius", "total")),
                  ("parameters touched at last step", "total", _last(results, "weight_drift", "touched", "total"))]
    return lines


def _shown(value) -> str:
    """A table cell: n/a for missing, 0 for float noise around zero (e.g. a mean of cancelling drifts)."""
    if value is None or math.isnan(value):
        return "n/a"
    return "0" if abs(value) < 1e-12 else f"{value:.4g}"


def compare_table(runs: list[RunDir], labels: list[str]) -> pl.DataFrame:
    """The summary tables of several runs side by side: measure, protocol, one column per run."""
    joined = None
    for run, label in zip(runs, labels):
        table = summary_table(run).rename({"value": label})
        joined = table if joined is None else joined.join(table, on=["measure", "protocol"], how="full",
                                                          coalesce=True, maintain_order="left")
    return joined


def format_table(table: pl.DataFrame) -> str:
    """A plain-text table: measure and protocol, then one value column each."""
    values = table.columns[2:]
    width = max(len(m) for m in table["measure"]) + 2
    pw = max(11, max(len(p) for p in table["protocol"]) + 2)
    widths = [max(len(v), 9) + 2 for v in values]
    head = f"{'measure':<{width}}{'protocol':<{pw}}" + "".join(f"{v:>{w}}" for v, w in zip(values, widths))
    lines = [head, "-" * len(head)]
    for row in table.iter_rows():
        cells = [_shown(v) for v in row[2:]]
        lines.append(f"{row[0]:<{width}}{row[1]:<{pw}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def format_summary(run: RunDir) -> str:
    manifest = run.manifest()
    ident = manifest["identity"]
    progress = run.progress()
    hp = ", ".join(f"{k}={v}" for k, v in ident.get("hyperparameters", {}).items())
    head = [
        f"run {manifest['run_id']}  ({run.path})",
        f"model {ident['model']}  editor {ident['editor']} ({hp})",
        f"stream {ident['stream']} [{ident.get('stream_hash', '?')}]  "
        f"steps {max(progress['completed_step'], 0)}/{ident.get('stream_steps', '?')}  "
        f"edits {ident.get('stream_edits', '?')}  seed {ident['seed']}",
        "",
    ]
    sessions = manifest.get("sessions") or []
    if sessions:
        last = sessions[-1]
        numerics = ", ".join(f"{k}={v['dtype']} ({v['setting']})" for k, v in (last.get("numerics") or {}).items())
        head.insert(-1, f"ran on {last['cpu']['model']} ({last['device']}, {last['threads']['threads']} threads"
                        + (f", {numerics}" if numerics else "") + ")")
    if progress["completed_step"] < 0:
        return "\n".join(head + [
            f"no step is complete yet: started {manifest['created']}, then stopped before the θ0 reference "
            "probes finished (they follow the editor's one-time preparation, such as key statistics, which "
            "are cached as they are computed). Re-run the same replay command to resume."])
    table = summary_table(run)
    width = max(len(m) for m in table["measure"]) + 2
    pw = max(11, max(len(p) for p in table["protocol"]) + 2)
    lines = [f"{'measure':<{width}}{'protocol':<{pw}}value", "-" * (width + pw + 9)]
    for measure, protocol, value in table.iter_rows():
        lines.append(f"{measure:<{width}}{protocol:<{pw}}{_shown(value)}")
    return "\n".join(head + lines)
