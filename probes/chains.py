"""Chain probes (docs/METRICS.md §4): round edits and conflicting edits, measured when a chain completes.

A chain completes at the step where its last edit is applied. Then, per chain:

* round chains (``round-out`` … ``round-back``): ``round_success``, ``distortion_js`` (textbook JS
  in nats), ``distortion_js_pitfalls`` (the Pitfalls code's variant), ``ignore_rate``; plus a
  run-level ``failure_rate`` (edit_id None) over every round chain completed so far;
* conflict chains (``conflict-e1`` then ``conflict-e2``): ``conflict_score_explicit``,
  ``conflict_score_implicit`` (reverse and composite only), ``conflict_magnitude`` (θm, the model
  right after e1, checked out of the delta store when not remembered), ``tied_fact_damage``
  (composite chains whose tied fact the stream holds as a ``tied-fact`` record; its protocol adds
  the reference model, ``;ref=theta0`` (default, as the Pitfalls code's ``summarize.py``) or
  ``;ref=thetam`` (the model right after e1, as the paper's equation); option ``tfd_ref``).

P_θ(o | s, r) is the mean of p_θ(o | x) over the edit's prompt and paraphrases, with p (option
``prob``) the Pitfalls code's ``meantok`` = exp(−mean token NLL) of the answer (default; its
``test_batch_prediction``), or ``seq`` = the whole answer's probability (product of its token
probabilities, a named variant that is not Pitfalls'). Rows carry protocol ``completion;p=KIND``
at the completion step and ``later;p=KIND`` when re-measured (option ``remeasure``); edit_id is
the chain id. The θ0 values (Obj distributions, tied facts) are
computed in :meth:`ChainProbe.prepare` and kept in the run's reference file.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from probes import distortion as dm
from probes.base import Probe, ProbeContext, Row
from probes.metric_table import (
    CHAINS,
    CONFLICT_MAGNITUDE,
    CONFLICT_SCORE_EXPLICIT,
    CONFLICT_SCORE_IMPLICIT,
    DISTORTION_JS,
    DISTORTION_JS_PITFALLS,
    FAILURE_RATE,
    IGNORE_RATE,
    ROUND_SUCCESS,
    TIED_FACT_DAMAGE,
)
from streams import Edit
from streams.errors import UserError

Query = tuple[tuple[str, ...], str]  # (prompts, answer): P = mean over prompts of p(answer | prompt)

PROB_KINDS = ("meantok", "seq")  # exp(-mean token NLL) (Pitfalls), whole-answer probability
PROB_ALIASES = {"token": "meantok", "sequence": "seq"}  # the names these options had before
TFD_REFS = ("theta0", "thetam")  # tied-fact damage's reference model: θ0 (Pitfalls code), θm (paper's equation)


def chain_protocol(when: str, prob: str) -> str:
    """Row protocol: when the chain is measured (``completion`` / ``later``) and the p used."""
    return f"{when};p={prob}"


def tfd_protocol(protocol: str, ref: str) -> str:
    """A tied-fact damage row's protocol: the chain protocol plus its reference model, ``;ref=theta0|thetam``."""
    return f"{protocol};ref={ref}"


def protocol_when(protocol: str) -> str:
    """``completion`` or ``later`` from a chain row's protocol (old runs wrote it bare)."""
    return protocol.split(";", 1)[0]


