"""What one claim's figures are made of: measures of one run, estimates over seeds (or, with one seed,
over its edits or the corpus's chunks), and the verdict rules that read a whole interval."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import polars as pl

from lifelong.core.stats import (
    Estimate,
    newcombe_difference,
    newcombe_paired_difference,
    over_seeds,
    rate,
    ratio_interval,
)

PPL_CHUNKS = 2048 // 128  # the perplexity probe's chunks of 128 tokens on 2,048: the n of a one-seed ratio's interval
UNIT = "unit"  # the column naming a chain-unit arm's chain (each its own run from θ0) in the arm's results


SHARE = (0.0, 1.0)
# Each chain metric's range (probes/distortion.py): a t interval over seeds is cut to it.
CHAIN_RANGES = {
    "round_success": SHARE,
    "distortion_js": (0.0, math.log(2)),
    "distortion_js_pitfalls": (0.0, math.inf),
    "ignore_rate": SHARE,
    "failure_rate": SHARE,
    "conflict_score_explicit": SHARE,
    "conflict_score_implicit": SHARE,
    "conflict_magnitude": (-1.0, 1.0),
    "tied_fact_damage": (-math.inf, 1.0),
}


def per_seed(
    runs: list[pl.DataFrame], measure: Callable[[pl.DataFrame], float], bounds=(-math.inf, math.inf)
) -> Estimate:
    """One figure per seed's run, then their mean with a t interval (n = seeds) cut to ``bounds``, the
    quantity's range."""
    return over_seeds([measure(r) for r in runs], bounds=bounds)


def items_per_seed(runs: list[pl.DataFrame], values: Callable[[pl.DataFrame], np.ndarray]) -> str:
    counts = sorted({len(values(r)) for r in runs})
    return "/".join(str(c) for c in counts) if counts else "0"


def own_step_mean(probe: str, metric: str, protocol: str) -> Callable[[pl.DataFrame], float]:
    from lifelong.summary import item_values

    def measure(results: pl.DataFrame) -> float:
        x = item_values(results, probe, metric, protocol)
        return float(np.nanmean(x)) if len(x) else math.nan

    return measure


def own_step_values(probe: str, metric: str, protocol: str) -> Callable[[pl.DataFrame], np.ndarray]:
    from lifelong.summary import item_values

    return lambda results: item_values(results, probe, metric, protocol)


def retained_last(results: pl.DataFrame, protocol: str = "es") -> float:
    from probes.metrics import retention_summary

    return retention_summary(results, protocol).get("retained_fraction", math.nan)


def retained_items(results: pl.DataFrame, protocol: str = "es") -> np.ndarray:
    """Per edit, whether it held (by ``protocol``) at the last probed step; NaN where not measured
    (superseded)."""
    from probes.metrics import retention_matrix

    m = retention_matrix(results, protocol)
    return m.values[-1] if len(m.steps) else np.array([])


def retained_estimate(runs: list[pl.DataFrame], protocol: str = "es") -> Estimate:
    """The retained fraction at the last step: over seeds (t interval), or with one seed over its
    edits (Wilson), so a run too long to repeat still carries an interval."""
    if len(runs) == 1:
        return rate(retained_items(runs[0], protocol))
    return per_seed(runs, lambda r: retained_last(r, protocol), SHARE)


def retained_difference(a: list[pl.DataFrame], b: list[pl.DataFrame], protocol: str = "es") -> Estimate:
    """a − b in retained fraction: paired by seed (t interval), or with one seed over the edits
    (Newcombe's interval for two proportions; the same edits in both, so it is conservative)."""
    if len(a) == 1 and len(b) == 1:
        x, y = (v[~np.isnan(v)] for v in (retained_items(a[0], protocol), retained_items(b[0], protocol)))
        if not len(x) or not len(y):
            return Estimate(math.nan, 0)
        low, high = newcombe_difference(float(x.sum()), len(x), float(y.sum()), len(y))
        return Estimate(float(x.mean() - y.mean()), min(len(x), len(y)), low, high, "newcombe")
    return paired_difference([retained_last(r, protocol) for r in a], [retained_last(r, protocol) for r in b])


