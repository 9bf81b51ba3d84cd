"""Per-edit quality (docs/METRICS.md §2) and retention over the stream (§3).

Protocols: ``es`` / ``ps`` / ``ns`` are CounterFact's pairwise comparisons of mean
token NLL; ``exact`` is teacher-forced token exact match; ``unchanged`` asks whether
the argmax answer tokens on a neighborhood prompt are those of θ0. With the ``generation``
option, both probes also judge edits by what the model generates (``gen_exact@CONTEXT`` …,
:mod:`probes.generation`, docs/METRICS.md §6).

Superseded edits (docs/METRICS.md §3): an edit whose (subject, relation) a later edit of the stream
has changed (round-back, coverage, a newer dated fact) is no longer expected to hold. From the
step of the superseding edit on, the retention probe scores it under metric ``superseded``
(same protocols, so one can still see whether the old object lingers) instead of ``retention``:
it is neither retained nor forgotten, and leaves the retained fraction's denominator.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from probes.base import Probe, ProbeContext, Row
from probes.generation import (
    GenerationOptions,
    efficacy_generation_rows,
    identity_options,
    neighbor_reference,
    quality_generation_rows,
)
from probes.metric_table import (
    EDIT_QUALITY,
    EFFICACY,
    GEN_CONTAINS,
    GEN_EXACT,
    GENERALIZATION,
    LOCALITY,
    RETAINED_FRACTION,
    RETENTION,
    RETENTION_PROBE,
    SAMPLE_POPULATION,
    SAMPLE_SIZE,
    SUPERSEDED,
)
from streams import Edit
from streams.errors import UserError


def _efficacy_pairs(edits: Sequence[Edit]) -> list[tuple[str, str]]:
    pairs = []
    for e in edits:
        pairs.append((e.rendered_prompt, e.target_new))
        if e.target_true is not None:
            pairs.append((e.rendered_prompt, e.target_true))
    return pairs


def efficacy_rows(probe: str, metric: str, ctx: ProbeContext, edits: Sequence[Edit]) -> list[Row]:
    """ES (new target beats the old one) and exact match of the new target, per edit."""
    scores = ctx.scorer.score(_efficacy_pairs(edits))
    rows, j = [], 0
    for e in edits:
        nll_new, exact_new = scores.nll[j], scores.exact[j]
        j += 1
        if e.target_true is not None:
            rows.append(Row(probe, metric, "es", float(nll_new < scores.nll[j]), e.id))
            j += 1
        rows.append(Row(probe, metric, "exact", float(exact_new), e.id))
    return rows


@dataclass
class EditQualityOptions(GenerationOptions):
    def __post_init__(self):
        self.check_generation(EDIT_QUALITY)


GO = TypeVar("GO", bound=GenerationOptions)


class _GenerationOptionsProbe(Probe[GO]):
    def config(self) -> dict:
        out = super().config()
        options = identity_options(out.pop("options", {}))
        return {**out, "options": options} if options else out


class EditQualityProbe(_GenerationOptionsProbe[EditQualityOptions]):
    """Efficacy, generalization and locality of each edit, right after its own step."""

    name = EDIT_QUALITY
    description = (
        "efficacy (ES, exact), paraphrase generalization (PS, exact), neighborhood locality (NS, unchanged); "
        "with generation=CONTEXTS also by generated answers (gen_exact, gen_contains, gen_unchanged)"
    )
    Options = EditQualityOptions

    def prepare(self, ctx: ProbeContext):
        """θ0: each neighborhood prompt's argmax answer tokens (and generated ids, per generation
        setting), and every edit's pre-edit efficacy."""
        edits = ctx.upcoming
        neighbors = sorted({(n.prompt, n.answer) for e in edits for n in e.neighborhood})
        scores = ctx.scorer.score(neighbors)
        reference: dict = {"neighbor_argmax": {f"{p}\x1f{a}": list(t) for (p, a), t in zip(neighbors, scores.argmax)}}
        rows = efficacy_rows(self.name, EFFICACY, ctx, edits)
        settings = self.options.settings()
        if settings:
            reference["neighbor_generated"] = neighbor_reference(self.name, ctx, settings)
            rows += efficacy_generation_rows(self.name, EFFICACY, ctx, edits, settings)
        return reference, rows

    def measure(self, ctx: ProbeContext) -> list[Row]:
        edits = ctx.batch
        rows = efficacy_rows(self.name, EFFICACY, ctx, edits)
        para = [(p, e.target_new) for e in edits for p in e.paraphrases]
        para += [(p, e.target_true) for e in edits if e.target_true is not None for p in e.paraphrases]
        neigh = [(n.prompt, n.answer) for e in edits for n in e.neighborhood]
        neigh += [(n.prompt, e.target_new) for e in edits for n in e.neighborhood]
        scores = ctx.scorer.score(para + neigh)
        lookup = dict(zip(para + neigh, zip(scores.nll, scores.exact, scores.argmax)))
        ref = ctx.reference.get("neighbor_argmax", {})
        for e in edits:
            if e.paraphrases:
                exact = [lookup[(p, e.target_new)][1] for p in e.paraphrases]
                rows.append(Row(self.name, GENERALIZATION, "exact", float(np.mean(exact)), e.id))
                if e.target_true is not None:
                    wins = [lookup[(p, e.target_new)][0] < lookup[(p, e.target_true)][0] for p in e.paraphrases]
                    rows.append(Row(self.name, GENERALIZATION, "ps", float(np.mean(wins)), e.id))
            if e.neighborhood:
                keeps = [lookup[(n.prompt, n.answer)][0] < lookup[(n.prompt, e.target_new)][0] for n in e.neighborhood]
                rows.append(Row(self.name, LOCALITY, "ns", float(np.mean(keeps)), e.id))
                same = [
                    list(lookup[(n.prompt, n.answer)][2]) == ref.get(f"{n.prompt}\x1f{n.answer}")
                    for n in e.neighborhood
                ]
                rows.append(Row(self.name, LOCALITY, "unchanged", float(np.mean(same)), e.id))
        settings = self.options.settings()
        if settings:
            reference = ctx.reference.get("neighbor_generated", {})
            rows += quality_generation_rows(self.name, ctx, edits, settings, reference)
        return rows


