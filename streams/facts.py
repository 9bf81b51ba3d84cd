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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from .edit import UTC, Edit, EditError, Neighbor, parse_neighbors
from .errors import UserError
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
