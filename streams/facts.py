"""The built-in fact set and the registry of named streams.

A fact set is a JSON file of relations (a prompt template, paraphrase
templates and the candidate objects) and facts (a subject, its true object,
the counterfactual object to edit in, and neighborhood prompts). Each fact
becomes one :class:`~streams.edit.Edit`. The packaged set
(``streams/data/builtin_facts.json``) gives a stream that works offline with
no downloads; ``load_stream`` resolves a stream name or a ``.jsonl`` path.

File format::

    {"name": "builtin", "description": "...",
     "relations": [{"id": "capital", "template": "The capital of {} is",
                    "paraphrases": ["{}'s capital city is"], "candidates": ["Paris", "Berlin"]}],
     "facts": [{"id": "capital-france", "subject": "France", "relation": "capital",
                "target_true": "Paris", "target_new": "Berlin",
                "neighborhood": [{"prompt": "The capital of Germany is", "answer": "Berlin"}]}]}
"""

from __future__ import annotations

import datetime
import importlib.resources
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np

from .edit import UTC, Edit, EditError, Neighbor, parse_neighbors
from .errors import MissingFileError, UserError
from .stream import EditStream

_RELATION_KEYS = {"id", "template", "paraphrases", "candidates"}
_FACT_KEYS = {"id", "subject", "relation", "target_true", "target_new", "neighborhood"}
_TOP_KEYS = {"name", "description", "relations", "facts"}


class FactSetError(UserError):
    """A fact-set file that cannot be loaded; one line naming the file and the relation or fact."""


@dataclass(frozen=True)
class Relation:
    """A relation: the prompt template (``{}`` = subject), paraphrase templates, candidate objects."""

    id: str
    template: str
    paraphrases: tuple[str, ...]
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class Fact:
    """A true fact ``(subject, relation, target_true)`` and the counterfactual ``target_new``."""

    id: str
    subject: str
    relation: Relation
    target_true: str
    target_new: str
    neighborhood: tuple[Neighbor, ...]

    def to_edit(self, timestamp: datetime.datetime) -> Edit:
        """The edit that rewrites this fact at ``timestamp``.

        Paraphrases are the relation's paraphrase templates with the subject
        filled in; candidates are the relation's candidate set; no chain.
        """
        return Edit(
            id=self.id,
            timestamp=timestamp,
            subject=self.subject,
            relation_id=self.relation.id,
            prompt=self.relation.template,
            target_new=self.target_new,
            target_true=self.target_true,
            paraphrases=tuple(p.replace("{}", self.subject) for p in self.relation.paraphrases),
            neighborhood=self.neighborhood,
            candidates=self.relation.candidates,
            chain=None,
        )


@dataclass(frozen=True)
class FactSet:
    """A named collection of relations (by id) and facts (in file order)."""

    name: str
    description: str
    relations: dict[str, Relation]
    facts: tuple[Fact, ...]


def _builtin_path() -> Path:
    return Path(str(importlib.resources.files("streams") / "data" / "builtin_facts.json"))