def ppl_ratio(step: int | None = None, metric: str = "ratio") -> Callable[[pl.DataFrame], float]:
    """Perplexity ratio to θ0 at ``step`` (None: the last step the probe ran); ``metric`` ratio_low or
    ratio_high: that step's interval over the corpus's chunks (NaN where the run has none)."""

    def measure(results: pl.DataFrame) -> float:
        rows = results.filter(
            (pl.col("probe") == "perplexity") & (pl.col("metric") == "ratio") & (pl.col("protocol") == "corpus")
        ).sort("step")
        if step is not None:
            rows = rows.filter(pl.col("step") <= step)
        if not rows.height:
            return math.nan
        if metric == "ratio":
            return float(rows["value"][-1])
        at = results.filter(
            (pl.col("probe") == "perplexity")
            & (pl.col("metric") == metric)
            & (pl.col("protocol") == "corpus")
            & (pl.col("step") == rows["step"][-1])
        )
        return float(at["value"][0]) if at.height else math.nan

    return measure


def downstream_change(protocol: str, step: int | None = None) -> Callable[[pl.DataFrame], float]:
    """The downstream probe's score change to θ0 (``diff``) for ``protocol`` (a task or ``mean``, with the
    protocol's tag, e.g. ``mean;seed``) at ``step`` (None: the last step it ran; else the last at or before)."""

    def measure(results: pl.DataFrame) -> float:
        rows = results.filter(
            (pl.col("probe") == "downstream") & (pl.col("metric") == "diff") & (pl.col("protocol") == protocol)
        ).sort("step")
        if step is not None:
            rows = rows.filter(pl.col("step") <= step)
        return float(rows["value"][-1]) if rows.height else math.nan

    return measure


def chain_rows(results: pl.DataFrame, metric: str) -> pl.DataFrame:
    """A chain metric's rows at completion (tied-fact damage: against θ0, the chain probe's default)."""
    return results.filter(
        (pl.col("probe") == "chains")
        & (pl.col("metric") == metric)
        & pl.col("protocol").str.starts_with("completion")
        & ~pl.col("protocol").str.ends_with(";ref=thetam")
    )


def chain_mean(metric: str) -> Callable[[pl.DataFrame], float]:
    """Mean over chains at completion (FR: the run's value after its last round chain)."""

    def measure(results: pl.DataFrame) -> float:
        rows = chain_rows(results, metric)
        if metric == "failure_rate":
            rows = rows.sort("step").tail(1)
        return float(rows["value"].mean()) if rows.height else math.nan

    return measure


def chain_count(metric: str) -> Callable[[pl.DataFrame], np.ndarray]:
    return lambda results: chain_rows(results, metric)["value"].to_numpy()


def chain_units(runs: list[pl.DataFrame], metric: str) -> dict[str, float]:
    """chain -> a chain metric at its completion in the chain's own run from θ0 (failure_rate: that run's
    row, 1 when its round edit failed), over every seed's runs of a chain-unit arm. A chain drawn by two
    seeds counts once: the same chain from θ0 gives the same figure, not a second independent unit."""
    out: dict[str, float] = {}
    for results in runs:
        if UNIT not in results.columns:
            raise ValueError('a chain-unit figure needs an arm whose units are chains (units = "chains")')
        rows = chain_rows(results, metric)
        for (unit,), group in rows.group_by(UNIT, maintain_order=True):
            out.setdefault(str(unit), float(group["value"].mean()))
    return out


def chain_unit_estimate(runs: list[pl.DataFrame], metric: str) -> Estimate:
    """The mean over chains with n = chains: Wilson for 0/1 figures, else a percentile bootstrap (it
    stays within the values' range, so within the quantity's)."""
    return rate(list(chain_units(runs, metric).values()))


def chain_unit_difference(a: list[pl.DataFrame], b: list[pl.DataFrame], metric: str) -> Estimate:
    """a − b paired by chain (the control arm holds the same chains, transformed), n = chains with both:
    for 0/1 figures (FR, CS) Newcombe's paired interval, else a percentile bootstrap over chains."""
    x, y = chain_units(a, metric), chain_units(b, metric)
    pairs = [(x[k], y[k]) for k in x if k in y and not (math.isnan(x[k]) or math.isnan(y[k]))]
    if pairs and all(v in (0.0, 1.0) for pair in pairs for v in pair):
        count = lambda first, second: sum(1 for p in pairs if p == (first, second))  # noqa: E731
        low, high = newcombe_paired_difference(count(1.0, 1.0), count(1.0, 0.0), count(0.0, 1.0), count(0.0, 0.0))
        return Estimate(float(np.mean([p - q for p, q in pairs])), len(pairs), low, high, "newcombe paired")
    return rate([p - q for p, q in pairs])


