"""The run summary table printed by ``lifelong show`` and at the end of ``lifelong replay``.

Every rate over items carries its n and a 95% interval (``lifelong.core.stats``): Wilson where the items are
0/1 outcomes, a seeded bootstrap over items where they are continuous. Counts, corpus-level figures
(perplexity) and timings carry their n where one exists and no interval.

A sampled retention panel (the probe's ``sample`` cap, or ``fraction`` < 1): the retained fraction is the
sample's estimate with a finite-population Wilson interval; retainability's bootstrap resamples the scored
edits; forgetting counts only the edits the panel looked at after their own step (edits never probed
again are neither kept nor forgotten), so the count is a lower bound and the share is over those edits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from lifelong.core.stats import (
    NON_NEGATIVE,
    SHARE,
    Estimate,
    Line,
    format_estimate,
    newcombe_difference,
    over_seeds,
    plain_line,
    rate,
    rate_line,
    sampled_wilson,
)
from lifelong.run import RunDir
from probes import metric_table as mt
from probes.metrics import forgotten_at, observed, retention_matrix, retention_summary

SCHEMA = {
    "measure": pl.String,
    "protocol": pl.String,
    "value": pl.Float64,
    "n": pl.Int64,
    "low": pl.Float64,
    "high": pl.Float64,
}


def item_values(results: pl.DataFrame, probe: str, metric: str, protocol: str, own_step: bool = True) -> np.ndarray:
    """One probe metric's per-item values: at each edit's own step (or at θ0 with own_step False)."""
    rows = results.filter(
        (pl.col("probe") == probe)
        & (pl.col("metric") == metric)
        & (pl.col("protocol") == protocol)
        & ((pl.col("step") > 0) if own_step else (pl.col("step") == 0))
    )
    return rows["value"].to_numpy().astype(float)


CHAIN_LINES = (
    ("round success (Succ)", mt.ROUND_SUCCESS),
    ("distortion D (JS, nats)", mt.DISTORTION_JS),
    ("distortion (Pitfalls variant)", mt.DISTORTION_JS_PITFALLS),
    ("ignore rate (IR)", mt.IGNORE_RATE),
    ("failure rate (FR)", mt.FAILURE_RATE),
    ("conflict score explicit (CS)", mt.CONFLICT_SCORE_EXPLICIT),
    ("conflict score implicit (CS)", mt.CONFLICT_SCORE_IMPLICIT),
    ("conflict magnitude (CM)", mt.CONFLICT_MAGNITUDE),
    ("tied fact damage (TFD)", mt.TIED_FACT_DAMAGE),
)


def _counted(measure: str, protocol: str, value: float, n: int) -> Line:
    """A share value = k/n of n items: Wilson, with the 0/1 items rebuilt for pooling; else the value alone."""
    k = round(value * n) if n and not math.isnan(value) else None
    if k is None or abs(k / n - value) > 1e-9:
        return plain_line(measure, protocol, value)
    return rate_line(measure, protocol, np.r_[np.ones(k), np.zeros(n - k)])


def chain_lines(results: pl.DataFrame) -> list[Line]:
    """Means of the chain probe's rows over chains (docs/METRICS.md §4): at completion, and at the last
    re-measurement step when there is one; FR is the run-level value at the last such step, its n the
    round chains it counts. The protocol column keeps the probability kind (``completion;p=meantok``;
    ``later`` shown as ``last``)."""
    from probes.chains import protocol_when

    rows = results.filter(pl.col("probe") == mt.CHAINS)
    lines = []
    for when in ("completion", "later"):
        for protocol in sorted(p for p in set(rows["protocol"]) if protocol_when(p) == when):
            sel = rows.filter(pl.col("protocol") == protocol)
            if when == "later":
                sel = sel.filter(pl.col("step") == sel["step"].max())
            shown = protocol if when == "completion" else "last" + protocol[len("later") :]
            for label, metric in CHAIN_LINES:
                m = sel.filter(pl.col("metric") == metric)
                if not m.height:
                    continue
                if metric == mt.FAILURE_RATE:
                    m = m.sort("step").tail(1)
                    irs = sel.filter((pl.col("metric") == mt.IGNORE_RATE) & (pl.col("step") <= m["step"][0]))
                    lines.append(_counted(label, shown, float(m["value"][0]), irs.height))
                else:
                    lines.append(rate_line(label, shown, m["value"].to_numpy()))
    return lines


def _retainability_interval(m, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap over edits of (Acc_T − Acc_1)/(T − 1): resample the matrix's edit columns."""
    steps = len(np.unique(m.own_step))
    if steps < 2 or len(m.edit_ids) < 2 or not len(m.steps) or m.steps[-1] != int(m.own_step.max()):
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(m.edit_ids), size=(resamples, len(m.edit_ids)))
    first = (m.own_step == m.own_step.min()).astype(float)[idx]
    acc_first = (m.own_score[idx] * first).sum(1) / np.where(first.sum(1) > 0, first.sum(1), np.nan)
    last = m.values[-1][idx]
    seen = ~np.isnan(last)
    acc_last = np.where(seen, last, 0).sum(1) / np.where(seen.sum(1) > 0, seen.sum(1), np.nan)
    values = (acc_last - acc_first) / (steps - 1)
    values = values[~np.isnan(values)]
    if not len(values):
        return (math.nan, math.nan)
    low, high = np.quantile(values, [0.025, 0.975])
    return (float(low), float(high))