def load_fact_set(path: str | os.PathLike | None = None) -> FactSet:
    """Load and validate a fact-set JSON file (default: the packaged built-in set).

    Every relation and fact is checked (templates contain ``{}``, ids unique,
    the relation exists, both targets are among its candidates and differ,
    ...); the first problem raises :class:`FactSetError` naming the file and
    the relation or fact id.
    """
    path = _builtin_path() if path is None else Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise FactSetError(f"{path}: invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise FactSetError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return _parse_fact_set(data, path)


def _parse_fact_set(data: Any, path: Path) -> FactSet:
    def fail(reason: str) -> NoReturn:
        raise FactSetError(f"{path}: {reason}")

    if not isinstance(data, dict):
        fail("expected a JSON object with 'name', 'description', 'relations' and 'facts'")
    missing = sorted(_TOP_KEYS - set(data))
    if missing:
        fail(f"missing top-level field(s) {', '.join(map(repr, missing))}")
    for key in ("name", "description"):
        if not isinstance(data[key], str):
            fail(f"{key} must be a string")
    for key in ("relations", "facts"):
        if not isinstance(data[key], list) or not data[key]:
            fail(f"{key} must be a non-empty list")

    relations: dict[str, Relation] = {}
    for i, item in enumerate(data["relations"]):
        relation = _parse_relation(item, i, fail)
        if relation.id in relations:
            fail(f"relation {relation.id!r}: duplicate relation id")
        relations[relation.id] = relation

    facts: list[Fact] = []
    seen: set[str] = set()
    for i, item in enumerate(data["facts"]):
        fact = _parse_fact(item, i, relations, fail)
        if fact.id in seen:
            fail(f"fact {fact.id!r}: duplicate fact id")
        seen.add(fact.id)
        facts.append(fact)

    return FactSet(data["name"], data["description"], relations, tuple(facts))


def _check_keys(item: Any, label: str, allowed: set[str], fail: Callable[[str], NoReturn]) -> None:
    if not isinstance(item, dict):
        fail(f"{label}: expected a JSON object")
    unknown = sorted(set(item) - allowed)
    if unknown:
        fail(f"{label}: unknown field(s) {', '.join(map(repr, unknown))}")
    missing = sorted(allowed - set(item))
    if missing:
        fail(f"{label}: missing field(s) {', '.join(map(repr, missing))}")


def _strings(value: Any, label: str, field: str, fail: Callable[[str], NoReturn]) -> tuple[str, ...]:
    """A list of non-empty strings, as a tuple."""
    if not isinstance(value, list) or not all(isinstance(s, str) and s.strip() for s in value):
        fail(f"{label}: {field} must be a list of non-empty strings")
    return tuple(value)


def _parse_relation(item: Any, index: int, fail: Callable[[str], NoReturn]) -> Relation:
    rel_id = item.get("id") if isinstance(item, dict) else None
    label = f"relation {rel_id!r}" if isinstance(rel_id, str) else f"relations[{index}]"
    _check_keys(item, label, _RELATION_KEYS, fail)
    if not isinstance(rel_id, str) or not rel_id.strip():
        fail(f"{label}: id must be a non-empty string")
    template = item["template"]
    if not isinstance(template, str) or "{}" not in template:
        fail(f"{label}: template {template!r} has no '{{}}' where the subject goes")
    paraphrases = _strings(item["paraphrases"], label, "paraphrases", fail)
    for p in paraphrases:
        if "{}" not in p:
            fail(f"{label}: paraphrase {p!r} has no '{{}}' where the subject goes")
    candidates = _strings(item["candidates"], label, "candidates", fail)
    if len(set(candidates)) != len(candidates):
        fail(f"{label}: candidates contain duplicates")
    if len(candidates) < 2:
        fail(f"{label}: needs at least 2 candidates (a true and a new target)")
    return Relation(rel_id, template, paraphrases, candidates)


def _parse_fact(item: Any, index: int, relations: dict[str, Relation], fail: Callable[[str], NoReturn]) -> Fact:
    fact_id = item.get("id") if isinstance(item, dict) else None
    label = f"fact {fact_id!r}" if isinstance(fact_id, str) else f"facts[{index}]"
    _check_keys(item, label, _FACT_KEYS, fail)
    for key in ("id", "subject", "relation", "target_true", "target_new"):
        if not isinstance(item[key], str) or not item[key].strip():
            fail(f"{label}: {key} must be a non-empty string")
    relation = relations.get(item["relation"])
    if relation is None:
        fail(f"{label}: unknown relation {item['relation']!r} (known: {', '.join(relations)})")
    for key in ("target_true", "target_new"):
        if item[key] not in relation.candidates:
            fail(f"{label}: {key} {item[key]!r} is not among relation {relation.id!r}'s candidates")
    if item["target_true"] == item["target_new"]:
        fail(f"{label}: target_new equals target_true ({item['target_new']!r})")
    if not isinstance(item["neighborhood"], list):
        fail(f"{label}: neighborhood must be a list")
    neighborhood = parse_neighbors(item["neighborhood"], fail, label)
    fact = Fact(item["id"], item["subject"], relation, item["target_true"], item["target_new"], tuple(neighborhood))
    try:  # whatever else an Edit demands, refuse it here, naming the file
        fact.to_edit(datetime.datetime(2000, 1, 1, tzinfo=UTC))
    except EditError as err:
        fail(str(err))
    return fact


def builtin_stream(
    start: datetime.datetime = datetime.datetime(2024, 1, 1, tzinfo=UTC),
    interval: datetime.timedelta = datetime.timedelta(days=1),
    order_seed: int = 0,
) -> EditStream:
    """Every built-in fact as one edit, one edit per ``interval`` from ``start``.

    The facts come in a fixed seeded shuffle of the file order (``order_seed``)
    so that relations mix instead of arriving one relation at a time.
    """
    facts = load_fact_set().facts
    order = np.random.default_rng(order_seed).permutation(len(facts))
    edits = [facts[j].to_edit(start + i * interval) for i, j in enumerate(order)]
    return EditStream(edits, name="builtin")


def _chain_facts_path() -> Path:
    return Path(str(importlib.resources.files("streams") / "data" / "chain_facts.json"))


# What builtin-chains chains (fact ids of the built-in set, relation ids of chain_facts.json).
CHAIN_REVERSE_FACTS = ("capital-france", "capital-germany")  # capital's inverse is city_country
CHAIN_REVERSE_INVERSE = {"capital": "city_country"}
CHAIN_COMPOSITE_FACTS = ("city_country-madrid", "language-spain", "city_country-moscow", "language-russia")
CHAIN_COMPOSITE_RULES = (("city_country", "language", "city_language"),)  # city in x, x speaks y -> city speaks y
# Plain edits between a chain's edits, and between chains: few, so that a short run completes chains.
CHAIN_GAP, CHAIN_BETWEEN = 1, 0


def builtin_chains_stream(seed: int = 0, gap: int = CHAIN_GAP, between: int = CHAIN_BETWEEN) -> EditStream:
    """The built-in stream with round and conflict chains laid in (:func:`streams.generators.layout`).

    Round chains o → o* → o (k = 1), one per subject of ``chain_facts.json`` (its first fact; the
    subject's other facts give the further true objects, so Obj has several): five official-language
    facts and one flag colour. Conflict chains over built-in facts: two reverse (capital, whose
    inverse is city_country) and two composite (city_country ∧ language → city_language, a relation
    of ``chain_facts.json``). Kinds alternate, ``gap`` plain edits between a chain's edits and
    ``between`` between chains (a composite chain's tied-fact record, never applied, takes a
    timestamp and is followed by ``gap`` plain edits too); the plain edits are the other built-in
    facts in the ``builtin`` stream's order (those the conflicts use left out), the rest after the
    last chain. The defaults (gap 1, between 0) complete every chain by step 32, and 3 round,
    2 reverse and 1 composite chain within the 20 steps ``make demo`` replays.
    One edit per day from 2024-01-01, as ``builtin``; ``seed`` draws the conflicts' second objects.
    """
    from .generators import composite_chains, layout, reverse_chains, round_chains

    base = load_fact_set()
    extra = load_fact_set(_chain_facts_path())
    relations = {**base.relations, **extra.relations}
    by_id = {f.id: f for f in base.facts}
    firsts: dict[tuple[str, str], str] = {}  # (s, r) -> its first fact, the one chained
    for f in extra.facts:
        firsts.setdefault((f.subject, f.relation.id), f"round-{f.id}")
    rounds = [c for c in round_chains(extra, seed=seed) if c[0].chain and c[0].chain.chain_id in firsts.values()]
    reverse = reverse_chains([by_id[i] for i in CHAIN_REVERSE_FACTS], CHAIN_REVERSE_INVERSE, relations, seed=seed)
    composite = composite_chains([by_id[i] for i in CHAIN_COMPOSITE_FACTS], CHAIN_COMPOSITE_RULES, relations, seed=seed)
    conflicts = [c for pair in zip(reverse, composite) for c in pair]
    chains = [c for pair in zip(rounds, conflicts) for c in pair] + rounds[len(conflicts) :]
    used = {*CHAIN_REVERSE_FACTS, *CHAIN_COMPOSITE_FACTS}
    fillers = [e for e in builtin_stream() if e.id not in used]
    return layout(chains, fillers, gap=gap, between=between, name="builtin-chains")


STREAMS: dict[str, tuple[str, Callable[[], EditStream]]] = {
    "builtin": ("every built-in fact once, one edit per day, relations mixed (offline)", builtin_stream),
    "builtin-chains": (
        "builtin with 6 round chains over facts with several true objects and 4 conflict chains "
        "(2 reverse, 2 composite) laid in, all complete by step 32 (offline)",
        builtin_chains_stream,
    ),
}
"""Named streams: name -> (one-line description, factory)."""


DATASET_PREFIX = "dataset:"


def list_streams() -> list[tuple[str, str]]:
    """``(name, description)`` of every registered stream and readable dataset, sorted by name."""
    from .readers import DATASETS

    named = [(name, desc) for name, (desc, _) in STREAMS.items()]
    named += [(DATASET_PREFIX + name, f"read from the data directory: {rel}") for name, (rel, _) in DATASETS.items()]
    return sorted(named)


def check_stream_spec(spec: str | os.PathLike) -> None:
    """Refuse, in one line and without reading it, a stream that is not registered, a dataset that is
    unknown or absent, or a ``.jsonl`` file that does not exist."""
    spec_str = os.fspath(spec)
    if spec_str in STREAMS:
        return
    if spec_str.startswith(DATASET_PREFIX):
        from .readers import dataset_path

        dataset_path(spec_str[len(DATASET_PREFIX) :])
    elif spec_str.endswith(".jsonl"):
        if not os.path.isfile(spec_str):
            raise MissingFileError(f"stream file {spec_str} does not exist")
    else:
        raise UserError(
            f"unknown stream {spec_str!r}: expected one of {', '.join(sorted(STREAMS))}, dataset:NAME "
            "(see 'lifelong streams'), or a path to a .jsonl file"
        )


def load_stream(spec: str | os.PathLike) -> EditStream:
    """A registered stream by name, or a stream read from a ``.jsonl`` file path."""
    spec_str = os.fspath(spec)
    check_stream_spec(spec_str)
    if spec_str in STREAMS:
        return STREAMS[spec_str][1]()
    if spec_str.startswith(DATASET_PREFIX):
        from .readers import read_dataset

        stream, report = read_dataset(spec_str[len(DATASET_PREFIX) :])
        if report.skipped:  # never silently: say how many records the reader could not use
            warnings.warn(
                f"{spec_str}: {len(report.skipped)} of {report.read} records skipped "
                "(streams.readers.read_dataset lists them with reasons)",
                stacklevel=2,
            )
        return stream
    return EditStream.from_jsonl(spec_str)
