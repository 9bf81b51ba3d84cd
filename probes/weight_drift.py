"""Weight drift (docs/METRICS.md §5): how far the editor's scope parameters have moved from θ0,
and the collapse warning that norm growth gives before perplexity explodes (docs/PROBES.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import polars as pl
import torch

from probes.base import Probe, ProbeContext, Row
from probes.metric_table import DRIFT_WARNING, FROBENIUS, NORM_RATIO, RELATIVE, TOUCHED, WEIGHT_DRIFT
from streams.errors import UserError

# The default of ``warn_relative``: measured on the default model, docs/PROBES.md "Collapse warning".
WARN_RELATIVE = 0.5


class WeightDriftProbe(Probe["WeightDriftProbe.Options"]):
    """‖W_t − W_0‖_F, ‖W_t‖_F/‖W_0‖_F and entries changed, per scope parameter (edit_id = parameter name),
    in total, as the largest over the matrices and (relative update) summed over them; the collapse warning
    when that sum reaches ``warn_relative``."""

    name = WEIGHT_DRIFT
    description = (
        "Frobenius norm of W_t - W_0 per edited matrix, relative norm, norm ratio ||W_t||/||W_0||, parameters "
        "touched (entries != θ0), and the collapse warning (relative updates summed over matrices >= warn_relative)"
    )
    default_schedule = "every:1"

    @dataclass
    class Options:
        warn_relative: float = WARN_RELATIVE  # warn when Σ ‖W_t − W_0‖_F/‖W_0‖_F over matrices reaches this

    def __init__(self, schedule=None, options=None):
        super().__init__(schedule, options)
        tau = self.options.warn_relative
        if not tau > 0:  # the option parser refuses NaN and infinities
            raise UserError(f"weight_drift: warn_relative must be a positive number (got {tau})")

    def prepare(self, ctx: ProbeContext):
        return {"warn_relative": self.options.warn_relative}, []  # θ0 drifts by nothing: no rows at step 0

    def measure(self, ctx: ProbeContext) -> list[Row]:
        return self._rows(ctx)

    def _rows(self, ctx: ProbeContext) -> list[Row]:
        params = ctx.scorer.weights()
        rows, total_sq, total_touched = [], 0.0, 0
        # An editor that changes no weight (GRACE, WISE's side memory, in-context memory) has no matrix:
        # its weights are θ0's, so the largest ratio is 1 and the relative updates 0.
        max_ratio, max_relative, sum_relative = 1.0, 0.0, 0.0
        with torch.no_grad():
            for name in sorted(ctx.base_params):
                base = ctx.base_params[name]
                now = params[name].detach().to(base.device, torch.float64)
                diff = now - base.double()
                norm = float(torch.linalg.vector_norm(diff))
                touched = int(torch.count_nonzero(diff))
                base_norm = float(torch.linalg.vector_norm(base.double()))
                relative = norm / base_norm if base_norm else float("nan")
                ratio = float(torch.linalg.vector_norm(now)) / base_norm if base_norm else float("nan")
                total_sq += norm * norm
                total_touched += touched
                if base_norm:
                    max_ratio, max_relative = max(max_ratio, ratio), max(max_relative, relative)
                    sum_relative += relative
                rows += [
                    Row(self.name, FROBENIUS, "per_matrix", norm, name),
                    Row(self.name, RELATIVE, "per_matrix", relative, name),
                    Row(self.name, NORM_RATIO, "per_matrix", ratio, name),
                    Row(self.name, TOUCHED, "per_matrix", float(touched), name),
                ]
        return rows + [
            Row(self.name, FROBENIUS, "total", total_sq**0.5),
            Row(self.name, TOUCHED, "total", float(total_touched)),
            Row(self.name, RELATIVE, "max", max_relative),
            Row(self.name, RELATIVE, "sum", sum_relative),
            Row(self.name, NORM_RATIO, "max", max_ratio),
            Row(self.name, DRIFT_WARNING, "sum", float(sum_relative >= self.options.warn_relative)),
        ]


def warning_step(results: pl.DataFrame) -> int | None:
    """The first step at which the weight-drift probe warned of collapse (None: never, or not probed)."""
    hit = results.filter(
        (pl.col("probe") == WEIGHT_DRIFT) & (pl.col("metric") == DRIFT_WARNING) & (pl.col("value") > 0.5)
    )
    return int(cast(int, hit["step"].min())) if hit.height else None


def warning_text(step: int, relative: float, tau: float) -> str:
    """The one-line collapse warning that ``show`` and the replay's progress line print."""
    return (
        f"collapse warning: weight drift from step {step} (sum over edited matrices of ||W_t - W_0||_F / "
        f"||W_0||_F = {relative:.3g} >= {tau:g}); KN and MEND runs on the default model collapsed at or after "
        "such drift (docs/PROBES.md)"
    )
