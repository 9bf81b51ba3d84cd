"""Probe contract, schedules and suites.

A probe measures the live model after a stream step and returns result rows. Before
the first edit, each probe may :meth:`Probe.prepare` reference values on θ0 (kept
for the whole run, so they are computed once) and rows for step 0.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Sequence

import polars as pl

from lifelong.core.scorer import Scorer
from lifelong.core.stats import Line, plain_line, rate_line
from streams import Edit
from streams.errors import UserError

UNBOUNDED = (-math.inf, math.inf)


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
    scorer: Scorer  # the one handle on the model: score, generate, rolling_nll, weights
    reference: dict[str, Any] = field(default_factory=dict)  # this probe's θ0 values
    upcoming: tuple[Edit, ...] = ()  # at step 0: every edit of the run, for θ0 references
    is_last: bool = False
    # θ0 values of the parameters the editor may change (weight drift, conflict magnitude).
    base_params: dict[str, Any] = field(default_factory=dict)
    # model_at(k): a context manager that puts the live model (weights and editor state) as it
    # was right after step k, and restores the current step bitwise on exit.
    model_at: Callable[[int], AbstractContextManager] | None = None
    # Every step of the run (steps[k-1] is step k), so probes can tell where chains end.
    steps: Sequence[tuple[Edit, ...]] = ()
    # Records held for probing only, never applied (e.g. composite conflicts' tied facts).
    facts: tuple[Edit, ...] = ()
    # chain_ends(steps), computed once per run by the caller; None: computed here from ``steps``.
    chain_end_steps: dict[int, list[str]] | None = None

    def edits_so_far(self) -> list[tuple[int, Edit]]:
        return [(k, e) for k, batch in enumerate(self.history, start=1) for e in batch]

    def completing_chains(self) -> list[str]:
        """Ids of the chains (of two or more edits) whose last edit is applied at this step."""
        if self.step <= 0:
            return []
        if self.chain_end_steps is None:
            self.chain_end_steps = chain_ends(self.steps)
        return self.chain_end_steps.get(self.step, [])

    def at_step(self, k: int) -> AbstractContextManager:
        """The live model as it was after step ``k`` for the duration of a ``with`` block."""
        if k == self.step:
            return nullcontext()
        if self.model_at is None:
            raise RuntimeError(f"this probe context cannot check out step {k} (no delta store attached)")
        return self.model_at(k)


def chain_ends(steps: Sequence[tuple[Edit, ...]]) -> dict[int, list[str]]:
    """step -> ids of the chains of two or more edits whose last edit lands at that step."""
    last: dict[str, int] = {}
    size: dict[str, int] = {}
    for k, batch in enumerate(steps, start=1):
        for e in batch:
            if e.chain is not None and e.chain.role != "tied-fact":
                last[e.chain.chain_id] = k
                size[e.chain.chain_id] = size.get(e.chain.chain_id, 0) + 1
    ends: dict[int, list[str]] = {}
    for cid, k in last.items():
        if size[cid] >= 2:
            ends.setdefault(k, []).append(cid)
    return ends


class Schedule:
    """When a probe runs: ``every:K``, ``log`` (steps 1, 2, 4, 8, ...), ``end``, or ``chains`` (steps where
    a chain's last edit is applied); always at the last step."""

    def __init__(self, spec: str = "every:1"):
        kind, _, arg = spec.partition(":")
        self.every: int | None  # the period; set for kind "every" only
        if kind == "every" and arg.isdigit() and int(arg) >= 1:
            self.every = int(arg)
        elif kind in ("log", "end", "chains") and not arg:
            self.every = None
        else:
            raise UserError(f"unknown probe schedule '{spec}': expected every:K (K >= 1), log, end or chains")
        self.kind, self.spec = kind, spec

    def due(self, step: int, is_last: bool, ctx: ProbeContext | None = None) -> bool:
        if is_last:
            return True
        if self.kind == "chains":
            return ctx is not None and bool(ctx.completing_chains())
        if self.kind == "every":
            assert self.every is not None
            return step % self.every == 0
        if self.kind == "log":
            return step >= 1 and math.log2(step).is_integer()
        return False

    def __repr__(self) -> str:
        return f"Schedule({self.spec!r})"


@dataclass
class NoOptions:
    """Options of a probe that takes none."""


class Probe:
    """Base class: subclasses set ``name`` and implement ``measure`` (and ``prepare`` if they need θ0).

    A probe with settings declares them as the dataclass ``Options`` (typed, with defaults);
    ``--probe name:key=value,...`` on the command line fills it (see :func:`probes.make_probe`).
    """

    name: str = "probe"
    description: str = ""
    Options: type = NoOptions
    default_schedule: str = "every:1"
    source: str | None = None  # how a probe not built in was named (entry point or module:Class)
    # The metrics this probe writes, each with its range and meaning (probes.metric_table.Metric). The
    # built-in probes' are in metric_table.METRICS; a probe of your own declares its own here, and
    # `lifelong show` and the dashboard read ranges and meanings from it.
    metrics: tuple = ()

    def __init__(self, schedule: Schedule | str | None = None, options=None):
        schedule = self.default_schedule if schedule is None else schedule
        self.schedule = schedule if isinstance(schedule, Schedule) else Schedule(schedule)
        self.options = options if options is not None else self.Options()

    def prepare(self, ctx: ProbeContext) -> tuple[dict[str, Any], list[Row]]:
        """θ0 reference values (JSON-able) and step-0 rows; runs once, before any edit."""
        return {}, []

    def measure(self, ctx: ProbeContext) -> list[Row]:
        raise NotImplementedError

    @classmethod
    def summary_lines(cls, rows: pl.DataFrame, reference: dict | None = None) -> list[Line]:
        """The headline figures of this probe's ``rows`` (a run's results, this probe's only) for
        ``lifelong show``: by default, each (metric, protocol) at the last step it was measured, as a rate
        with its interval over items where the rows are per item, else its value. Override to say more."""
        lines = []
        bounds = {m.name: (m.low, m.high) for m in cls.metrics}
        for (metric, protocol), group in rows.group_by(["metric", "protocol"], maintain_order=True):
            last = group.filter(pl.col("step") == group["step"].max())
            measure = f"{cls.name}: {metric} at last step"
            if last["edit_id"].null_count() < last.height:
                line = rate_line(measure, str(protocol), last["value"].to_numpy())
                lines.append(dataclasses.replace(line, bounds=bounds.get(str(metric), line.bounds)))
            else:
                lines.append(
                    plain_line(
                        measure,
                        str(protocol),
                        float(last["value"].to_numpy().mean()),
                        last.height,
                        bounds.get(str(metric), UNBOUNDED),
                    )
                )
        return lines

    @classmethod
    def plot_panel(cls, ax, rows: pl.DataFrame, color=None, label: str | None = None) -> None:
        """Draw this probe's ``rows`` on a dashboard panel: by default, each (metric, protocol)'s mean over
        items per step. Override for a better picture."""
        for j, ((metric, protocol), group) in enumerate(rows.group_by(["metric", "protocol"], maintain_order=True)):
            per_step = group.group_by("step").agg(pl.col("value").mean()).sort("step")
            name = f"{metric} ({protocol})"
            ax.plot(
                per_step["step"].to_numpy(),
                per_step["value"].to_numpy(),
                ["-", "--", ":", "-."][j % 4],
                marker="o",
                ms=3,
                color=color,
                label=f"{label}: {name}" if label else name,
            )
        ax.set_title(cls.description or cls.name, fontsize=9)

    def config(self) -> dict:
        out = {"name": self.name, "schedule": self.schedule.spec}
        if self.source is not None:
            out["source"] = self.source
        options = (
            dataclasses.asdict(self.options)
            if dataclasses.is_dataclass(self.options) and not isinstance(self.options, type)
            else {}
        )
        return {**out, "options": options} if options else out


def _probe_bar(due: Sequence["Probe"]):
    """A transient bar naming the probe that runs, when several are due (perplexity and downstream
    probes take minutes on a CPU); silent for one, and under --quiet (TQDM_DISABLE)."""
    from lifelong.core.bars import bar

    return bar(total=len(due), unit="probe", leave=False, show=len(due) >= 2)


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
        due = [p for p in self.probes if p.schedule.due(ctx.step, ctx.is_last, ctx)]
        bar = _probe_bar(due)
        for probe in due:
            bar.set_description_str(f"  probing {probe.name}")
            ctx.reference = references.get(probe.name, {})
            rows.extend(probe.measure(ctx))
            bar.update()
        bar.close()
        return rows

    def config(self) -> list[dict]:
        return [p.config() for p in self.probes]