def above(e: Estimate, threshold: float) -> str:
    """'yes' when the whole interval is above ``threshold``, 'no' when it is wholly at or below, else '?'."""
    if e.n is None or e.n == 0 or e.value is None or math.isnan(e.value):
        return "n/a"
    if e.low is None or e.high is None:
        return "?"
    return "yes" if e.low > threshold else "no" if e.high <= threshold else "?"


def below(e: Estimate, threshold: float) -> str:
    flipped = Estimate(-e.value, e.n, None if e.high is None else -e.high, None if e.low is None else -e.low)
    return above(flipped, -threshold)


def combine(parts: list[str]) -> str:
    """'holds' when every part says yes, 'does not hold' when any says no, else 'inconclusive'."""
    if not parts or "n/a" in parts:
        return "not run"
    if all(p == "yes" for p in parts):
        return "holds"
    if "no" in parts:
        return "does not hold"
    return "inconclusive"


def geometric(values: list[float]) -> Estimate:
    """Ratios (perplexity to θ0) over seeds: they span orders of magnitude once a model collapses, so
    the mean and its t interval are taken on their logarithms and returned as ratios (a geometric mean)."""
    logs = over_seeds([math.log(v) if v > 0 else math.nan for v in values])
    back = lambda x: None if x is None else math.exp(min(x, 700.0))  # noqa: E731
    return Estimate(
        back(logs.value) if logs.n else math.nan,
        logs.n,
        back(logs.low),
        back(logs.high),
        "t (log)" if logs.method else "",
    )


def ratio_per_seed(runs: list[pl.DataFrame], step: int | None = None) -> Estimate:
    """The geometric mean over seeds; one seed: its ratio with the interval over the corpus's chunks."""
    if len(runs) == 1:
        value, low, high = (ppl_ratio(step, m)(runs[0]) for m in ("ratio", "ratio_low", "ratio_high"))
        if not (math.isnan(low) or math.isnan(high)):
            return Estimate(value, PPL_CHUNKS, low, high, "t over chunks")
    return geometric([ppl_ratio(step)(r) for r in runs])


def chunk_nll(results: pl.DataFrame, step: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(each corpus chunk's summed NLL at ``step`` — None: the last step probed —, its tokens), in chunk
    order; None for a run from before the probe recorded chunks."""
    rows = results.filter((pl.col("probe") == "perplexity") & (pl.col("protocol") == "corpus"))
    nll = rows.filter((pl.col("metric") == "chunk_nll") & (pl.col("step") > 0))
    if step is not None:
        nll = nll.filter(pl.col("step") <= step)
    tokens = rows.filter(pl.col("metric") == "chunk_tokens")
    if not nll.height or not tokens.height:
        return None
    at = nll.filter(pl.col("step") == nll["step"].max())
    order = lambda frame: frame.sort(pl.col("edit_id").str.split(":").list.get(1).cast(pl.Int64))  # noqa: E731
    return order(at)["value"].to_numpy(), order(tokens)["value"].to_numpy()


def paired_ratio(a: list[pl.DataFrame], b: list[pl.DataFrame], step: int | None = None) -> Estimate:
    """a / b in perplexity ratio: the geometric mean over seeds of a / b (same seed, same edits), t
    interval on the log scale. One seed each: paired over the corpus's chunks (both runs read the same
    chunks, from the same θ0), the t interval of the linearised ratio of their NLL differences."""
    if len(a) == 1 and len(b) == 1:
        ca, cb = chunk_nll(a[0], step), chunk_nll(b[0], step)
        if ca is not None and cb is not None and len(ca[0]) == len(cb[0]):
            log_ratio, low, high = ratio_interval(ca[0] - cb[0], ca[1])
            if not math.isnan(low):
                return Estimate(
                    math.exp(log_ratio), len(ca[0]), math.exp(low), math.exp(high), "t over chunks (paired)"
                )
    ra, rb = [ppl_ratio(step)(r) for r in a], [ppl_ratio(step)(r) for r in b]
    return geometric([x / y for x, y in zip(ra, rb) if x > 0 and y > 0])


def paired_difference(a: list[float], b: list[float]) -> Estimate:
    """Mean over seeds of a − b (same seed, same edits), t interval cut to [−1, 1] (a difference of shares)."""
    return over_seeds([x - y for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))], bounds=(-1.0, 1.0))


def ratio_note(e: Estimate, many_seeds: str) -> str:
    """What a perplexity ratio's interval is over (``many_seeds`` where it is over seeds)."""
    if e.method.startswith("t over chunks"):
        return f"one seed: {'paired' if 'paired' in e.method else 'interval'} over the corpus's chunks"
    return many_seeds if e.method else "no interval (one seed, from before the probe recorded chunks)"