def _last_retained(m, protocol: str, last: np.ndarray) -> Line:
    """The retained fraction at the last probed step over the edits scored there: Wilson over them, or,
    where the probe scored a sample of the live edits, Wilson with the finite-population correction
    (the estimate is of the share over all of them)."""
    items = last[~np.isnan(last)]
    population = m.population[-1] if m.population is not None else math.nan
    if math.isnan(population) or not len(items):
        return rate_line("retained fraction at last step", protocol, last)
    low, high = sampled_wilson(float(items.sum()), len(items), int(population))
    return Line(
        "retained fraction at last step",
        protocol,
        Estimate(float(items.mean()), len(items), low, high, "wilson, sampled"),
        items,
    )


def retention_lines(results: pl.DataFrame, protocol: str) -> list[Line]:
    ret = retention_summary(results, protocol)
    if not ret:
        return []
    m = retention_matrix(results, protocol)
    last = m.values[-1] if len(m.steps) and m.steps[-1] == int(m.own_step.max()) else np.array([])
    took = (m.own_score == 1) & observed(m)  # with a sampled panel: the edits it saw again
    forgot = ~np.isnan(forgotten_at(m))
    low, high = _retainability_interval(m)
    lines = [
        _last_retained(m, protocol, last)
        if len(last)
        else plain_line("retained fraction at last step", protocol, ret["retained_fraction"], bounds=SHARE),
        Line(
            "retainability",
            protocol,
            Estimate(
                ret["retainability"],
                len(m.edit_ids),
                None if math.isnan(low) else low,
                None if math.isnan(high) else high,
                "bootstrap" if not math.isnan(low) else "",
            ),
        ),
        plain_line("edits forgotten (count)", protocol, ret["forgotten"], int(took.sum()), NON_NEGATIVE),
        rate_line("edits forgotten (share of those that took hold)", protocol, forgot[took].astype(float)),
        plain_line("median steps to forget", protocol, ret["median_steps_to_forget"], int(forgot.sum()), NON_NEGATIVE),
    ]
    if ret["superseded"]:
        lines.append(
            plain_line(
                "edits superseded by a later edit (count)", protocol, ret["superseded"], len(m.edit_ids), NON_NEGATIVE
            )
        )
    return lines


def generation_protocols(results: pl.DataFrame, probe: str, score: str | None = None) -> list[str]:
    """The generation protocols (``gen_…@SETTING``, docs/METRICS.md §6) of ``probe``'s rows, sorted;
    only those of ``score`` when given."""
    prefix = f"{score}@" if score else "gen_"
    found = results.filter((pl.col("probe") == probe) & pl.col("protocol").str.starts_with(prefix))["protocol"]
    return sorted(set(found.to_list()))


GENERATION_MEASURES = (
    ("efficacy at own step", mt.EFFICACY),
    ("generalization (paraphrases)", mt.GENERALIZATION),
    ("locality (neighborhood)", mt.LOCALITY),
)


def generation_lines(results: pl.DataFrame) -> list[Line]:
    """Edit quality at each edit's own step under every generation protocol the run has, setting by
    setting (retention under the generation protocols goes with the other retention lines: gen_exact only)."""
    lines = []
    protocols = generation_protocols(results, mt.EDIT_QUALITY)
    for setting in dict.fromkeys(p.split("@", 1)[1] for p in protocols):
        for measure, metric in GENERATION_MEASURES:
            for score in (mt.GEN_EXACT, mt.GEN_CONTAINS, mt.GEN_UNCHANGED, mt.GEN_JUDGE):
                values = item_values(results, mt.EDIT_QUALITY, metric, f"{score}@{setting}")
                if len(values):
                    lines.append(rate_line(measure, f"{score}@{setting}", values))
    return lines


HEADLINE = "retained fraction at last step"
MEANING = {
    "es": "the new target's probability beats the old one's",
    "exact": "teacher-forced: each answer token is the argmax given the gold prefix",
    mt.GEN_EXACT: "the greedy answer, normalised, is the new target",
}


