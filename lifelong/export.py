"""Exporters: a run's step-level figures streamed to an experiment tracker as the run goes, or
afterwards from its results (``lifelong export``).

One exporter is built in, TensorBoard (``pip install 'lifelong-editing[export]'``): every row that
is not about one edit (retained fraction, perplexity and its ratio, downstream scores, distortion,
weight drift, ...) becomes a scalar tagged ``probe/metric/protocol`` at its step. Per-edit rows (one
per edit and step: the retention matrix) stay in ``results.parquet``; a tracker is no place for them.
Exporters are optional and off by default; they never change what a run computes or stores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from streams.errors import UserError

EXPORT_HELP = "tensorboard:DIR (TensorBoard event files under DIR; needs the 'export' extra)"


class Exporter(Protocol):
    def write(self, step: int, rows: Iterable[dict]) -> None: ...

    def close(self) -> None: ...


def scalar_rows(rows: Iterable[dict]) -> Iterable[tuple[str, float]]:
    """(tag, value) of the rows that are about the model, not about one edit; NaN left out."""
    for row in rows:
        if row.get("edit_id"):
            continue
        value = row.get("value")
        if value is None or not math.isfinite(float(value)):
            continue
        tag = "/".join(part for part in (row["probe"], row["metric"], row.get("protocol")) if part)
        yield tag, float(value)


class TensorBoardExporter:
    """Scalars into TensorBoard event files under ``directory`` (one file per writer)."""

    def __init__(self, directory: Path | str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "the TensorBoard exporter needs the tensorboard package: pip install 'lifelong-editing[export]'"
            ) from None
        self.writer = SummaryWriter(log_dir=str(directory))

    def write(self, step: int, rows: Iterable[dict]) -> None:
        for tag, value in scalar_rows(rows):
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # a killed run loses nothing it has exported

    def close(self) -> None:
        self.writer.close()


def make_exporter(spec: str) -> Exporter:
    """An exporter from its ``--export`` spec (``tensorboard:DIR``), or a one-line refusal."""
    kind, sep, target = spec.partition(":")
    if kind == "tensorboard" and sep and target:
        return TensorBoardExporter(target)
    raise UserError(f"--export {spec!r}: expected {EXPORT_HELP}")


def check_export_spec(spec: str) -> None:
    """Refuse a malformed ``--export`` before anything is loaded (the package is checked at use)."""
    kind, sep, target = spec.partition(":")
    if not (kind == "tensorboard" and sep and target):
        raise UserError(f"--export {spec!r}: expected {EXPORT_HELP}")


def export_run(run_path: Path | str, spec: str) -> int:
    """Write a finished (or partial) run's step-level rows to an exporter; returns the rows written."""
    from lifelong.run import RunDir

    run = RunDir(run_path)
    results = run.results()
    exporter = make_exporter(spec)
    count = 0
    try:
        for step in sorted(set(results["step"].to_list())):
            rows = results.filter(results["step"] == step).to_dicts()
            exporter.write(step, rows)
            count += sum(1 for _ in scalar_rows(rows))
    finally:
        exporter.close()
    return count
