"""DyKnow: its edit requests (``editing_dataset_<model>.json``) and its dated facts
(``grc_generated.json``, ``"value |S: date |E: date"`` answers), timestamped at the dataset's own dates."""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..edit import UTC
from ..errors import UserError
from ..stream import EditStream
from .common import DAY, DEFAULT_START, ReadReport, _Builder, _dedupe, _load_json, _load_list, _Skip, _template, _text


def _wikidata_date(text: str) -> datetime.datetime:
    """A Wikidata date like ``+2021-07-06T00:00:00Z`` (month/day may be ``00``) -> aware UTC."""
    m = re.match(r"^\+?(\d{1,4})-(\d{2})-(\d{2})", text.strip())
    if not m:
        raise _Skip(f"unreadable date {text!r}")
    year, month, day = (int(g) for g in m.groups())
    try:
        return datetime.datetime(year, max(month, 1), max(day, 1), tzinfo=UTC)
    except ValueError:
        raise _Skip(f"invalid date {text!r}") from None


def _dated_values(answers: Any) -> tuple[list[tuple[datetime.datetime, str]], list[tuple[str, str]]]:
    """``"value |S: date |E: date"`` strings -> (start, value) sorted by start (stable),
    and the (answer, reason) of those that have no usable start date ``|S:``."""
    out, bad = [], []
    for a in answers or []:
        if not isinstance(a, str):
            bad.append((repr(a), "answer is not a string"))
            continue
        parts = [x.strip() for x in a.split("|")]
        value, quals = parts[0], dict(q.split(":", 1) for q in parts[1:] if ":" in q)
        if not value:
            bad.append((a, "empty value"))
        elif "S" not in quals:
            bad.append((a, "no '|S:' start date"))
        else:
            try:
                out.append((_wikidata_date(quals["S"]), value))
            except _Skip as err:
                bad.append((a, str(err)))
    return sorted(out, key=lambda x: x[0]), bad


def read_dyknow_edits(path: str | os.PathLike) -> tuple[EditStream, ReadReport]:
    """DyKnow's edit requests (``editing_dataset_<model>.json``), timestamped at the start
    date of ``target``; ``target_true`` is the value just before it in time; the
    other ``questions`` that contain no ``{}`` are paraphrases."""
    path = Path(path)
    b = _Builder(f"dyknow_{path.stem}", DEFAULT_START, DAY)
    for i, rec in enumerate(_load_list(path)):

        def make(rec=rec, i=i):
            subject = _text(rec["subject"], "subject")
            prompt = _text(rec["prompt"], "prompt")
            target = _text(rec["target"], "target")
            values, _ = _dated_values(rec.get("answers"))  # undated values cannot order the change
            idx = [k for k, (_, v) in enumerate(values) if v == target]
            if not idx:
                raise _Skip(f"target {target!r} has no dated answer")
            k = idx[-1]
            earlier = [v for _, v in values[:k] if v != target]
            questions = rec.get("questions") or {}
            return [
                dict(
                    id=f"dyknow-{i}",
                    timestamp=values[k][0],
                    subject=subject,
                    relation_id=_text(rec.get("attribute") or rec.get("domain") or "dyknow", "relation"),
                    prompt=_template(prompt, subject),
                    target_new=target,
                    target_true=earlier[-1] if earlier else None,
                    paraphrases=_dedupe(q for q in questions.values() if isinstance(q, str) and q.strip() != prompt),
                )
            ]

        b.unit(path, i, make)
    return b.result(f"dyknow_{path.stem}")


def _grc_facts(data: dict) -> Iterable[tuple[str, str, str, dict]]:
    """(domain, element, attribute, {questions, answers}) for both nesting depths."""
    for domain, elements in data.items():
        if not isinstance(elements, dict):
            continue
        for element, node in elements.items():
            if isinstance(node, dict) and "answers" in node:
                yield domain, element, domain, node
            elif isinstance(node, dict):
                for attribute, leaf in node.items():
                    yield domain, element, attribute, leaf


def read_dyknow_facts(path: str | os.PathLike) -> tuple[EditStream, ReadReport]:
    """DyKnow's dated facts (``grc_generated.json``): every change of a fact's value,
    in start-date order, is one edit (value k -> value k+1 at value k+1's start date).

    A unit is one value change; a change to the same value (a renewed term) is
    skipped with that reason. The subject is the element (country, athlete,
    company, organisation); the prompt is the first question that contains it.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected an object of domains")
    b = _Builder(f"dyknow_{path.stem}", DEFAULT_START, DAY)
    for domain, element, attribute, node in _grc_facts(data):
        key = f"{domain}/{element}" + (f"/{attribute}" if attribute != domain else "")
        try:
            if not isinstance(node, dict):
                raise _Skip("fact is not an object")
            values, bad = _dated_values(node.get("answers"))
            questions = [q for q in (node.get("questions") or {}).values() if isinstance(q, str)]
            prompt = next((q for q in questions if element in q), None)
            if prompt is None:
                raise _Skip(f"subject {element!r} not found in any question")
        except _Skip as err:
            b.report.read += 1
            b.report.skip(path, key, str(err))
            continue
        for raw, reason in bad:  # an undated value is a unit of its own, skipped
            b.report.read += 1
            b.report.skip(path, f"{key}:{raw}", reason)
        others = _dedupe(q for q in questions if q != prompt)
        for k in range(1, len(values)):
            (_, old), (ts, new) = values[k - 1], values[k]

            def make(old=old, new=new, ts=ts, k=k):
                if old == new:
                    raise _Skip(f"value {new!r} unchanged (renewed term)")
                return [
                    dict(
                        id=f"dyknow-{key}#{k}",
                        timestamp=ts,
                        subject=element,
                        relation_id=attribute,
                        prompt=_template(prompt, element),
                        target_new=new,
                        target_true=old,
                        paraphrases=others,
                    )
                ]

            b.unit(path, f"{key}#{k}", make)
    return b.result(f"dyknow_{path.stem}")
