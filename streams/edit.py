"""One knowledge edit: the record every editor, probe and stream file agrees on.

An :class:`Edit` asks the model to answer ``target_new`` (instead of
``target_true``) when it sees ``prompt`` with ``subject`` filled in. It also
carries what probes need to judge the edit: paraphrases (does the edit
generalise?), neighborhood prompts with their true answers (did it spill over?),
the relation's candidate objects (for ranking metrics) and, for edits that belong
to a chain (round edits, conflicts, multi-hop), the chain link.

Edits are immutable and validated when constructed, so a bad record is refused
where it enters the program, with a one-line message that names its source.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from .errors import UserError

ROLES = ("plain", "round-out", "round-back", "conflict-e1", "conflict-e2", "tied-fact", "multi-hop")
"""Roles an edit can play in a chain (see :class:`ChainLink`)."""

UTC = datetime.timezone.utc

_REQUIRED_FIELDS = ("id", "timestamp", "subject", "relation_id", "prompt", "target_new")
_OPTIONAL_FIELDS = ("target_true", "paraphrases", "neighborhood", "candidates", "chain")


class EditError(UserError):
    """A record that cannot be an edit; the message is one line and names the edit."""


def _is_blank(value: str) -> bool:
    return not value.strip()


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True)
class Neighbor:
    """A neighborhood prompt (subject already filled in) with its true answer.

    The edit should leave these answers alone; probes check that it did.
    """

    prompt: str
    answer: str

    def __post_init__(self) -> None:
        for field in ("prompt", "answer"):
            value = getattr(self, field)
            if not isinstance(value, str):
                raise EditError(f"neighbor {field} must be a string, got {_type_name(value)}")
            if _is_blank(value):
                raise EditError(f"neighbor {field} is empty")


@dataclass(frozen=True)
class ChainLink:
    """Membership of an edit in a chain: which chain, and the edit's role in it.

    Chains tie edits whose effects must be read together, e.g. a round edit
    (``round-out`` then ``round-back``) or two conflicting edits.
    """

    chain_id: str
    role: str

    def __post_init__(self) -> None:
        if not isinstance(self.chain_id, str) or _is_blank(self.chain_id):
            raise EditError("chain id is empty")
        if self.role not in ROLES:
            raise EditError(f"chain role {self.role!r} is not one of {', '.join(ROLES)}")


def to_utc(ts: datetime.datetime) -> datetime.datetime:
    """Return ``ts`` as an aware UTC datetime; a naive datetime is taken to be UTC."""
    if ts.tzinfo is None or ts.utcoffset() is None:
        return ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC)


def parse_timestamp(text: str) -> datetime.datetime:
    """Parse an ISO 8601 timestamp (``Z``, an offset, or a plain date) to aware UTC.

    Raises ``ValueError`` if ``text`` is not ISO 8601.
    """
    text = text.strip()
    if text[-1:] in ("Z", "z"):  # Python 3.10's fromisoformat does not know 'Z'
        text = text[:-1] + "+00:00"
    if len(text) == 10:  # a plain date: midnight UTC
        day = datetime.date.fromisoformat(text)
        return datetime.datetime(day.year, day.month, day.day, tzinfo=UTC)
    try:
        return to_utc(datetime.datetime.fromisoformat(text))
    except OverflowError:  # e.g. 9999-12-31T23:00-05:00 is past the last representable UTC time
        raise UserError(f"timestamp {text!r} is out of range in UTC (years 1..9999)") from None


def format_timestamp(ts: datetime.datetime) -> str:
    """ISO 8601 in UTC with a trailing ``Z`` (microseconds only when non-zero)."""
    return to_utc(ts).replace(tzinfo=None).isoformat() + "Z"


@dataclass(frozen=True)
class Edit:
    """One edit: make the model answer ``target_new`` for ``prompt`` about ``subject``.

    ``prompt`` is a template with ``{}`` where the subject goes; paraphrases and
    neighborhood prompts are full prompts. Lists given for the tuple fields are
    converted to tuples and a naive timestamp is taken as UTC, so equal edits
    compare and hash equal.
    """

    id: str
    timestamp: datetime.datetime
    subject: str
    relation_id: str
    prompt: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[Neighbor, ...] = ()
    candidates: tuple[str, ...] = ()
    chain: ChainLink | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str):
            raise EditError(f"edit id must be a string, got {_type_name(self.id)}")
        if _is_blank(self.id):
            raise EditError("edit id is empty")
        label = f"edit {self.id!r}"

        def fail(reason: str) -> NoReturn:
            raise EditError(f"{label}: {reason}")

        if not isinstance(self.timestamp, datetime.datetime):
            fail(f"timestamp must be a datetime, got {_type_name(self.timestamp)}")
        object.__setattr__(self, "timestamp", to_utc(self.timestamp))

        for field in ("subject", "relation_id", "prompt", "target_new"):
            value = getattr(self, field)
            if not isinstance(value, str):
                fail(f"{field} must be a string, got {_type_name(value)}")
            if _is_blank(value):
                fail(f"{field} is empty")
        if "{}" not in self.prompt:
            fail(f"prompt {self.prompt!r} has no '{{}}' where the subject goes")
        if self.target_true is not None:
            if not isinstance(self.target_true, str):
                fail(f"target_true must be a string or None, got {_type_name(self.target_true)}")
            if _is_blank(self.target_true):
                fail("target_true is empty (leave it out if unknown)")
            if self.target_true.strip() == self.target_new.strip():
                fail(f"target_new equals target_true ({self.target_new!r}): nothing to edit")

        for field in ("paraphrases", "candidates"):
            items = self._as_tuple(field, fail)
            for i, item in enumerate(items):
                if not isinstance(item, str):
                    fail(f"{field}[{i}] must be a string, got {_type_name(item)}")
                if _is_blank(item):
                    fail(f"{field}[{i}] is empty")
        for i, item in enumerate(self._as_tuple("neighborhood", fail)):
            if not isinstance(item, Neighbor):
                fail(f"neighborhood[{i}] must be a Neighbor, got {_type_name(item)}")

        if self.chain is not None and not isinstance(self.chain, ChainLink):
            fail(f"chain must be a ChainLink or None, got {_type_name(self.chain)}")

    def _as_tuple(self, field: str, fail) -> tuple:
        """Store a list/tuple field as a tuple (refusing strings, which are iterable too)."""
        value = getattr(self, field)
        if not isinstance(value, (list, tuple)):
            fail(f"{field} must be a list, got {_type_name(value)}")
        value = tuple(value)
        object.__setattr__(self, field, value)
        return value

    @property
    def rendered_prompt(self) -> str:
        """The prompt with the subject filled in.

        Uses ``str.replace``, not ``str.format``: subjects may contain braces.
        """
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with every field; the timestamp as ISO 8601 ending in ``Z``."""
        return {
            "id": self.id,
            "timestamp": format_timestamp(self.timestamp),
            "subject": self.subject,
            "relation_id": self.relation_id,
            "prompt": self.prompt,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "paraphrases": list(self.paraphrases),
            "neighborhood": [{"prompt": n.prompt, "answer": n.answer} for n in self.neighborhood],
            "candidates": list(self.candidates),
            "chain": None if self.chain is None else {"chain_id": self.chain.chain_id, "role": self.chain.role},
        }

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "") -> Edit:
        """Build an edit from a decoded JSON object (the inverse of :meth:`to_dict`).

        Refuses unknown keys, missing required keys and wrong types. Every error
        message starts with ``where`` (e.g. ``"stream.jsonl:12: "``) so the user
        sees file, line and reason.
        """
        edit_id = d.get("id") if isinstance(d, dict) else None
        label = f"edit {edit_id!r}" if isinstance(edit_id, str) and not _is_blank(edit_id) else "edit"

        def fail(reason: str) -> NoReturn:
            raise EditError(f"{where}{label}: {reason}")

        if not isinstance(d, dict):
            fail(f"expected a JSON object, got {_type_name(d)}")
        unknown = sorted(set(d) - set(_REQUIRED_FIELDS) - set(_OPTIONAL_FIELDS))
        if unknown:
            fail(f"unknown field(s) {', '.join(map(repr, unknown))}")
        missing = [k for k in _REQUIRED_FIELDS if k not in d]
        if missing:
            fail(f"missing required field(s) {', '.join(map(repr, missing))}")

        fields = dict(d)
        stamp = fields["timestamp"]
        if not isinstance(stamp, str):
            fail(f"timestamp must be an ISO 8601 string, got {_type_name(stamp)}")
        try:
            fields["timestamp"] = parse_timestamp(stamp)
        except ValueError as err:
            if "out of range" in str(err):
                fail(str(err))
            fail(f"timestamp {stamp!r} is not ISO 8601 (e.g. '2024-01-05' or '2024-01-05T12:00:00Z')")

        for key in ("paraphrases", "neighborhood", "candidates"):
            if key in fields and not isinstance(fields[key], list):
                fail(f"{key} must be a list, got {_type_name(fields[key])}")
        fields["neighborhood"] = parse_neighbors(fields.get("neighborhood", []), fail)

        chain = fields.get("chain")
        if chain is not None:
            if not isinstance(chain, dict) or set(chain) != {"chain_id", "role"}:
                fail("chain must be null or an object with exactly 'chain_id' and 'role'")
            try:
                fields["chain"] = ChainLink(chain["chain_id"], chain["role"])
            except EditError as err:
                fail(str(err))

        try:
            return cls(**fields)
        except EditError as err:
            raise EditError(f"{where}{err}") from None


def parse_neighbors(items: Any, fail: Callable[[str], NoReturn], label: str = "") -> list[Neighbor]:
    """Neighbors from JSON objects ``{"prompt", "answer"}``; ``fail`` reports a bad one (and raises)."""
    prefix = f"{label}: " if label else ""
    neighbors = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"prompt", "answer"}:
            fail(f"{prefix}neighborhood[{i}] must be an object with exactly 'prompt' and 'answer'")
        try:
            neighbors.append(Neighbor(item["prompt"], item["answer"]))
        except EditError as err:
            fail(f"{prefix}neighborhood[{i}]: {err}")
    return neighbors