def retention_headline(table: pl.DataFrame) -> str | None:
    """One line that puts the strictest retained fraction the run has beside ES, saying which is which:
    ES alone flatters an editor (issue #38). The strictest is a generation protocol's exact match — in
    the authors' default context (``gen_exact@question``) when the run has it, else the lowest of its
    settings — or, without generation, teacher-forced ``exact``. (A chat model answers in sentences, so
    ``gen_exact@chat`` is near 0 whatever the editor did: the lowest is not always the most telling.)
    None when the run has no ES retention figure."""
    rows = {p: (v, n, lo, hi) for m, p, v, n, lo, hi in table.iter_rows() if m == HEADLINE}
    if "es" not in rows:
        return None
    generated = [p for p in rows if p.startswith(f"{mt.GEN_EXACT}@") and rows[p][0] is not None]
    generated = [p for p in generated if not math.isnan(rows[p][0])]
    default = f"{mt.GEN_EXACT}@question"
    if default in generated:
        strictest: str | None = default
    elif generated:
        strictest = min(generated, key=lambda p: (rows[p][0], p))
    else:
        strictest = "exact" if "exact" in rows else None
    parts = [f"ES {_cell(*rows['es'])} ({MEANING['es']})"]
    if strictest is not None:
        meaning = MEANING[strictest.split("@", 1)[0]]
        parts.append(f"strictest, {strictest} {_cell(*rows[strictest])} ({meaning})")
    return "retained at the last step: " + "; ".join(parts)


def summary_lines(run: RunDir) -> list[Line]:
    """The headline figures of one run, each with its n and interval where it has them."""
    results = run.results()
    progress = run.progress()
    lines = [
        rate_line(
            "pre-edit efficacy (θ0)", "es", item_values(results, "edit_quality", "efficacy", "es", own_step=False)
        ),
        rate_line("efficacy at own step", "es", item_values(results, "edit_quality", "efficacy", "es")),
        rate_line("efficacy at own step", "exact", item_values(results, "edit_quality", "efficacy", "exact")),
        rate_line("generalization (paraphrases)", "ps", item_values(results, "edit_quality", "generalization", "ps")),
        rate_line(
            "generalization (paraphrases)", "exact", item_values(results, "edit_quality", "generalization", "exact")
        ),
        rate_line("locality (neighborhood)", "ns", item_values(results, "edit_quality", "locality", "ns")),
        rate_line(
            "locality (neighborhood)", "unchanged", item_values(results, "edit_quality", "locality", "unchanged")
        ),
    ]
    lines += generation_lines(results)
    judged = generation_protocols(results, mt.RETENTION_PROBE, mt.GEN_JUDGE)  # lifelong judge's, when run
    for protocol in ("es", "exact", *generation_protocols(results, mt.RETENTION_PROBE, mt.GEN_EXACT), *judged):
        lines += retention_lines(results, protocol)
    lines += chain_lines(results)
    lines += general_ability_lines(results, run.load_reference() or {})
    for name in (mt.FINAL_QUALITY, mt.FLUENCY):  # the paper presets' probes: their generic lines
        if name in set(results["probe"]):
            from probes import PROBES

            lines += PROBES[name].summary_lines(results.filter(pl.col("probe") == name))
    for name, cls in outside_probes(run).items():  # probes not built in: their own summary lines
        lines += cls.summary_lines(results.filter(pl.col("probe") == name), (run.load_reference() or {}).get(name))
    lines += fit_lines(progress.get("editor", {}))
    seconds = [v for k, v in progress["seconds"].items() if int(k) > 0]
    if seconds:
        lines += [
            plain_line(
                "seconds per step: edit",
                "wall",
                sum(s["edit"] for s in seconds) / len(seconds),
                len(seconds),
                NON_NEGATIVE,
            ),
            plain_line(
                "seconds per step: probes",
                "wall",
                sum(s["probe"] for s in seconds) / len(seconds),
                len(seconds),
                NON_NEGATIVE,
            ),
        ]
    return lines


def outside_probes(run: RunDir) -> dict:
    """The probes of a run that are not built in, by the name their rows carry: their classes as the run
    named them (an installed entry point or ``module.path:Class``), or the base class's generic summary
    and panel where that class cannot be loaded here."""
    from lifelong.core.names import PROBE_CLASSES
    from probes import Probe, UnknownProbeError, probe_class

    out: dict = {}
    for probe in run.manifest()["identity"].get("probes") or []:
        if probe["name"] in PROBE_CLASSES:
            continue
        try:
            out[probe["name"]] = probe_class(probe.get("source") or probe["name"])
        except UnknownProbeError:
            out[probe["name"]] = type(probe["name"], (Probe,), {"name": probe["name"]})
    return out


def fit_lines(reports: dict[str, dict]) -> list[Line]:
    """How the v*/z* fits of ROME, MEMIT and AlphaEdit ended, over the run's steps: the share that
    met the stop rule (the rest ran to the step cap) and their mean final loss."""
    fits = [r for r in reports.values() if r.get("v_fits")]
    if not fits:
        return []
    total = sum(r["v_fits"] for r in fits)
    stopped = sum(r["v_stopped"] for r in fits)

    def mean(key: str) -> float:  # over fits, each step's mean weighted by its fits
        return sum(r[key] * r["v_fits"] for r in fits) / total

    return [
        rate_line("v* fits that met the stop loss", "fit", np.array([1.0] * stopped + [0.0] * (total - stopped))),
        plain_line("v* fits: mean final loss", "fit", mean("v_loss_mean"), total, NON_NEGATIVE),
        plain_line("v* fits: mean steps taken", "fit", mean("v_steps_mean"), total, NON_NEGATIVE),
    ]