@dataclass
class RetentionOptions(GenerationOptions):
    # Probe a seeded panel of past edits: an edit belongs to it when a hash of (seed, edit id)
    # falls below this fraction, so the panel is the same at every probed step and grows with
    # the stream; 1.0 probes every edit so far. Entries probed are exact, the rest are absent.
    fraction: float = 1.0  # in (0, 1]
    seed: int = 0  # the panel's and the sample's hash seed: another seed draws other edits
    # Cap on the past edits scored per probed step, so a long stream's probe cost stays bounded:
    # beyond it, the `sample` panel edits of smallest hash rank (stable from step to step) are
    # scored and the retained fraction is an estimate (its n and the edits it is drawn from are
    # rows too; the summary gives a 95% Wilson interval). Default 500: exact up to 500 edits.
    # ≥ 1, or none: no cap.
    sample: int | None = 500
    # Cap on the edits whose answers are generated per probed step (generation costs up to
    # max_new_tokens decoding steps per edit): the generation_sample edits of smallest hash rank,
    # a subset of the teacher-forced sample (≥ 1). none: the same edits as `sample`.
    generation_sample: int | None = None

    def __post_init__(self):
        self.check_generation(RETENTION_PROBE)
        if self.generation_sample is not None and self.generation_sample < 1:
            raise UserError(f"retention: generation_sample must be at least 1 (or none), got {self.generation_sample}")
        if not 0.0 < self.fraction <= 1.0:
            raise UserError(f"retention: fraction must be in (0, 1], got {self.fraction}")
        if self.sample is not None and self.sample < 1:
            raise UserError(f"retention: sample must be at least 1 (or none), got {self.sample}")


