"""Shared by every dataset reader: ReadReport, the edit builder, default timestamps and the
small helpers that turn record fields into edit fields (skipping a unit with a reason)."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..edit import UTC, Edit, EditError, Neighbor
from ..errors import UserError
from ..stream import EditStream

DEFAULT_START = datetime.datetime(2024, 1, 1, tzinfo=UTC)
DAY = datetime.timedelta(days=1)


@dataclass
class ReadReport:
    """What a reader did: units read, used, skipped (with reasons), edits made, extras."""

    source: str
    read: int = 0
    used: int = 0
    edits: int = 0
    skipped: list[tuple[str, int | str, str]] = field(default_factory=list)
    extras: dict[str, dict] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def skip(self, file: str | os.PathLike, where: int | str, reason: str) -> None:
        self.skipped.append((os.fspath(file), where, reason))

    def summary(self) -> str:
        """One line: ``source: read N, used U, skipped S -> E edits``."""
        return f"{self.source}: read {self.read}, used {self.used}, skipped {self.n_skipped} -> {self.edits} edits"


class _Skip(Exception):
    """A unit that cannot become edits; the message is the reason."""


class _Builder:
    """Collects edits and the report; hands out regular timestamps in file order."""

    def __init__(self, source: str, start: datetime.datetime, interval: datetime.timedelta) -> None:
        self.report = ReadReport(source)
        self.edits: list[Edit] = []
        self.ids: set[str] = set()
        self.start = start if start.tzinfo else start.replace(tzinfo=UTC)
        self.interval = interval
        self.slot = 0

    def unit(self, file: Path, where: int | str, make: Callable[[], list[dict]]) -> bool:
        """Build one unit's edits (a list of Edit kwargs without timestamps/ids checks) or skip it."""
        self.report.read += 1
        try:
            specs = make()
            if not specs:
                raise _Skip("no edit in record")
            built: list[Edit] = []
            for spec in specs:
                if spec["id"] in self.ids or any(e.id == spec["id"] for e in built):
                    raise _Skip(f"duplicate edit id {spec['id']!r}")
                ts = spec.pop("timestamp", None)
                if ts is None:
                    ts = self.start + (self.slot + len(built)) * self.interval
                built.append(Edit(timestamp=ts, **spec))
        except _Skip as err:
            self.report.skip(file, where, str(err))
            return False
        except EditError as err:
            self.report.skip(file, where, f"invalid edit: {err}")
            return False
        except (KeyError, TypeError, AttributeError, IndexError) as err:
            self.report.skip(file, where, f"malformed record ({type(err).__name__}: {err})")
            return False
        self.slot += len(built)
        self.edits.extend(built)
        self.ids.update(e.id for e in built)
        self.report.used += 1
        self.report.edits += len(built)
        return True

    def result(self, name: str) -> tuple[EditStream, ReadReport]:
        return EditStream(self.edits, name=name), self.report


# -- small helpers -------------------------------------------------------------


def _load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None


def _load_list(path: Path) -> list:
    data = _load_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _text(value: Any, what: str) -> str:
    """A non-empty stripped string, or skip."""
    if not isinstance(value, str):
        raise _Skip(f"{what} is not a string ({type(value).__name__})")
    if not value.strip():
        raise _Skip(f"{what} is empty")
    return value.strip()


def _first_text(value: Any) -> str | None:
    """The first non-empty string in a string / (nested) list of aliases, else None."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list):
        for item in value:
            found = _first_text(item)
            if found:
                return found
    return None


def _template(prompt: str, subject: str) -> str:
    """A full prompt turned into a template: the first occurrence of subject -> ``{}``."""
    if "{}" in prompt:
        raise _Skip(f"prompt {prompt!r} already contains '{{}}'")
    if subject not in prompt:
        raise _Skip(f"subject {subject!r} not found in prompt {prompt!r}")
    return prompt.replace(subject, "{}", 1)


def _neighbors(items: Iterable[tuple[Any, Any]]) -> tuple[Neighbor, ...]:
    """Neighbors from (prompt, answer) pairs, leaving out pairs with no usable text."""
    out = []
    for prompt, answer in items:
        answer = _first_text(answer)
        if isinstance(prompt, str) and prompt.strip() and answer:
            out.append(Neighbor(prompt.strip(), answer))
    return tuple(out)


def _dedupe(items: Iterable[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for item in items:
        if isinstance(item, str) and item.strip():
            seen.setdefault(item.strip(), None)
    return tuple(seen)