def lines_table(lines: list[Line]) -> pl.DataFrame:
    rows = [
        (ln.measure, ln.protocol, ln.estimate.value, ln.estimate.n, ln.estimate.low, ln.estimate.high) for ln in lines
    ]
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def summary_table(run: RunDir) -> pl.DataFrame:
    """One row per headline figure: measure, protocol, value, and its n and 95% interval (low, high;
    null where the figure is not a rate over items)."""
    return lines_table(summary_lines(run))


def _last(results: pl.DataFrame, probe: str, metric: str, protocol: str) -> float:
    """The value at the last step the probe ran (NaN if never). A change against θ0 (ratio, diff) counts
    only steps after an edit: a run stopped before its first probed edit step has none yet."""
    rows = results.filter((pl.col("probe") == probe) & (pl.col("metric") == metric) & (pl.col("protocol") == protocol))
    if metric in (mt.RATIO, mt.RATIO_LOW, mt.RATIO_HIGH, mt.DIFF):
        rows = rows.filter(pl.col("step") > 0)
    return float(rows.sort("step")["value"][-1]) if rows.height else float("nan")


def _ratio_line(results: pl.DataFrame, reference: dict, protocol: str) -> Line:
    """The perplexity ratio at the last step; the corpus variant with its interval over the corpus's
    chunks (n = chunks) where the probe recorded one."""
    measure = "perplexity ratio to θ0 at last step"
    ratio = _last(results, mt.PERPLEXITY_PROBE, mt.RATIO, protocol)
    low, high = (_last(results, mt.PERPLEXITY_PROBE, m, protocol) for m in (mt.RATIO_LOW, mt.RATIO_HIGH))
    if math.isnan(ratio) or math.isnan(low) or math.isnan(high):
        return plain_line(measure, protocol, ratio, bounds=NON_NEGATIVE)
    chunks = reference.get(mt.PERPLEXITY_PROBE, {}).get("chunks")
    return Line(measure, protocol, Estimate(ratio, chunks, low, high, "t over chunks"), bounds=NON_NEGATIVE)


def _downstream_lines(down: pl.DataFrame, reference: dict) -> list[Line]:
    """Task scores are shares of items right (n from the reference's item counts): Wilson at θ0, Newcombe's
    interval (two samples taken as independent) for the drift; the mean over tasks gets them when every task
    has the same n (then it is the pooled share)."""
    sizes = dict((reference.get("downstream") or {}).get("items") or {})
    tasks = sorted(set(down.filter(pl.col("metric") == "score")["protocol"]) - {"mean"})
    if tasks and all(sizes.get(t) for t in tasks) and len({sizes[t] for t in tasks}) == 1:
        sizes["mean"] = sizes[tasks[0]] * len(tasks)
    lines = []
    for task in [*tasks, "mean"]:
        s0 = _last(down.filter(pl.col("step") == 0), "downstream", "score", task)
        s = _last(down, "downstream", "score", task)
        n = sizes.get(task)
        base = _counted("downstream score at θ0", task, s0, n) if n else plain_line("downstream score at θ0", task, s0)
        diff = _last(down, "downstream", "diff", task)
        drift = plain_line("downstream drift at last step (difference)", task, diff)
        if n and base.items is not None and not math.isnan(s) and abs(round(s * n) / n - s) < 1e-9:
            low, high = newcombe_difference(round(s * n), n, round(s0 * n), n)
            drift = Line(drift.measure, task, Estimate(diff, n, low, high, "newcombe"))
        lines += [
            base,
            drift,
            plain_line(
                "downstream drift at last step (ratio)", task, _last(down, "downstream", "ratio", task), n, NON_NEGATIVE
            ),
        ]
    return lines


def general_ability_lines(results: pl.DataFrame, reference: dict | None = None) -> list[Line]:
    """Perplexity ratio and collapse step, downstream drift and weight drift, when those probes ran."""
    from probes.perplexity import PROTOCOLS, collapse_step

    lines: list[Line] = []
    probes = set(results["probe"].unique())
    if "perplexity" in probes:
        ppl = results.filter(pl.col("probe") == "perplexity")
        threshold = (reference or {}).get("perplexity", {}).get("threshold", 2.0)
        for protocol in PROTOCOLS:
            if ppl.filter(pl.col("protocol") == protocol).height:
                step = collapse_step(results, protocol)
                lines += [
                    plain_line(
                        "perplexity at θ0",
                        protocol,
                        _last(results.filter(pl.col("step") == 0), "perplexity", "perplexity", protocol),
                        bounds=NON_NEGATIVE,
                    ),
                    _ratio_line(results, reference or {}, protocol),
                    plain_line(
                        f"perplexity collapse step (ratio >= {threshold:g})",
                        protocol,
                        float("nan") if step is None else float(step),
                        bounds=NON_NEGATIVE,
                    ),
                ]
    if "downstream" in probes:
        lines += _downstream_lines(results.filter(pl.col("probe") == "downstream"), reference or {})
    if "weight_drift" in probes:
        lines += [
            plain_line(
                "weight drift ||W_t - W_0||_F at last step",
                "total",
                _last(results, "weight_drift", "frobenius", "total"),
                bounds=NON_NEGATIVE,
            ),
            plain_line(
                "parameters touched at last step",
                "total",
                _last(results, "weight_drift", "touched", "total"),
                bounds=NON_NEGATIVE,
            ),
        ]
        lines += _drift_warning_lines(results, (reference or {}).get("weight_drift", {}))
    return lines