@dataclass
class ChainOptions:
    """``remeasure``: re-measure completed chains every K steps after completion and at the last
    step (0: never); ``ir_threshold``: FR counts round chains with IR above it; ``prob``:
    ``meantok`` (per-token geometric mean exp(-mean NLL), as the Pitfalls code) or ``seq`` (the
    whole answer's probability); ``token`` / ``sequence`` are read as these; ``tfd_ref``: the
    reference of tied-fact damage, ``theta0`` (the Pitfalls code's ``summarize.py``: (P_θ0 − P_θb) /
    P_θ0, default), ``thetam`` (the model right after e1, as the paper's equation) or ``both``."""

    # re-measure completed chains every K steps after completion and at the last step (≥ 0; 0: never)
    remeasure: int = 0
    ir_threshold: float = 0.5  # FR counts round chains whose ignore rate is above this (in [0, 1])
    # meantok: per-token geometric mean exp(-mean NLL), as the Pitfalls code; seq: the whole answer's
    # probability (token and sequence are read as these)
    prob: str = "meantok"
    # tied-fact damage's reference: theta0 (the Pitfalls code's summarize.py, default), thetam (the
    # model right after e1, the paper's equation) or both
    tfd_ref: str = "theta0"

    def __post_init__(self):
        if self.remeasure < 0:
            raise UserError(f"chains.remeasure must be >= 0, got {self.remeasure}")
        if not 0 <= self.ir_threshold <= 1:
            raise UserError(f"chains.ir_threshold must be in [0, 1], got {self.ir_threshold}")
        self.prob = PROB_ALIASES.get(self.prob, self.prob)
        if self.prob not in PROB_KINDS:
            raise UserError(f"chains.prob must be 'meantok' or 'seq', got {self.prob!r}")
        if self.tfd_ref not in (*TFD_REFS, "both"):
            raise UserError(f"chains.tfd_ref must be 'theta0', 'thetam' or 'both', got {self.tfd_ref!r}")

    @property
    def tfd_refs(self) -> tuple[str, ...]:
        return TFD_REFS if self.tfd_ref == "both" else (self.tfd_ref,)


@dataclass(frozen=True)
class RoundPlan:
    """A round chain o → o1* → … → o*, back to o: a = the last round-out step, b = the round-back step."""

    chain_id: str
    prompts: tuple[str, ...]
    o: str
    o_new: str
    objects: tuple[str, ...]  # Obj: o first, the chain's new objects left out
    anchor_step: int
    end_step: int

    def anchor_queries(self) -> list[Query]:
        return [(self.prompts, self.o), (self.prompts, self.o_new)]

    def queries(self) -> list[Query]:
        return [(self.prompts, o) for o in (*self.objects, self.o_new)]


@dataclass(frozen=True)
class ConflictPlan:
    """e1 = (s1, r1: o1 → o1*) at step m, e2 = (s2, r2: o2 → o2*) at step b; kind from their shape."""

    chain_id: str
    kind: str  # reverse, composite, coverage, or conflict (none of these)
    e1: Query  # (s1, r1) prompts with o1*
    e2: Query  # (s2, r2) prompts with o2*
    implied: Query | None
    tied: Query | None
    anchor_step: int
    end_step: int

    def anchor_queries(self) -> list[Query]:
        return [self.e1] + ([self.tied] if self.tied is not None else [])  # θm: CM, and TFD with ref=thetam

    def queries(self) -> list[Query]:
        return [q for q in (self.e1, self.e2, self.implied, self.tied) if q is not None]


Plan = RoundPlan | ConflictPlan


def prompt_set(edit: Edit) -> tuple[str, ...]:
    """Π(s, r): the rendered relation prompt and its paraphrases, without repeats."""
    return tuple(dict.fromkeys((edit.rendered_prompt, *edit.paraphrases)))


def _with_subject(edit: Edit, subject: str) -> tuple[str, ...]:
    """Π(subject, r) from ``edit``'s templates: paraphrases are re-aimed where they name its subject."""
    prompts = [edit.prompt.replace("{}", subject)]
    prompts += [p.replace(edit.subject, subject) for p in edit.paraphrases if edit.subject in p]
    return tuple(dict.fromkeys(prompts))


