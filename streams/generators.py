"""Chain generators: round edits, coverage and reverse conflicts, laid out in a stream.

Generators turn facts (a :class:`~streams.facts.FactSet` or a list of
:class:`~streams.facts.Fact`) into *chains*: tuples of edits, in the order
they must be applied, each carrying a :class:`~streams.edit.ChainLink`.
:func:`layout` then interleaves chains with unrelated plain edits so that a
chain's consecutive edits are ``gap`` plain edits apart, and gives every edit
a timestamp (given, regular, or Poisson with a seed). Chains are built with
placeholder timestamps; only :func:`layout` fixes time.

Composite conflicts need a rule ``r_t ∧ r1 → r2`` that fact sets do not
describe: :func:`composite_chains` takes the rules as an argument (the Pitfalls
data has its own, read by ``streams.readers.read_pitfalls_conflict``).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import numpy as np

from .edit import UTC, ChainLink, Edit, to_utc
from .facts import Fact, FactSet, Relation
from .stream import EditStream

Chain = tuple[Edit, ...]
_EPOCH = datetime.datetime(2024, 1, 1, tzinfo=UTC)


def _facts(facts: FactSet | Iterable[Fact]) -> list[Fact]:
    return list(facts.facts) if isinstance(facts, FactSet) else list(facts)


def _edit(fact: Fact, edit_id: str, old: str | None, new: str, chain: ChainLink) -> Edit:
    return replace(fact.to_edit(_EPOCH), id=edit_id, target_true=old, target_new=new, chain=chain)


def _other_objects(fact: Fact, exclude: Sequence[str], n: int, rng: np.random.Generator) -> list[str] | None:
    """n distinct candidates of the fact's relation not in ``exclude`` (seeded), or None if too few."""
    pool = [c for c in fact.relation.candidates if c not in exclude]
    if len(pool) < n:
        return None
    return [pool[j] for j in rng.permutation(len(pool))[:n]]


def plain_edits(facts: FactSet | Iterable[Fact], prefix: str = "plain") -> list[Chain]:
    """Each fact as a one-edit chain ``<prefix>-<fact id>`` with role ``plain``."""
    out: list[Chain] = []
    for f in _facts(facts):
        cid = f"{prefix}-{f.id}"
        out.append((_edit(f, cid, f.target_true, f.target_new, ChainLink(cid, "plain")),))
    return out


ROUND_OBJ = ("true", "relation")  # Obj of a generated round chain: true objects of (s, r) (Pitfalls), or the old rule


def round_chains(
    facts: FactSet | Iterable[Fact], k: int = 1, seed: int = 0, prefix: str = "round", obj: str = "true"
) -> list[Chain]:
    """Round edits o → o1* → … → ok* → o, one chain per fact.

    o1* is the fact's ``target_new``; for k > 1 the further ok* are distinct
    candidates of the relation drawn with ``seed`` (never a true object of the
    subject). Every edit that moves away from o has role ``round-out``; the
    final return to o is ``round-back``. Facts whose relation has too few
    candidates for k new objects are left out (see :func:`round_chains_report`).

    Each edit's ``candidates`` hold Obj followed by the chain's new objects, as
    the Pitfalls reader lays them out; the chain probe's Obj is ``candidates``
    without the new objects. ``obj="true"`` (default, as Pitfalls RoundEdit):
    Obj = the true objects of (s, r), o first — every fact in ``facts`` with the
    same subject and relation adds its ``target_true`` (a 1-to-N relation); with
    one fact per (s, r), Obj = {o} and the probe reports no distortion or ignore
    rate for the chain. ``obj="relation"`` (the former rule, not Pitfalls'): Obj =
    o and the relation's other candidates, which are false objects of s.
    """
    return round_chains_report(facts, k, seed, prefix, obj)[0]