def _drift_warning_lines(results: pl.DataFrame, reference: dict) -> list[Line]:
    """The relative updates' sum and largest, the largest norm ratio over the edited matrices and the
    collapse warning's step; none for a run from before the probe wrote them."""
    from probes.weight_drift import warning_step

    if not results.filter((pl.col("metric") == mt.DRIFT_WARNING) & (pl.col("probe") == mt.WEIGHT_DRIFT)).height:
        return []
    step = warning_step(results)
    tau = reference.get("warn_relative", math.nan)
    return [
        plain_line(
            "weight drift: relative updates summed at last step",
            "sum",
            _last(results, mt.WEIGHT_DRIFT, mt.RELATIVE, "sum"),
            bounds=NON_NEGATIVE,
        ),
        plain_line(
            "weight drift: largest relative update at last step",
            "max",
            _last(results, mt.WEIGHT_DRIFT, mt.RELATIVE, "max"),
            bounds=NON_NEGATIVE,
        ),
        plain_line(
            "weight drift: largest ||W_t||/||W_0|| at last step",
            "max",
            _last(results, mt.WEIGHT_DRIFT, mt.NORM_RATIO, "max"),
            bounds=NON_NEGATIVE,
        ),
        plain_line(
            f"collapse warning step (relative updates' sum >= {tau:g})",
            "sum",
            math.nan if step is None else float(step),
            bounds=NON_NEGATIVE,
        ),
    ]


def drift_warning(run: RunDir) -> str | None:
    """The collapse warning of a run whose weight-drift probe warned (None: it did not, or did not run)."""
    from probes.weight_drift import warning_step, warning_text

    results = run.results()
    step = warning_step(results)
    if step is None:
        return None
    at = results.filter(
        (pl.col("probe") == mt.WEIGHT_DRIFT)
        & (pl.col("metric") == mt.RELATIVE)
        & (pl.col("protocol") == "sum")
        & (pl.col("step") == step)
    )
    tau = (run.load_reference() or {}).get(mt.WEIGHT_DRIFT, {}).get("warn_relative", math.nan)
    return warning_text(step, float(at["value"][0]) if at.height else math.nan, tau)


def _cell(value, n, low, high) -> str:
    """``0.85 [0.74, 0.92] n=40``: a value with its interval and n, as far as it has them."""
    return format_estimate(Estimate(math.nan if value is None else value, n, low, high))


def configurations(runs: list[RunDir]) -> list[list[int]]:
    """Indices of runs grouped into configurations: runs whose manifest identities differ only in ``seed``
    are one configuration (seeds of it). Groups keep the order of their first run."""
    groups: dict[str, list[int]] = {}
    import json

    for i, run in enumerate(runs):
        ident = run.manifest()["identity"]
        # A seed that draws the sample draws the stream's content too: those figures are the seed's.
        drawn = ("seed", "stream_hash", "stream_edits", "stream_steps") if ident.get("sample") else ("seed",)
        ident = {k: v for k, v in ident.items() if k not in drawn}
        groups.setdefault(json.dumps(ident, sort_keys=True, default=str), []).append(i)
    return list(groups.values())


def configuration_labels(runs: list[RunDir], groups: list[list[int]]) -> list[str]:
    """Editor names; the first run's directory name added where two configurations share an editor;
    ``(k seeds)`` for a configuration replayed with several seeds."""
    editors = [runs[g[0]].manifest()["identity"]["editor"] for g in groups]
    labels = []
    for editor, g in zip(editors, groups):
        label = editor if editors.count(editor) == 1 else f"{editor} ({runs[g[0]].path.name})"
        labels.append(label if len(g) == 1 else f"{label} ({len(g)} seeds)")
    return labels


def _columns(table: pl.DataFrame, name: str) -> pl.DataFrame:
    return table.rename({"value": name, "n": f"{name} n", "low": f"{name} low", "high": f"{name} high"})


@dataclass
class SeedUnits:
    """Which runs of a configuration are independent units: ``distinct`` lists the runs that are not a
    repeat of an earlier one (the same edits and every figure equal: the seed varied nothing), and
    ``disjoint`` says whether their edits are disjoint, so that their items may be pooled as one sample."""

    distinct: list[int]
    disjoint: bool
    repeats: dict[int, int]  # run -> the earlier run it repeats

    def note(self, seeds: list[int]) -> str:
        """One line on what was counted, for the tables' footnotes ('' when every run counted as given)."""
        parts = [f"seed {seeds[r]} repeats seed {seeds[first]} exactly" for r, first in self.repeats.items()]
        if parts:
            parts[-1] += " (same edits, same figures): counted once"
        if not self.disjoint:
            parts.append("seeds edited some of the same edits: items not pooled (the seed mean is over runs)")
        return "; ".join(parts)