def chain_plans(steps: Sequence[tuple[Edit, ...]], facts: Sequence[Edit] = ()) -> dict[str, Plan]:
    """The round and conflict chains whose edits all lie in ``steps``; other chains are left out."""
    members: dict[str, list[tuple[int, Edit]]] = defaultdict(list)
    for k, batch in enumerate(steps, start=1):
        for e in batch:
            if e.chain is not None:
                members[e.chain.chain_id].append((k, e))
    tied = {f.chain.chain_id: f for f in facts if f.chain is not None and f.chain.role == "tied-fact"}
    plans: dict[str, Plan] = {}
    for cid, items in members.items():
        roles = [e.chain.role for _, e in items if e.chain is not None]  # all of them: grouped by chain
        if roles[-1] == "round-back" and len(roles) >= 2 and set(roles[:-1]) == {"round-out"}:
            plans[cid] = _round_plan(cid, items)
        elif roles == ["conflict-e1", "conflict-e2"]:
            plans[cid] = _conflict_plan(cid, items, tied.get(cid))
    return plans


def _round_plan(cid: str, items: list[tuple[int, Edit]]) -> RoundPlan:
    (b, back), outs = items[-1], items[:-1]
    a, last_out = outs[-1]
    first = outs[0][1]
    o = back.target_new
    new = {e.target_new for _, e in outs}
    objects = tuple(dict.fromkeys([o, *(c for c in first.candidates if c not in new)]))
    return RoundPlan(cid, prompt_set(first), o, last_out.target_new, objects, a, b)


def _conflict_plan(cid: str, items: list[tuple[int, Edit]], tied: Edit | None) -> ConflictPlan:
    (m, e1), (b, e2) = items
    implied = None
    if tied is not None:
        kind = "composite"  # rule r_t ∧ r1 → r2: e2's new object is implied for (s1, r1)
        implied = (prompt_set(e1), e2.target_new)
    elif e1.subject == e2.subject and e1.relation_id == e2.relation_id:
        kind = "coverage"
    elif e2.subject == e1.target_new and e2.target_true == e1.subject:
        kind = "reverse"  # o1* under subject o2* and r1
        implied = (_with_subject(e1, e2.target_new), e1.target_new)
    else:
        kind = "conflict"
    tied_q = (prompt_set(tied), tied.target_new) if tied is not None else None
    return ConflictPlan(
        cid, kind, (prompt_set(e1), e1.target_new), (prompt_set(e2), e2.target_new), implied, tied_q, m, b
    )


