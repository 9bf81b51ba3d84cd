"""Retention metrics of docs/METRICS.md §3, derived from the result rows.

The retention matrix A[t, i] holds edit i's score after step t, at the probed steps
(NaN where not measured, including t < own step of i). Pure functions of numpy
arrays, so each can be checked against hand-worked cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from probes.metric_table import EDIT_QUALITY, EFFICACY, RETENTION, RETENTION_PROBE, SAMPLE_POPULATION, SUPERSEDED


@dataclass
class RetentionMatrix:
    steps: np.ndarray  # the probed steps, ascending
    edit_ids: list[str]  # edits in the order they were made
    own_step: np.ndarray  # the step at which each edit was made
    values: np.ndarray  # (len(steps), len(edit_ids)), NaN where not measured or superseded
    own_score: np.ndarray  # each edit's score right after its own step
    superseded: np.ndarray | None = None  # (len(steps), len(edit_ids)) bool: superseded at that step
    # Per probed step, the live edits a sampled panel was drawn from (NaN: every live edit was scored).
    # A NaN cell of a sampled step is "not in the sample", never "forgotten".
    population: np.ndarray | None = None

    @property
    def sampled(self) -> np.ndarray:
        """Per probed step, whether the retention probe scored a sample of the live edits."""
        if self.population is None:
            return np.zeros(len(self.steps), dtype=bool)
        return ~np.isnan(self.population)


def retention_matrix(results: pl.DataFrame, protocol: str = "es") -> RetentionMatrix:
    """Build A[t, i] from the ``retention`` rows and the own-step ``edit_quality`` rows; an edit's
    ``superseded`` rows (a later edit changed its subject and relation) leave A[t, i] NaN."""
    own = results.filter(
        (pl.col("probe") == EDIT_QUALITY)
        & (pl.col("metric") == EFFICACY)
        & (pl.col("protocol") == protocol)
        & (pl.col("step") > 0)
    ).sort("step", maintain_order=True)
    edit_ids = own["edit_id"].to_list()
    index = {e: i for i, e in enumerate(edit_ids)}
    probed = results.filter(
        (pl.col("probe") == RETENTION_PROBE)
        & pl.col("metric").is_in([RETENTION, SUPERSEDED])
        & (pl.col("protocol") == protocol)
    )
    steps = np.array(sorted(set(probed["step"].to_list())), dtype=int)
    row_of = {s: k for k, s in enumerate(steps)}
    values = np.full((len(steps), len(edit_ids)), np.nan)
    superseded = np.zeros((len(steps), len(edit_ids)), dtype=bool)
    for step, metric, edit_id, value in probed.select("step", "metric", "edit_id", "value").iter_rows():
        if edit_id in index:
            if metric == RETENTION:
                values[row_of[step], index[edit_id]] = value
            else:
                superseded[row_of[step], index[edit_id]] = True
    population = np.full(len(steps), np.nan)
    drawn = results.filter(
        (pl.col("probe") == RETENTION_PROBE)
        & (pl.col("metric") == SAMPLE_POPULATION)
        & (pl.col("protocol") == protocol)
    )
    for step, value in drawn.select("step", "value").iter_rows():
        if step in row_of:
            population[row_of[step]] = value
    return RetentionMatrix(
        steps=steps,
        edit_ids=edit_ids,
        own_step=own["step"].to_numpy(),
        values=values,
        own_score=own["value"].to_numpy().astype(float),
        superseded=superseded,
        population=population,
    )


def retained_fraction(values: np.ndarray) -> np.ndarray:
    """Mean over the edits made so far, per probed step (NaN for a row with none)."""
    out = np.full(values.shape[0], np.nan)
    for k, row in enumerate(values):
        if not np.all(np.isnan(row)):
            out[k] = np.nanmean(row)
    return out


def retainability(acc_first: float, acc_last: float, num_steps: int) -> float:
    """Survey definition (1/(T-1)) Σ (Acc_{i+1} - Acc_i), which telescopes to (Acc_T - Acc_1)/(T - 1).

    Acc_i is mean efficacy over all edits made so far, measured after step i. NaN for T < 2.
    """
    if num_steps < 2:
        return float("nan")
    return (acc_last - acc_first) / (num_steps - 1)


def observed(m: RetentionMatrix) -> np.ndarray:
    """Per edit, whether the probe saw it after its own step whenever it could: False for an edit left
    out of a sampled (or fractional) panel at every later probed step where it was live, so that
    forgetting shares count only edits that could have been seen forgotten. All True for a full panel."""
    later = m.steps[:, None] > m.own_step[None, :]
    live = later & ~(m.superseded if m.superseded is not None else np.zeros_like(later))
    seen = (later & ~np.isnan(m.values)).any(axis=0)
    return seen | ~live.any(axis=0)


def forgotten_at(m: RetentionMatrix) -> np.ndarray:
    """Per edit, the first probed step after its own where it fails having succeeded at its own step.

    NaN for an edit that never took hold or was never forgotten (a superseded edit is not scored, so
    it is not forgotten from the step it is superseded on).
    """
    out = np.full(len(m.edit_ids), np.nan)
    for i in range(len(m.edit_ids)):
        if m.own_score[i] != 1:
            continue
        later = (m.steps > m.own_step[i]) & (m.values[:, i] == 0)
        if later.any():
            out[i] = m.steps[np.argmax(later)]
    return out


def retention_summary(results: pl.DataFrame, protocol: str = "es") -> dict[str, float]:
    """Retained fraction at the last probed step (superseded edits left out), retainability, forgetting
    counts, and the number of edits superseded by the last probed step. With a sampled panel the
    retained fraction is the sample's estimate, and forgetting counts only edits the panel observed
    after their own step (a lower bound on the count: an edit that left the sample is not seen again)."""
    m = retention_matrix(results, protocol)
    if len(m.edit_ids) == 0:
        return {}
    frac = retained_fraction(m.values)
    last_step = int(m.own_step.max())
    acc_first = float(np.mean(m.own_score[m.own_step == m.own_step.min()]))
    acc_last = float(frac[-1]) if len(frac) and m.steps[-1] == last_step else float("nan")
    forgot = forgotten_at(m)
    took = (m.own_score == 1) & observed(m)  # an edit the panel never looked at again is not "kept"
    lag = forgot - m.own_step
    return {
        "retained_fraction": acc_last,
        "retainability": retainability(acc_first, acc_last, int(len(np.unique(m.own_step)))),
        "forgotten": float(np.sum(~np.isnan(forgot))),
        "forgotten_share": float(np.mean(~np.isnan(forgot[took]))) if took.any() else float("nan"),
        "median_steps_to_forget": float(np.nanmedian(lag)) if np.any(~np.isnan(lag)) else float("nan"),
        "superseded": float(m.superseded[-1].sum()) if m.superseded is not None and len(m.steps) else 0.0,
    }