def seed_units(per_run: list[list[Line]], edit_sets: list[frozenset]) -> SeedUnits:
    """Compare a configuration's runs (:class:`SeedUnits`); timings (protocol ``wall``) are left out of the
    comparison, as two runs of the same work still take different times."""

    def figures(lines: list[Line]) -> tuple:
        return tuple((ln.measure, ln.protocol, ln.estimate.value) for ln in lines if ln.protocol != "wall")

    distinct: list[int] = []
    repeats: dict[int, int] = {}
    for i, lines in enumerate(per_run):
        same = next(
            (j for j in distinct if edit_sets[j] == edit_sets[i] and _equal(figures(per_run[j]), figures(lines))), None
        )
        if same is None:
            distinct.append(i)
        else:
            repeats[i] = same
    seen: set = set()
    disjoint = True
    for i in distinct:
        disjoint = disjoint and not (seen & edit_sets[i])
        seen |= edit_sets[i]
    return SeedUnits(distinct, disjoint, repeats)


def _equal(a: tuple, b: tuple) -> bool:
    """Figure tuples equal, NaN equal to NaN."""
    return len(a) == len(b) and all(
        x[:2] == y[:2] and (x[2] == y[2] or (math.isnan(x[2]) and math.isnan(y[2]))) for x, y in zip(a, b)
    )


def edited_ids(run: RunDir) -> frozenset:
    """The ids of the edits a run applied (its edit-quality rows)."""
    results = run.results()
    rows = results.filter(pl.col("probe") == "edit_quality")
    return frozenset(rows["edit_id"].drop_nulls().unique().to_list())


def _seed_table(per_run: list[list[Line]], name: str, units: SeedUnits | None = None) -> pl.DataFrame:
    """One configuration over seeds: the pooled item-level figure (items of every seed together; only for
    rates over items, and only when the seeds' edits are disjoint) and the mean over seeds with a t interval
    cut to the quantity's range (n = seeds that are distinct units: a run repeating another counts once)."""
    if units is not None:
        per_run = [per_run[i] for i in units.distinct]
    keys: list[tuple[str, str]] = []
    found: dict[tuple[str, str], list[Line]] = {}
    for lines in per_run:
        for ln in lines:
            key = (ln.measure, ln.protocol)
            if key not in found:
                keys.append(key)
                found[key] = []
            found[key].append(ln)
    rows = []
    for key in keys:
        lines = found[key]
        if all(ln.items is not None for ln in lines) and (units is None or units.disjoint):
            pooled = rate(np.concatenate([ln.items for ln in lines]))
        else:
            pooled = Estimate(math.nan)
        seeds = over_seeds([ln.estimate.value for ln in lines], lines[0].bounds)
        rows.append(
            (*key, pooled.value, pooled.n, pooled.low, pooled.high, seeds.value, seeds.n, seeds.low, seeds.high)
        )
    return pl.DataFrame(
        rows,
        schema={
            "measure": pl.String,
            "protocol": pl.String,
            f"{name} pooled": pl.Float64,
            f"{name} pooled n": pl.Int64,
            f"{name} pooled low": pl.Float64,
            f"{name} pooled high": pl.Float64,
            f"{name} seed mean": pl.Float64,
            f"{name} seeds n": pl.Int64,
            f"{name} seed low": pl.Float64,
            f"{name} seed high": pl.Float64,
        },
        orient="row",
    )


def compare_table(runs: list[RunDir], labels: list[str] | None = None) -> pl.DataFrame:
    """The summary tables of several runs side by side: measure, protocol, then four columns per entry
    (value, n, low, high). An entry is a run, or a configuration replayed with several seeds: that one gets
    ``pooled`` columns (the items of all its seeds as one sample) and ``seed mean`` columns (mean over
    seeds ± a 95% t interval, n = seeds). ``labels`` name single runs (default: their editors)."""
    groups = configurations(runs)
    names = configuration_labels(runs, groups)
    tables = [
        _columns(summary_table(runs[g[0]]), labels[g[0]] if labels else name)
        if len(g) == 1
        else _group_table(runs, g, name)
        for name, g in zip(names, groups)
    ]
    return _side_by_side(tables)


def _group_table(runs: list[RunDir], group: list[int], name: str) -> pl.DataFrame:
    per_run = [summary_lines(runs[i]) for i in group]
    return _seed_table(per_run, name, seed_units(per_run, [edited_ids(runs[i]) for i in group]))


def group_note(runs: list[RunDir], group: list[int]) -> str:
    """The footnote of a configuration replayed with several seeds: repeats counted once, items not pooled."""
    per_run = [summary_lines(runs[i]) for i in group]
    units = seed_units(per_run, [edited_ids(runs[i]) for i in group])
    return units.note([runs[i].manifest()["identity"]["seed"] for i in group])