class ChainProbe(Probe[ChainOptions]):
    """Round-edit success, distortion, ignore/failure rate, conflict score and magnitude, tied-fact damage."""

    name = CHAINS
    description = (
        "round success, distortion (JS nats; Pitfalls variant), ignore/failure rate, conflict score "
        "(explicit, implicit), conflict magnitude, tied-fact damage, when a chain completes"
    )
    Options = ChainOptions

    def __init__(self, schedule=None, options=None):
        super().__init__(schedule, options)
        self._plans_key: tuple | None = None
        self._plans: dict[str, Plan] = {}
        self._anchors: dict[str, dict[Query, float]] = {}  # θa / θm values seen live at the anchor step
        self._ir: dict[str, float] = {}  # completion IR of each round chain, for FR

    # -- plumbing ---------------------------------------------------------------------

    def plans(self, ctx: ProbeContext) -> dict[str, Plan]:
        key = (id(ctx.steps), len(ctx.steps), tuple(f.id for f in ctx.facts))
        if key != self._plans_key:
            self._plans, self._plans_key = chain_plans(ctx.steps, ctx.facts), key
            self._anchors, self._ir = {}, {}
        return self._plans

    def _p(self, scores, j: int) -> float:
        return float(np.exp(scores.logprob[j]) if self.options.prob == "seq" else np.exp(-scores.nll[j]))

    def score_queries(self, ctx: ProbeContext, queries: Sequence[Query]) -> dict[Query, float]:
        """P for each query on the live model, all prompts in one scorer call."""
        queries = list(dict.fromkeys(queries))
        pairs = [(p, ans) for prompts, ans in queries for p in prompts]
        scores = ctx.scorer.score(pairs)
        out, j = {}, 0
        for prompts, ans in queries:
            out[(prompts, ans)] = float(np.mean([self._p(scores, j + i) for i in range(len(prompts))]))
            j += len(prompts)
        return out

    def _at(self, ctx: ProbeContext, wanted: dict[int, list[Query]]) -> dict[int, dict[Query, float]]:
        """Query values at earlier steps, one checkout per step."""
        out = {}
        for k, queries in sorted(wanted.items()):
            with ctx.at_step(k):
                out[k] = self.score_queries(ctx, queries)
        return out

    # -- probe contract ---------------------------------------------------------------

    def prepare(self, ctx: ProbeContext):
        """θ0: P of every object in each round chain's Obj, and of each tied fact."""
        plans = self.plans(ctx)
        rounds = [p for p in plans.values() if isinstance(p, RoundPlan)]
        tied = [(p.chain_id, p.tied) for p in plans.values() if isinstance(p, ConflictPlan) and p.tied is not None]
        values = self.score_queries(ctx, [q for p in rounds for q in p.queries()] + [q for _, q in tied])
        reference = {
            "round_p0": {p.chain_id: [values[(p.prompts, o)] for o in p.objects] for p in rounds},
            "tied_p0": {cid: values[q] for cid, q in tied},
        }
        return reference, []

    def measure(self, ctx: ProbeContext) -> list[Row]:
        plans = self.plans(ctx)
        t, every = ctx.step, self.options.remeasure
        anchoring = [p for p in plans.values() if p.anchor_step == t < p.end_step]
        completing = [p for p in plans.values() if p.end_step == t]
        later = [
            p for p in plans.values() if p.end_step < t and every and ((t - p.end_step) % every == 0 or ctx.is_last)
        ]
        if not (anchoring or completing or later):
            return []
        live = self.score_queries(
            ctx,
            [q for p in anchoring for q in p.anchor_queries()] + [q for p in completing + later for q in p.queries()],
        )
        for p in anchoring:
            self._anchors[p.chain_id] = {q: live[q] for q in p.anchor_queries()}
        anchors = self._anchor_values(ctx, completing + later, live)
        rows = []
        for when, group in (("completion", completing), ("later", later)):
            protocol = chain_protocol(when, self.options.prob)
            irs = []
            for p in group:
                prow, ir = self._rows(ctx, p, live, anchors[p.chain_id], protocol)
                rows += prow
                if ir is not None:
                    irs.append((p.chain_id, ir))
            if when == "completion":
                self._ir.update(irs)
                if any(isinstance(p, RoundPlan) for p in group):
                    done = [p for p in plans.values() if isinstance(p, RoundPlan) and p.end_step <= t]
                    rows.append(self._failure_rate(ctx, done, protocol))
            elif any(isinstance(p, RoundPlan) for p in group):
                rows.append(
                    Row(
                        self.name,
                        FAILURE_RATE,
                        protocol,
                        dm.failure_rate([v for _, v in irs], self.options.ir_threshold),
                    )
                )
        return rows

    def _anchor_values(self, ctx: ProbeContext, plans: Sequence[Plan], live) -> dict[str, dict[Query, float]]:
        """θa / θm values: remembered from the anchor step, read live when it is now, else checked out."""
        out: dict[str, dict[Query, float]] = {}
        wanted: defaultdict[int, list[Query]] = defaultdict(list)
        for p in plans:
            if p.anchor_step == ctx.step:
                out[p.chain_id] = {q: live[q] for q in p.anchor_queries()}
            elif p.chain_id in self._anchors:
                out[p.chain_id] = self._anchors[p.chain_id]
            else:  # resumed run, or a schedule that skipped the anchor step
                wanted[p.anchor_step] += p.anchor_queries()
        for k, values in self._at(ctx, wanted).items():
            for p in plans:
                if p.anchor_step == k and p.chain_id not in out:
                    out[p.chain_id] = self._anchors[p.chain_id] = {q: values[q] for q in p.anchor_queries()}
        return out

    def _failure_rate(self, ctx: ProbeContext, done: list[RoundPlan], protocol: str) -> Row:
        """FR over every round chain completed so far, from its completion IR (recomputed if forgotten)."""
        missing: defaultdict[int, list[Query]] = defaultdict(list)
        for p in done:
            if p.chain_id not in self._ir:
                missing[p.end_step] += p.queries()
        for k, values in self._at(ctx, missing).items():
            for p in done:
                if p.end_step == k and p.chain_id not in self._ir:
                    self._ir[p.chain_id] = self._ignore_rate(ctx, p, values)
        irs = [self._ir[p.chain_id] for p in done]
        return Row(self.name, FAILURE_RATE, protocol, dm.failure_rate(irs, self.options.ir_threshold))

    def _ignore_rate(self, ctx: ProbeContext, p: RoundPlan, now) -> float:
        p0 = ctx.reference["round_p0"][p.chain_id]
        return dm.ignore_rate(p0[1:], [now[(p.prompts, o)] for o in p.objects[1:]])

    def _rows(self, ctx: ProbeContext, p: Plan, now, anchor, protocol: str) -> tuple[list[Row], float | None]:
        def row(metric, value):
            return Row(self.name, metric, protocol, float(value), p.chain_id)

        rows = []
        if isinstance(p, RoundPlan):
            (q_o, q_new) = p.anchor_queries()
            rows.append(row(ROUND_SUCCESS, dm.round_success(anchor[q_o], anchor[q_new], now[q_o], now[q_new])))
            if len(p.objects) < 2:  # Obj = {o}: q is a point mass, D and IR say nothing
                return rows, None
            p0 = ctx.reference["round_p0"][p.chain_id]
            pb = [now[(p.prompts, o)] for o in p.objects]
            if sum(p0) > 0 and sum(pb) > 0:
                rows.append(row(DISTORTION_JS, dm.js_divergence(pb, p0)))
                rows.append(row(DISTORTION_JS_PITFALLS, dm.js_pitfalls(pb, p0)))
            ir = self._ignore_rate(ctx, p, now)
            rows.append(row(IGNORE_RATE, ir))
            return rows, ir
        e1_now = now[p.e1]
        rows.append(row(CONFLICT_SCORE_EXPLICIT, dm.conflict_score_explicit(now[p.e2], e1_now)))
        if p.implied is not None:
            rows.append(row(CONFLICT_SCORE_IMPLICIT, dm.conflict_score_implicit(now[p.implied], e1_now)))
        if anchor[p.e1] > 0:
            rows.append(row(CONFLICT_MAGNITUDE, dm.conflict_magnitude(anchor[p.e1], e1_now)))
        if p.tied is not None:
            refs = {"theta0": ctx.reference.get("tied_p0", {}).get(p.chain_id), "thetam": anchor.get(p.tied)}
            for ref in self.options.tfd_refs:
                p_ref = refs[ref]
                if p_ref is not None and p_ref > 0:
                    rows.append(
                        Row(
                            self.name,
                            TIED_FACT_DAMAGE,
                            tfd_protocol(protocol, ref),
                            float(dm.tied_fact_damage(p_ref, now[p.tied])),
                            p.chain_id,
                        )
                    )
        return rows, None


def chain_kinds(steps: Sequence[tuple[Edit, ...]], facts: Sequence[Edit] = ()) -> dict[str, str]:
    """chain id -> ``round`` or the conflict kind, for the chains the probe measures."""
    return {cid: ("round" if isinstance(p, RoundPlan) else p.kind) for cid, p in chain_plans(steps, facts).items()}


__all__ = [
    "ChainOptions",
    "ChainProbe",
    "ConflictPlan",
    "PROB_KINDS",
    "RoundPlan",
    "chain_kinds",
    "chain_plans",
    "TFD_REFS",
    "chain_protocol",
    "prompt_set",
    "protocol_when",
    "tfd_protocol",
]
