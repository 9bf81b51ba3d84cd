"""Weight drift (docs/METRICS.md §5): how far the editor's scope parameters have moved from θ0."""

from __future__ import annotations

import torch

from probes.base import NoOptions, Probe, ProbeContext, Row
from probes.metric_table import FROBENIUS, RELATIVE, TOUCHED, WEIGHT_DRIFT


class WeightDriftProbe(Probe[NoOptions]):
    """‖W_t − W_0‖_F and entries changed, per scope parameter (edit_id = parameter name) and in total."""

    name = WEIGHT_DRIFT
    description = "Frobenius norm of W_t - W_0 per edited matrix, relative norm, and parameters touched (entries != θ0)"
    default_schedule = "every:1"

    def measure(self, ctx: ProbeContext) -> list[Row]:
        params = ctx.scorer.weights()
        rows, total_sq, total_touched = [], 0.0, 0
        with torch.no_grad():
            for name in sorted(ctx.base_params):
                base = ctx.base_params[name]
                diff = params[name].detach().to(base.device, torch.float64) - base.double()
                norm = float(torch.linalg.vector_norm(diff))
                touched = int(torch.count_nonzero(diff))
                base_norm = float(torch.linalg.vector_norm(base.double()))
                total_sq += norm * norm
                total_touched += touched
                rows += [
                    Row(self.name, FROBENIUS, "per_matrix", norm, name),
                    Row(self.name, RELATIVE, "per_matrix", norm / base_norm if base_norm else float("nan"), name),
                    Row(self.name, TOUCHED, "per_matrix", float(touched), name),
                ]
        rows += [
            Row(self.name, FROBENIUS, "total", total_sq**0.5),
            Row(self.name, TOUCHED, "total", float(total_touched)),
        ]
        return rows