def seed_mean_table(runs: list[RunDir], groups: list[list[int]], names: list[str]) -> pl.DataFrame:
    """Configurations side by side (``groups`` of ``runs``, e.g. from :func:`configurations`, named by ``names``):
    measure, protocol, then value, n, low, high per configuration: the mean of each summary figure over its
    seeds ± a 95% t interval, n = seeds (a configuration of one seed: its value, n = 1, no interval)."""
    tables = [
        _group_table(runs, g, name).select(
            "measure",
            "protocol",
            pl.col(f"{name} seed mean").alias(name),
            pl.col(f"{name} seeds n").alias(f"{name} n"),
            pl.col(f"{name} seed low").alias(f"{name} low"),
            pl.col(f"{name} seed high").alias(f"{name} high"),
        )
        for name, g in zip(names, groups)
    ]
    return _side_by_side(tables)


def _side_by_side(tables: list[pl.DataFrame]) -> pl.DataFrame:
    """Outer-join per-entry tables on (measure, protocol), keeping the first table's row order."""
    if not tables:
        raise ValueError("no runs to put side by side")
    joined = tables[0]
    for table in tables[1:]:
        joined = joined.join(table, on=["measure", "protocol"], how="full", coalesce=True, maintain_order="left")
    return joined


def format_table(table: pl.DataFrame) -> str:
    """A plain-text table: measure and protocol, then one cell per entry (value [low, high] n=…)."""
    entries = table.columns[2::4]
    cells = [[_cell(*row[2 + 4 * j : 6 + 4 * j]) for j in range(len(entries))] for row in table.iter_rows()]
    width = max(len(m) for m in table["measure"]) + 2
    pw = max(11, max(len(p) for p in table["protocol"]) + 2)
    widths = [max([len(v), 9] + [len(c[j]) for c in cells]) + 2 for j, v in enumerate(entries)]
    head = f"{'measure':<{width}}{'protocol':<{pw}}" + "".join(f"{v:>{w}}" for v, w in zip(entries, widths))
    lines = [head, "-" * len(head)]
    for row, cs in zip(table.iter_rows(), cells):
        lines.append(f"{row[0]:<{width}}{row[1]:<{pw}}" + "".join(f"{c:>{w}}" for c, w in zip(cs, widths)))
    return "\n".join(lines)


# Each headline figure's stable identifier (probe/metric@when, ASCII; the protocol is the key below it)
# and whether a higher value is better (None: neither, e.g. counts and timings).
MEASURE_KEYS: dict[str, tuple[str, bool | None]] = {
    "pre-edit efficacy (θ0)": ("edit_quality/efficacy@theta0", None),
    "efficacy at own step": ("edit_quality/efficacy@own_step", True),
    "generalization (paraphrases)": ("edit_quality/generalization@own_step", True),
    "locality (neighborhood)": ("edit_quality/locality@own_step", True),
    "retained fraction at last step": ("retention/retained_fraction@last", True),
    "retainability": ("retention/retainability", True),
    "edits forgotten (count)": ("retention/forgotten_count@last", False),
    "edits forgotten (share of those that took hold)": ("retention/forgotten_share@last", False),
    "median steps to forget": ("retention/median_steps_to_forget", True),
    "edits superseded by a later edit (count)": ("retention/superseded_count@last", None),
    "round success (Succ)": ("chains/round_success", True),
    "distortion D (JS, nats)": ("chains/distortion_js", False),
    "distortion (Pitfalls variant)": ("chains/distortion_js_pitfalls", False),
    "ignore rate (IR)": ("chains/ignore_rate", False),
    "failure rate (FR)": ("chains/failure_rate", False),
    "conflict score explicit (CS)": ("chains/conflict_score_explicit", True),
    "conflict score implicit (CS)": ("chains/conflict_score_implicit", True),
    "conflict magnitude (CM)": ("chains/conflict_magnitude", None),
    "tied fact damage (TFD)": ("chains/tied_fact_damage", False),
    "perplexity at θ0": ("perplexity/perplexity@theta0", None),
    "perplexity ratio to θ0 at last step": ("perplexity/ratio@last", False),
    "downstream score at θ0": ("downstream/score@theta0", None),
    "downstream drift at last step (difference)": ("downstream/diff@last", True),
    "downstream drift at last step (ratio)": ("downstream/ratio@last", True),
    "weight drift ||W_t - W_0||_F at last step": ("weight_drift/frobenius@last", None),
    "parameters touched at last step": ("weight_drift/touched@last", None),
    "weight drift: relative updates summed at last step": (
        "weight_drift/relative_sum@last",
        False,
    ),
    "weight drift: largest relative update at last step": ("weight_drift/relative_max@last", False),
    "weight drift: largest ||W_t||/||W_0|| at last step": ("weight_drift/norm_ratio_max@last", None),
    "v* fits that met the stop loss": ("editor/v_fits_stopped", True),
    "v* fits: mean final loss": ("editor/v_fit_loss", False),
    "v* fits: mean steps taken": ("editor/v_fit_steps", None),
    "seconds per step: edit": ("timing/edit_seconds_per_step", False),
    "seconds per step: probes": ("timing/probe_seconds_per_step", False),
}