def round_chains_report(
    facts: FactSet | Iterable[Fact], k: int = 1, seed: int = 0, prefix: str = "round", obj: str = "true"
) -> tuple[list[Chain], list[tuple[str, str]]]:
    """:func:`round_chains` plus the (fact id, reason) of facts left out."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if obj not in ROUND_OBJ:
        raise ValueError(f"obj must be 'true' or 'relation', got {obj!r}")
    rng = np.random.default_rng(seed)
    facts = _facts(facts)
    trues: dict[tuple[str, str], list[str]] = {}
    for f in facts:
        trues.setdefault((f.subject, f.relation.id), []).append(f.target_true)
    chains, left = [], []
    for f in facts:
        true_objects = list(dict.fromkeys([f.target_true, *trues[(f.subject, f.relation.id)]]))
        if f.target_new in true_objects:
            left.append((f.id, f"target_new {f.target_new!r} is a true object of ({f.subject!r}, {f.relation.id!r})"))
            continue
        extra = _other_objects(f, (*true_objects, f.target_new), k - 1, rng)
        if extra is None:
            left.append((f.id, f"relation {f.relation.id!r} has too few candidates for a {k}-round edit"))
            continue
        new = [f.target_new, *extra]
        base = true_objects if obj == "true" else [f.target_true, *f.relation.candidates]
        candidates = tuple(dict.fromkeys([*(c for c in base if c not in new), *new]))
        cid = f"{prefix}-{f.id}"
        path = [f.target_true, *new, f.target_true]
        edits = []
        for j in range(len(path) - 1):
            role = "round-back" if j == len(path) - 2 else "round-out"
            edit = _edit(f, f"{cid}-{j}", path[j], path[j + 1], ChainLink(cid, role))
            edits.append(replace(edit, candidates=candidates))
        chains.append(tuple(edits))
    return chains, left


def coverage_chains(facts: FactSet | Iterable[Fact], seed: int = 0, prefix: str = "coverage") -> list[Chain]:
    """Coverage conflicts: the same (s, r) edited twice, o → o1* (``conflict-e1``) → o2* (``conflict-e2``).

    o1* is the fact's ``target_new``; o2* another candidate drawn with ``seed``.
    Facts whose relation has fewer than 3 candidates are left out.
    """
    rng = np.random.default_rng(seed)
    chains: list[Chain] = []
    for f in _facts(facts):
        extra = _other_objects(f, (f.target_true, f.target_new), 1, rng)
        if extra is None:
            continue
        cid = f"{prefix}-{f.id}"
        chains.append(
            (
                _edit(f, f"{cid}-e1", f.target_true, f.target_new, ChainLink(cid, "conflict-e1")),
                _edit(f, f"{cid}-e2", f.target_new, extra[0], ChainLink(cid, "conflict-e2")),
            )
        )
    return chains


def reverse_chains(
    facts: FactSet | Iterable[Fact],
    inverse: Mapping[str, str],
    relations: Mapping | None = None,
    seed: int = 0,
    prefix: str = "reverse",
) -> list[Chain]:
    """Reverse conflicts where the fact set has an inverse relation.

    e1 = (s1, r1: o1 → o1*), e2 = (o1*, r2 = inverse[r1]: s1 → o2*) with o2* a
    candidate of r2 other than s1, drawn with ``seed``. ``relations`` (id ->
    Relation; a FactSet's ``relations`` by default) supplies r2's template.
    Facts whose relation has no inverse, or whose inverse has no usable
    candidate, are left out.
    """
    if relations is None:
        if not isinstance(facts, FactSet):
            raise ValueError("pass relations= (id -> Relation) when facts is not a FactSet")
        relations = facts.relations
    rng = np.random.default_rng(seed)
    chains: list[Chain] = []
    for f in _facts(facts):
        r2 = relations.get(inverse.get(f.relation.id, ""))
        if r2 is None:
            continue
        pool = [c for c in r2.candidates if c not in (f.subject, f.target_new)]
        if not pool:
            continue
        o2_new = pool[int(rng.integers(len(pool)))]
        cid = f"{prefix}-{f.id}"
        e1 = _edit(f, f"{cid}-e1", f.target_true, f.target_new, ChainLink(cid, "conflict-e1"))
        e2 = _second_edit(cid, f.target_new, r2, new=o2_new, old=f.subject)
        chains.append((e1, e2))
    return chains


def _second_edit(cid: str, subject: str, relation: Relation, *, new: str, old: str) -> Edit:
    """A conflict chain's e2: ``relation``(``subject``) from ``old`` to ``new``, on the relation's own prompts."""
    return Edit(
        id=f"{cid}-e2",
        timestamp=_EPOCH,
        subject=subject,
        relation_id=relation.id,
        prompt=relation.template,
        target_new=new,
        target_true=old,
        paraphrases=tuple(p.replace("{}", subject) for p in relation.paraphrases),
        candidates=relation.candidates,
        chain=ChainLink(cid, "conflict-e2"),
    )


def composite_chains(
    facts: FactSet | Iterable[Fact],
    rules: Sequence[tuple[str, str, str]],
    relations: Mapping | None = None,
    seed: int = 0,
    prefix: str = "composite",
) -> list[Chain]:
    """Composite conflicts from rules ``(r_t, r1, r2)`` meaning r_t(s) = x ∧ r1(x) = y → r2(s) = y.

    For a tied fact k_f = (s, r_t, x) and a fact (x, r1, y) of the set: e1 = (x, r1: y → y*) with
    y* its ``target_new``, e2 = (s, r2: y* → o2*) with o2* a candidate of r2 other than y and y*
    (drawn with ``seed``); the chain is (k_f as a ``tied-fact`` record, e1, e2). A replay probes
    k_f and never applies it. ``relations`` (id -> Relation; a FactSet's by default) gives r2.
    """
    if relations is None:
        if not isinstance(facts, FactSet):
            raise ValueError("pass relations= (id -> Relation) when facts is not a FactSet")
        relations = facts.relations
    rng = np.random.default_rng(seed)
    items = _facts(facts)
    by_subject: dict[tuple[str, str], Fact] = {(f.subject, f.relation.id): f for f in items}
    chains: list[Chain] = []
    for r_t, r1, r2_id in rules:
        r2 = relations.get(r2_id)
        if r2 is None:
            raise ValueError(f"rule {r_t} & {r1} -> {r2_id}: relation {r2_id!r} is not in relations")
        for tied in (f for f in items if f.relation.id == r_t):
            f1 = by_subject.get((tied.target_true, r1))
            if f1 is None:
                continue
            pool = [c for c in r2.candidates if c not in (f1.target_true, f1.target_new)]
            if not pool:
                continue
            o2_new = pool[int(rng.integers(len(pool)))]
            cid = f"{prefix}-{tied.id}-{f1.id}"
            kf = _edit(tied, f"{cid}-tied", None, tied.target_true, ChainLink(cid, "tied-fact"))
            e1 = _edit(f1, f"{cid}-e1", f1.target_true, f1.target_new, ChainLink(cid, "conflict-e1"))
            e2 = _second_edit(cid, tied.subject, r2, new=o2_new, old=f1.target_new)
            chains.append((kf, e1, e2))
    return chains


def multihop_chains(facts: FactSet | Iterable[Fact], prefix: str = "multihop") -> list[Chain]:
    """Two-hop chains, MQuAKE-style: (s, r1: x → x*) then (x*, r2: y → y*), for facts (s, r1, x) and
    (x*, r2, y) of the set, so the two-hop answer r2(r1(s)) becomes y*. Both edits have role
    ``multi-hop``; chain ``<prefix>-<first fact id>-<second fact id>``.
    """
    items = _facts(facts)
    by_subject: dict[str, list[Fact]] = {}
    for f in items:
        by_subject.setdefault(f.subject, []).append(f)
    chains: list[Chain] = []
    for f1 in items:
        for f2 in by_subject.get(f1.target_new, []):
            cid = f"{prefix}-{f1.id}-{f2.id}"
            chains.append(
                (
                    _edit(f1, f"{cid}-0", f1.target_true, f1.target_new, ChainLink(cid, "multi-hop")),
                    _edit(f2, f"{cid}-1", f2.target_true, f2.target_new, ChainLink(cid, "multi-hop")),
                )
            )
    return chains


def chains_of(stream: Iterable[Edit]) -> list[Chain]:
    """A stream's edits grouped into chains (by chain id, in stream order; an edit without a chain is
    a chain of its own), e.g. to lay dataset chains out again with :func:`layout`."""
    groups: dict[str, list[Edit]] = {}
    for e in stream:
        key = e.chain.chain_id if e.chain is not None else f"\x00{e.id}"
        groups.setdefault(key, []).append(e)
    return [tuple(g) for g in groups.values()]


def timestamps(
    n: int,
    mode: str = "regular",
    *,
    start: datetime.datetime = _EPOCH,
    interval: datetime.timedelta = datetime.timedelta(days=1),
    seed: int = 0,
) -> list[datetime.datetime]:
    """n increasing UTC timestamps from ``start``.

    ``"regular"``: start, start + interval, …; ``"poisson"``: a Poisson process
    with mean gap ``interval`` (exponential gaps drawn with ``seed``; the first
    edit at ``start``).
    """
    start = to_utc(start)
    if mode == "regular":
        return [start + i * interval for i in range(n)]
    if mode == "poisson":
        if interval <= datetime.timedelta(0):
            raise ValueError("a Poisson process needs a positive mean interval")
        gaps = np.random.default_rng(seed).exponential(interval.total_seconds(), size=max(n - 1, 0))
        offsets = np.concatenate([[0.0], np.cumsum(gaps)])
        return [start + datetime.timedelta(seconds=float(s)) for s in offsets[:n]]
    raise ValueError(f"mode must be 'regular' or 'poisson', got {mode!r}")


def layout(
    chains: Sequence[Chain],
    fillers: Sequence[Chain | Edit] = (),
    *,
    gap: int | tuple[int, int] = 0,
    between: int = 0,
    seed: int = 0,
    times: str | Sequence[datetime.datetime] = "regular",
    start: datetime.datetime = _EPOCH,
    interval: datetime.timedelta = datetime.timedelta(days=1),
    name: str = "generated",
) -> EditStream:
    """Chains, one after another, with ``gap`` filler edits between a chain's consecutive
    edits (so gap=0: adjacent steps; gap=99: 100 steps apart) and ``between``
    fillers between chains; leftover fillers go at the end.

    ``gap`` may be ``(lo, hi)``: each gap drawn uniformly in [lo, hi] with
    ``seed``. Fillers are plain edits (e.g. :func:`plain_edits`), used in order;
    too few raise ``ValueError``. ``times``: ``"regular"``, ``"poisson"``
    (see :func:`timestamps`) or an explicit list of one timestamp per edit.
    Every edit is its own step (timestamps strictly increase).
    """
    rng = np.random.default_rng(seed)
    pool = [e for item in fillers for e in ((item,) if isinstance(item, Edit) else item)]
    used = 0

    def take(k: int) -> list[Edit]:
        nonlocal used
        if used + k > len(pool):
            raise ValueError(f"not enough filler edits: need at least {used + k}, have {len(pool)}")
        out = pool[used : used + k]
        used += k
        return out

    def draw_gap() -> int:
        if isinstance(gap, tuple):
            lo, hi = gap
            if not 0 <= lo <= hi:
                raise ValueError(f"gap range must satisfy 0 <= lo <= hi, got {gap}")
            return int(rng.integers(lo, hi + 1))
        if gap < 0:
            raise ValueError(f"gap must be >= 0, got {gap}")
        return int(gap)

    order: list[Edit] = []
    for c, chain in enumerate(chains):
        if c and between:
            order.extend(take(between))
        for j, edit in enumerate(chain):
            if j:
                order.extend(take(draw_gap()))
            order.append(edit)
    order.extend(pool[used:])

    if isinstance(times, str):
        stamps = timestamps(len(order), times, start=start, interval=interval, seed=seed)
    else:
        stamps = [to_utc(t) for t in times]
        if len(stamps) != len(order):
            raise ValueError(f"got {len(stamps)} timestamps for {len(order)} edits")
        if any(b <= a for a, b in zip(stamps, stamps[1:])):
            raise ValueError("given timestamps must strictly increase")
    return EditStream([replace(e, timestamp=t) for e, t in zip(order, stamps)], name=name)


__all__ = [
    "Chain",
    "ROUND_OBJ",
    "chains_of",
    "plain_edits",
    "round_chains",
    "round_chains_report",
    "coverage_chains",
    "reverse_chains",
    "composite_chains",
    "multihop_chains",
    "timestamps",
    "layout",
]
