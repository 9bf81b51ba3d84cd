"""95% intervals for the rates the summary and comparison report (docs/METRICS.md §3: every rate with its n).

- Means of 0/1 outcomes over items: Wilson score interval (good coverage at small n and near 0 or 1,
  where the normal approximation fails); with a finite-population correction where the items are a
  sample of a known, finite set (a sampled retention panel).
- Means of continuous per-item values: percentile bootstrap over items, seeded, so the same table
  always prints the same interval.
- Means over seeds (one value per run of one configuration): Student t interval, n = seeds.
- Difference of two rates measured on separate item samples: Newcombe's hybrid score interval.
- A ratio of sums over clusters (a corpus's mean token NLL over its chunks): t interval of the
  linearised ratio estimator, n = clusters.

Which kind a set of values is gets decided from the values themselves: all in {0, 1} means Wilson.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A figure with its n and interval; ``method`` names how the interval was made ('' for none)."""

    value: float
    n: int | None = None
    low: float | None = None
    high: float | None = None
    method: str = ""


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def wilson(successes: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion successes/n."""
    if n <= 0:
        return (math.nan, math.nan)
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact at the ends, not float noise
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return (low, high)


def sampled_wilson(successes: float, n: int, population: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson interval of a population's share from a simple random sample of n of its ``population``
    items (without replacement): the finite-population correction scales the variance by
    (N − n)/(N − 1), i.e. Wilson at the effective size n (N − 1)/(N − n). Matters here: a retention
    panel of 500 out of 1,000 edits has an interval ~30% narrower than plain Wilson's; n = N is exact."""
    if n <= 0:
        return (math.nan, math.nan)
    if n >= population:
        return (successes / n, successes / n)
    effective = n * (population - 1) / (population - n)
    share = min(max(successes / n, 0.0), 1.0)
    return wilson(effective if share == 1 else share * effective, effective, confidence)


def bootstrap_mean(
    values, resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over items; NaN for fewer than two items."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return (float(low), float(high))


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student t interval of the mean (for means over seeds); NaN for fewer than two values."""
    from scipy.stats import t

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (math.nan, math.nan)
    half = float(t.ppf(0.5 + confidence / 2, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    mean = float(x.mean())
    return (mean - half, mean + half)


def mover_difference(
    a: float, a_low: float, a_high: float, b: float, b_low: float, b_high: float
) -> tuple[float, float]:
    """Interval of a − b from each estimate's own interval (MOVER: Zou & Donner 2008), for estimates
    from independent samples (Newcombe's interval is MOVER over two Wilson intervals)."""
    d = a - b
    return (d - math.sqrt((a - a_low) ** 2 + (b_high - b) ** 2), d + math.sqrt((a_high - a) ** 2 + (b - b_low) ** 2))


def newcombe_difference(k1: float, n1: int, k2: float, n2: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) of k1/n1 − k2/n2 for two independent samples:
    MOVER over the two Wilson intervals."""
    if n1 <= 0 or n2 <= 0:
        return (math.nan, math.nan)
    return mover_difference(k1 / n1, *wilson(k1, n1, confidence), k2 / n2, *wilson(k2, n2, confidence))


def newcombe_paired_difference(
    both: int, first_only: int, second_only: int, neither: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Newcombe's interval (1998, method 10: Wilson margins, square and add, with the phi correction) for the
    difference p1 − p2 of two proportions measured on the same units: ``both`` units with 1 in both
    measurements, ``first_only``/``second_only`` with 1 in one, ``neither``. It stays within [−1, 1] and,
    unlike a bootstrap, is not zero-width when every pair agrees."""
    n = both + first_only + second_only + neither
    if n <= 0:
        return (math.nan, math.nan)
    p1, p2 = (both + first_only) / n, (both + second_only) / n
    l1, u1 = wilson(both + first_only, n, confidence)
    l2, u2 = wilson(both + second_only, n, confidence)
    margins = (both + first_only) * (second_only + neither) * (both + second_only) * (first_only + neither)
    agreement = both * neither - first_only * second_only
    corrected = agreement - n / 2 if agreement > n / 2 else agreement if agreement < 0 else 0.0
    phi = corrected / math.sqrt(margins) if margins > 0 else 0.0
    below = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    above = math.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    return (max(p1 - p2 - below, -1.0), min(p1 - p2 + above, 1.0))


def ratio_interval(totals, counts, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Σ totals / Σ counts over n clusters (chunks of a corpus: each its summed token NLL and its token
    count) with a t interval over the clusters, n − 1 degrees of freedom. The standard error is the
    linearised ratio estimator's, sqrt(n/(n−1) Σ (t_c − r·c_c)²) / Σ c_c; with equal counts it is the
    t interval of the clusters' means. NaN bounds for fewer than two clusters."""
    from scipy.stats import t

    x, c = np.asarray(totals, dtype=float), np.asarray(counts, dtype=float)
    if not len(x) or c.sum() <= 0:
        return (math.nan, math.nan, math.nan)
    r = float(x.sum() / c.sum())
    if len(x) < 2:
        return (r, math.nan, math.nan)
    n = len(x)
    se = math.sqrt(n / (n - 1) * float(((x - r * c) ** 2).sum())) / float(c.sum())
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * se
    return (r, r - half, r + half)


def is_binary(values) -> bool:
    x = np.asarray(values, dtype=float)
    return bool(len(x)) and bool(np.all((x == 0) | (x == 1)))


def rate(values, seed: int = 0) -> Estimate:
    """The mean of per-item values with n and a 95% interval: Wilson for 0/1 outcomes, else a bootstrap.

    NaN items (not measured) are left out of n."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if not len(x):
        return Estimate(math.nan, 0)
    if is_binary(x):
        low, high = wilson(float(x.sum()), len(x))
        return Estimate(float(x.mean()), len(x), low, high, "wilson")
    low, high = bootstrap_mean(x, seed=seed)
    return Estimate(float(x.mean()), len(x), _num(low), _num(high), "bootstrap" if len(x) > 1 else "")


def over_seeds(values, bounds: tuple[float, float] = (-math.inf, math.inf)) -> Estimate:
    """Mean over seeds (one figure per run) with a t interval, n = seeds with a figure. The interval is cut
    to the quantity's range ``bounds`` (a mean cannot leave it, so the cut interval covers it as often)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[~np.isnan(x)]
    if not len(x):
        return Estimate(math.nan, 0)
    low, high = t_interval(x)
    if len(x) > 1:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Estimate(float(x.mean()), len(x), _num(low), _num(high), "t" if len(x) > 1 else "")


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


def format_estimate(e: Estimate) -> str:
    """``0.85 [0.74, 0.92] n=40``; ``n/a`` for a missing figure; the interval left out when there is none."""
    if e.value is None or math.isnan(e.value):
        text = "n/a"
    else:
        text = "0" if abs(e.value) < 1e-12 else f"{e.value:.4g}"
    if e.low is not None and e.high is not None and not (math.isnan(e.low) or math.isnan(e.high)):
        text += f" [{_short(e.low)}, {_short(e.high)}]"
    if e.n is not None:
        text += f" n={e.n}"
    return text


def _short(x: float) -> str:
    x = 0.0 if abs(x) < 1e-12 else x  # float noise around zero
    return f"{x:.3f}" if x == 0 or 0.001 <= abs(x) < 10 else f"{x:.4g}"


# ---------------------------------------------------------------------- headline figures


@dataclass
class Line:
    """One headline figure of a run (``lifelong show``); ``items`` holds its per-item values where it is a
    mean over items (for pooling over seeds). Probes make them too (:meth:`probes.Probe.summary_lines`)."""

    measure: str
    protocol: str
    estimate: Estimate
    items: np.ndarray | None = None
    bounds: tuple[float, float] = (-math.inf, math.inf)  # the quantity's range: no interval leaves it


SHARE = (0.0, 1.0)
NON_NEGATIVE = (0.0, math.inf)


def rate_line(measure: str, protocol: str, values) -> Line:
    items = np.asarray(values, dtype=float)
    return Line(measure, protocol, rate(items), items[~np.isnan(items)], SHARE)


def plain_line(
    measure: str, protocol: str, value: float, n: int | None = None, bounds: tuple[float, float] = (-math.inf, math.inf)
) -> Line:
    return Line(measure, protocol, Estimate(float(value), n), bounds=bounds)
