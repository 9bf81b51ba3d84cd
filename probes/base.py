"""Probe contract, schedules and suites.

A probe measures the live model after a stream step and returns result rows. Before
the first edit, each probe may :meth:`Probe.prepare` reference values on θ0 (kept
for the whole run, so they are computed once) and rows for step 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

from probes.scorer import Scorer
from streams import Edit


@dataclass(frozen=True)
class Row:
    """One measurement; the engine adds run_id, step and timestamp."""

    probe: str
    metric: str
    protocol: str
    value: float
    edit_id: str | None = None


@dataclass
class ProbeContext:
    """What a probe sees after step ``step``."""

    step: int
    timestamp: datetime | None
    batch: tuple[Edit, ...]  # edits applied at this step (empty at step 0)
    history: list[tuple[Edit, ...]]  # batches of steps 1..step (history[k-1] is step k)
    scorer: Scorer
    reference: dict[str, Any] = field(default_factory=dict)  # this probe's θ0 values
    upcoming: tuple[Edit, ...] = ()  # at step 0: every edit of the run, for θ0 references
    is_last: bool = False

    def edits_so_far(self) -> list[tuple[int, Edit]]:
        return [(k, e) for k, batch in enumerate(self.history, start=1) for e in batch]


class Schedule:
    """When a probe runs: ``every:K``, ``log`` (steps 1, 2, 4, 8, ...), or ``end``; always at the last step."""

    def __init__(self, spec: str = "every:1"):
        kind, _, arg = spec.partition(":")
        if kind == "every" and arg.isdigit() and int(arg) >= 1:
            self.every = int(arg)
        elif kind in ("log", "end") and not arg:
            self.every = None
        else:
            raise ValueError(f"unknown probe schedule '{spec}': expected every:K (K >= 1), log or end")
        self.kind, self.spec = kind, spec

    def due(self, step: int, is_last: bool) -> bool:
        if is_last:
            return True
        if self.kind == "every":
            return step % self.every == 0
        if self.kind == "log":
            return step >= 1 and math.log2(step).is_integer()
        return False

    def __repr__(self) -> str:
        return f"Schedule({self.spec!r})"


class Probe:
    """Base class: subclasses set ``name`` and implement ``measure`` (and ``prepare`` if they need θ0)."""

    name: str = "probe"
    description: str = ""

    def __init__(self, schedule: Schedule | str = "every:1"):
        self.schedule = schedule if isinstance(schedule, Schedule) else Schedule(schedule)

    def prepare(self, ctx: ProbeContext) -> tuple[dict[str, Any], list[Row]]:
        """θ0 reference values (JSON-able) and step-0 rows; runs once, before any edit."""
        return {}, []

    def measure(self, ctx: ProbeContext) -> list[Row]:
        raise NotImplementedError

    def config(self) -> dict:
        return {"name": self.name, "schedule": self.schedule.spec}


class ProbeSuite:
    """Runs a list of probes, each on its own schedule."""

    def __init__(self, probes: Sequence[Probe]):
        self.probes = list(probes)

    def prepare(self, ctx: ProbeContext) -> tuple[dict[str, dict], list[Row]]:
        references, rows = {}, []
        for probe in self.probes:
            ref, probe_rows = probe.prepare(ctx)
            references[probe.name] = ref
            rows.extend(probe_rows)
        return references, rows

    def run(self, ctx: ProbeContext, references: dict[str, dict]) -> list[Row]:
        rows = []
        for probe in self.probes:
            if probe.schedule.due(ctx.step, ctx.is_last):
                ctx.reference = references.get(probe.name, {})
                rows.extend(probe.measure(ctx))
        return rows

    def config(self) -> list[dict]:
        return [p.config() for p in self.probes]