def measure_key(measure: str) -> tuple[str, bool | None]:
    """(stable identifier, higher is better) of a headline figure; figures named at run time (a probe of
    one's own: ``NAME: METRIC at last step``; the collapse step with its threshold) get theirs by rule."""
    if measure in MEASURE_KEYS:
        return MEASURE_KEYS[measure]
    if measure.startswith("perplexity collapse step"):
        return "perplexity/collapse_step", True
    if measure.startswith("collapse warning step"):
        return "weight_drift/warning_step", True
    probe, sep, rest = measure.partition(": ")
    if sep and rest.endswith(" at last step"):
        return f"{probe}/{rest[: -len(' at last step')]}@last", None
    slug = "".join(c if c.isascii() and c.isalnum() else "_" for c in measure.lower()).strip("_")
    return f"other/{'_'.join(filter(None, slug.split('_')))}", None


def summary_json(run: RunDir) -> dict:
    """The run as one machine-readable record, shaped like lm-evaluation-harness's results file:
    ``results`` (stable identifier ``probe/metric@when`` -> protocol -> the measure's wording, whether higher
    is better, value, n, 95% interval and how it was made: :data:`MEASURE_KEYS`), ``config`` (the
    run's identity), ``versions`` (packages and the code's git commit, as recorded when the run
    started), progress and the machine of the last session."""
    manifest, progress = run.manifest(), run.progress()

    def number(x):
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else x

    results: dict[str, dict] = {}
    if progress["completed_step"] >= 0:
        for line in summary_lines(run):
            e = line.estimate
            key, higher = measure_key(line.measure)
            results.setdefault(key, {})[line.protocol] = {
                "measure": line.measure,
                "higher_is_better": higher,
                "value": number(e.value),
                "n": e.n,
                "low": number(e.low),
                "high": number(e.high),
                "interval": e.method or None,
                "confidence": 0.95 if e.method else None,
            }
    sessions = manifest.get("sessions") or []
    return {
        "run_id": manifest["run_id"],
        "created": manifest.get("created"),
        "config": manifest["identity"],
        "versions": manifest.get("versions", {}),
        "progress": {"completed_step": progress["completed_step"], "total_steps": progress["total_steps"]},
        "machine": sessions[-1] if sessions else None,
        "results": results,
    }


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
        f"edits {ident.get('stream_edits', '?')}  seed {ident['seed']}"
        + (f"  preset {ident['preset']} (docs/METRICS.md §7)" if ident.get("preset") else ""),
        "",
    ]
    sessions = manifest.get("sessions") or []
    if sessions:
        last = sessions[-1]
        numerics = ", ".join(f"{k}={v['dtype']} ({v['setting']})" for k, v in (last.get("numerics") or {}).items())
        head.insert(
            -1,
            f"ran on {last['cpu']['model']} ({last['device']}, {last['threads']['threads']} threads"
            + (f", {numerics}" if numerics else "")
            + ")",
        )
        if last.get("precision"):  # sessions from before the record have none
            parts = ", ".join(f"{part} {dtype}" for part, dtype in last["precision"].items())
            head.insert(-1, f"precision: {parts}")
    source = manifest.get("references_from")
    if source:  # replay --references-from
        head.insert(-1, f"step 0 (θ0's references) copied from run {source['run_id']} ({source['path']})")
    if progress["completed_step"] < 0:
        return "\n".join(
            head
            + [
                f"no step is complete yet: started {manifest['created']}, then stopped before the θ0 reference "
                "probes finished (they follow the editor's one-time preparation, such as key statistics, which "
                "are cached as they are computed). Re-run the same replay command to resume."
            ]
        )
    table = summary_table(run)
    width = max(len(m) for m in table["measure"]) + 2
    pw = max(11, max(len(p) for p in table["protocol"]) + 2)
    headline = retention_headline(table)
    lines = [headline, ""] if headline else []
    warning = drift_warning(run)
    if warning:
        lines += [warning, ""]
    lines += [f"{'measure':<{width}}{'protocol':<{pw}}value [95% interval] n", "-" * (width + pw + 30)]
    for measure, protocol, *figure in table.iter_rows():
        lines.append(f"{measure:<{width}}{protocol:<{pw}}{_cell(*figure)}")
    notes: tuple[str, ...] = (
        "intervals: Wilson over items for 0/1 outcomes, bootstrap over items (2,000 resamples, seeded) for "
        "continuous values, t over the corpus's chunks for the corpus perplexity ratio;",
        "n: the items (edits, chains, task items, corpus chunks) or steps a figure is over.",
    )
    drawn = run.results().filter((pl.col("probe") == mt.RETENTION_PROBE) & (pl.col("metric") == mt.SAMPLE_POPULATION))
    if drawn.height:
        notes += (
            "retention scored a seeded sample of the live edits at some steps: the retained fraction there "
            "is an estimate (finite-population Wilson interval), forgetting counts only the edits sampled "
            "after their own step.",
        )
    return "\n".join(head + lines + ["", *notes])