@functools.lru_cache(maxsize=1 << 16)
def panel_rank(edit_id: str, seed: int) -> float:
    """The edit's seeded hash rank in [0, 1): uniform over ids, the same in every run."""
    digest = hashlib.sha256(f"{seed}:{edit_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def in_panel(edit_id: str, fraction: float, seed: int) -> bool:
    """Whether ``edit_id`` is in the seeded panel of the given fraction (stable across runs)."""
    return fraction >= 1.0 or panel_rank(edit_id, seed) < fraction


def capped(edits: Sequence[Edit], sample: int | None, seed: int) -> list[Edit]:
    """At most ``sample`` of ``edits`` (in their order): those of smallest hash rank. A simple random
    sample without replacement, and stable as the stream grows: an edit leaves it only when a newer
    one of smaller rank takes its place (or it is superseded), and comes back only if a superseded
    edit frees a place."""
    if sample is None or len(edits) <= sample:
        return list(edits)
    keep = {e.id for e in heapq.nsmallest(sample, edits, key=lambda e: (panel_rank(e.id, seed), e.id))}
    return [e for e in edits if e.id in keep]


def superseded_ids(edits: Sequence[Edit]) -> set[str]:
    """Ids of the edits (in stream order) whose (subject, relation) a later one of them edits again."""
    seen: dict[tuple[str, str], str] = {}
    out: set[str] = set()
    for e in edits:
        key = (e.subject, e.relation_id)
        if key in seen:
            out.add(seen[key])
        seen[key] = e.id
    return out


class RetentionProbe(_GenerationOptionsProbe[RetentionOptions]):
    """Row t of the retention matrix: every edit made so far (or a seeded panel of them), scored after step t."""

    name = RETENTION_PROBE
    description = (
        "efficacy of every edit so far (ES, exact) and the retained fraction, on a schedule; "
        "edits superseded by a later edit of their subject and relation reported apart; "
        "with generation=CONTEXTS also by generated answers (gen_exact, gen_contains)"
    )
    Options = RetentionOptions

    def measure(self, ctx: ProbeContext) -> list[Row]:
        opts = self.options
        opts.__post_init__()  # options built in code rather than from the command line
        so_far = [e for _, e in ctx.edits_so_far()]
        replaced = superseded_ids(so_far)  # over every edit so far: the superseding one may be off the panel
        panel = [e for e in so_far if in_panel(e.id, opts.fraction, opts.seed)]
        live = [e for e in panel if e.id not in replaced]
        eligible = [e for e in so_far if e.id not in replaced]
        old = [e for e in panel if e.id in replaced]
        rows = efficacy_rows(self.name, RETENTION, ctx, capped(live, opts.sample, opts.seed))
        rows += efficacy_rows(self.name, SUPERSEDED, ctx, capped(old, opts.sample, opts.seed))
        settings = opts.settings()
        protocols = ["es", "exact"] + [s.protocol(score) for s in settings for score in (GEN_EXACT, GEN_CONTAINS)]
        if settings:
            # The smallest-rank edits of the same panel: a subset of the teacher-forced sample.
            cap = min(x for x in (opts.sample, opts.generation_sample, len(so_far)) if x is not None)
            rows += efficacy_generation_rows(self.name, RETENTION, ctx, capped(live, cap, opts.seed), settings)
            rows += efficacy_generation_rows(self.name, SUPERSEDED, ctx, capped(old, cap, opts.seed), settings)
        for protocol in protocols:
            values = [r.value for r in rows if r.protocol == protocol and r.metric == RETENTION]
            if values:
                rows.append(Row(self.name, RETAINED_FRACTION, protocol, float(np.mean(values))))
            # The edits the fraction estimates over (ES needs an old target to compare with).
            population = sum(protocol != "es" or e.target_true is not None for e in eligible)
            if values and len(values) < population:  # a sample: say so, with its n and what it is drawn from
                rows.append(Row(self.name, SAMPLE_SIZE, protocol, float(len(values))))
                rows.append(Row(self.name, SAMPLE_POPULATION, protocol, float(population)))
        return rows
