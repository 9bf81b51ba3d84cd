"""EditStream: an ordered, timestamped sequence of edits, and its JSONL file format.

The replay loop consumes a stream step by step: by default one step per
distinct timestamp (edits that share a timestamp arrive together, as one
batch), or fixed-size batches. Streams compose (concat, interleave, slice,
shuffle, retime) without mutating anything, and a stable content hash lets a
run record exactly which stream it replayed. The file format is described in
``streams/FORMAT.md``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import overload

import numpy as np

from .edit import Edit, EditError, to_utc
from .errors import UserError


class StreamFormatError(UserError):
    """A stream file that cannot be loaded; the message is one line, ``path:line: reason``."""


class EditStream(Sequence[Edit]):
    """An ordered, timestamped sequence of edits (sorted by timestamp, stable for ties).

    Edit ids are unique within a stream, so results can be keyed by edit id.
    Streams are immutable: every operation returns a new stream.
    """

    def __init__(self, edits: Iterable[Edit], name: str = "stream") -> None:
        edits = tuple(edits)
        for i, edit in enumerate(edits):
            if not isinstance(edit, Edit):
                raise TypeError(f"stream {name!r}: item {i} is a {type(edit).__name__}, not an Edit")
        seen: set[str] = set()
        for edit in edits:
            if edit.id in seen:
                raise EditError(f"stream {name!r}: duplicate edit id {edit.id!r}")
            seen.add(edit.id)
        # sorted() is stable, so edits sharing a timestamp keep the order they came in.
        self.edits: tuple[Edit, ...] = tuple(sorted(edits, key=lambda e: e.timestamp))
        self.name = name

    # -- sequence protocol ---------------------------------------------------

    def __len__(self) -> int:
        return len(self.edits)

    def __iter__(self) -> Iterator[Edit]:
        return iter(self.edits)

    @overload
    def __getitem__(self, index: int) -> Edit: ...
    @overload
    def __getitem__(self, index: slice) -> EditStream: ...

    def __getitem__(self, index):
        """An edit by position, or a sub-stream (same name) for a slice."""
        if isinstance(index, slice):
            return EditStream(self.edits[index], name=self.name)
        return self.edits[index]

    def __repr__(self) -> str:
        if not self.edits:
            return f"EditStream({self.name!r}, 0 edits)"
        first, last = self.edits[0].timestamp, self.edits[-1].timestamp
        return f"EditStream({self.name!r}, {len(self)} edits, {first:%Y-%m-%d} .. {last:%Y-%m-%d})"

    # -- steps ---------------------------------------------------------------

    def steps(self, batch_size: int | None = None) -> list[tuple[Edit, ...]]:
        """Group the edits into the batches the replay loop applies, in order.

        ``batch_size=None``: one step per distinct timestamp. Otherwise
        consecutive edits (in timestamp order) in chunks of ``batch_size``; the
        last chunk may be shorter.
        """
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
            return [self.edits[i : i + batch_size] for i in range(0, len(self.edits), batch_size)]
        steps: list[tuple[Edit, ...]] = []
        current: list[Edit] = []
        for edit in self.edits:
            if current and edit.timestamp != current[0].timestamp:
                steps.append(tuple(current))
                current = []
            current.append(edit)
        if current:
            steps.append(tuple(current))
        return steps

    def head_steps(self, n: int, batch_size: int | None = None) -> EditStream:
        """The edits of the first ``n`` steps (as formed by :meth:`steps`)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        head = [edit for step in self.steps(batch_size)[:n] for edit in step]
        return EditStream(head, name=self.name)

    def until(self, t: datetime.datetime) -> EditStream:
        """The edits with timestamp <= ``t`` (a naive ``t`` is taken as UTC)."""
        t = to_utc(t)
        return EditStream([e for e in self.edits if e.timestamp <= t], name=self.name)

    # -- composition -----------------------------------------------------------

    def concat(self, *others: EditStream) -> EditStream:
        """This stream's edits, then each other stream's, back to back in time.

        Each stream must start no earlier than the previous one ends; otherwise
        the timelines overlap and a ``ValueError`` says so (use
        :meth:`retimed` to shift a stream, or :meth:`interleave` to merge).
        """
        parts = [self, *others]
        end: datetime.datetime | None = None
        end_name = self.name
        for part in parts:
            if not part.edits:
                continue
            start = part.edits[0].timestamp
            if end is not None and start < end:
                raise ValueError(
                    f"cannot concat: stream {part.name!r} starts at {start.isoformat()}, before stream "
                    f"{end_name!r} ends at {end.isoformat()}; shift it with .retimed(start, interval) "
                    f"or merge with .interleave()"
                )
            end, end_name = part.edits[-1].timestamp, part.name
        return EditStream([e for part in parts for e in part.edits], name=self.name)

    def interleave(self, *others: EditStream) -> EditStream:
        """Merge the timelines by timestamp; edits at the same time keep argument order."""
        # Each stream is sorted already, so a stable sort of the concatenation is a merge
        # in which ties go to the stream listed first.
        return EditStream([e for part in (self, *others) for e in part.edits], name=self.name)

    def shuffle(self, seed: int) -> EditStream:
        """Same timeline, edits in a seeded random order.

        The edits are permuted with ``numpy.random.default_rng(seed)`` and then
        given the original (sorted) timestamps in order: the time slots, and so
        the step structure, stay; the content moves.
        """
        order = np.random.default_rng(seed).permutation(len(self.edits))
        slots = [e.timestamp for e in self.edits]
        moved = [replace(self.edits[j], timestamp=slot) for j, slot in zip(order, slots)]
        return EditStream(moved, name=self.name)

    def sample(self, n: int, seed: int) -> EditStream:
        """``n`` edits drawn with ``numpy.random.default_rng(seed)``, kept in stream order with their
        timestamps. A chain is drawn whole (its edits share a chain id), so round edits and conflicts stay
        complete; units that would overshoot ``n`` are passed over, so the sample holds at most ``n``
        edits (exactly ``n`` when single edits remain to fill it)."""
        if not 1 <= n <= len(self.edits):
            raise ValueError(f"a sample of {n} edits from a stream of {len(self.edits)}: expected 1..{len(self.edits)}")
        units: dict[str, list[int]] = {}
        for i, e in enumerate(self.edits):
            units.setdefault(f"chain:{e.chain.chain_id}" if e.chain is not None else f"edit:{i}", []).append(i)
        groups = list(units.values())
        chosen: list[int] = []
        for u in np.random.default_rng(seed).permutation(len(groups)):
            if len(chosen) + len(groups[u]) <= n:
                chosen += groups[u]
            if len(chosen) == n:
                break
        return EditStream([self.edits[i] for i in sorted(chosen)], name=self.name)

    def retimed(self, start: datetime.datetime, interval: datetime.timedelta) -> EditStream:
        """Same edits, same order, at regular times ``start, start + interval, ...``.

        A zero interval puts every edit at ``start`` (one step of all edits).
        """
        if interval < datetime.timedelta(0):
            raise ValueError(f"interval must not be negative, got {interval}")
        start = to_utc(start)
        moved = [replace(e, timestamp=start + i * interval) for i, e in enumerate(self.edits)]
        return EditStream(moved, name=self.name)

    # -- identity and files ------------------------------------------------------

    def _canonical_lines(self) -> list[str]:
        return [json.dumps(e.to_dict(), sort_keys=True, separators=(",", ":")) for e in self.edits]

    def content_hash(self) -> str:
        """A short fingerprint of the edits (not the name), stable across processes.

        The first 16 hex characters of the SHA-256 of the canonical JSON lines
        (sorted keys, compact separators, ASCII escapes) of the edits in order.
        """
        text = "".join(line + "\n" for line in self._canonical_lines())
        return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]

    def to_jsonl(self, path: str | os.PathLike) -> None:
        """Write one edit per line (UTF-8), atomically: readers never see half a file."""
        path = Path(path)
        lines = [json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in self.edits]
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(lines)
                f.flush()
                os.fsync(f.fileno())  # the bytes reach the disk before the rename (a power cut)
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # and the rename before this returns
            finally:
                os.close(dir_fd)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, name: str | None = None) -> EditStream:
        """Read a stream written by :meth:`to_jsonl` (or by hand; see FORMAT.md).

        The whole file is checked before anything is returned: the first bad
        line raises :class:`StreamFormatError` ``"path:line: reason"``. Blank
        lines are allowed. ``name`` defaults to the file's stem. The file is read
        line by line, and a line longer than :data:`MAX_LINE_BYTES` is refused
        without being read whole (see :data:`MAX_STRING_CHARS`, :data:`MAX_DEPTH`).
        """
        path = Path(path)
        edits: list[Edit] = []
        first_line: dict[str, int] = {}
        # Split on "\n" only (binary readline): str.splitlines() would also split on
        # U+2028 and friends, which JSON strings may contain unescaped.
        with open(path, "rb") as f:
            for lineno, raw in enumerate(_bounded_lines(f, path), start=1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                    raw = raw[3:]
                where = f"{path}:{lineno}: "
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise StreamFormatError(
                        f"{where}not UTF-8 text ({err.reason} at byte {err.start} of the line)"
                    ) from None
                if not line.strip():
                    continue
                record = _parse_line(line, where)
                try:
                    edit = Edit.from_dict(record, where=where)
                except EditError as err:
                    raise StreamFormatError(str(err)) from None
                if edit.id in first_line:
                    raise StreamFormatError(
                        f"{where}duplicate edit id {edit.id!r} (first on line {first_line[edit.id]})"
                    )
                first_line[edit.id] = lineno
                edits.append(edit)

        if not edits:
            raise StreamFormatError(f"{path}: no edits")
        return cls(edits, name=path.stem if name is None else name)


MAX_LINE_BYTES = 1 << 20
"""The longest line a stream file may have (1 MiB, newline excluded): a real edit is a few KB."""
MAX_STRING_CHARS = 1 << 16
"""The longest string field (65,536 characters): a prompt or answer, never a document."""
MAX_DEPTH = 4
"""The deepest nesting of JSON objects and lists in a line: an edit needs 3 (edit, neighborhood, neighbor)."""


def _bounded_lines(f, path: Path) -> Iterator[bytes]:
    """The lines of binary file ``f``, each at most :data:`MAX_LINE_BYTES` plus its newline; a
    longer line is refused after reading only that much of it."""
    lineno = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 2)  # room for "\r\n"
        if not raw:
            return
        lineno += 1
        content = raw[:-1] if raw.endswith(b"\n") else raw
        if len(content[:-1] if content.endswith(b"\r") else content) > MAX_LINE_BYTES:
            raise StreamFormatError(
                f"{path}:{lineno}: line longer than {MAX_LINE_BYTES:,} bytes "
                "(an edit is a few KB; see streams/FORMAT.md)"
            )
        yield raw


def _depth(value) -> int:
    """How deeply objects and lists nest in a decoded JSON value (a scalar is 0)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            todo.extend((x, depth + 1) for x in (item.values() if isinstance(item, dict) else item))
    return deepest


def _parse_line(line: str, where: str) -> dict:
    """One line's JSON object, refused (naming ``where``) when it is not JSON, nests deeper than
    :data:`MAX_DEPTH`, or holds a string longer than :data:`MAX_STRING_CHARS` or one that is
    not Unicode text (a lone surrogate escape such as ``"\\ud800"``)."""
    too_deep = f"{where}JSON nests deeper than {MAX_DEPTH} levels (an edit needs 3)"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise StreamFormatError(f"{where}invalid JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise StreamFormatError(too_deep) from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise StreamFormatError(f"{where}invalid JSON: {str(err).splitlines()[0]}") from None
    if _depth(record) > MAX_DEPTH:
        raise StreamFormatError(too_deep)
    if not isinstance(record, dict):
        raise StreamFormatError(f"{where}expected a JSON object, got {type(record).__name__}")
    _check_strings(record, where, "")
    return record


def _check_strings(value, where: str, at: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, where, f"{at}key {key[:40]!r}")
            _check_strings(item, where, f"{at}.{key[:40]}" if at else key[:40])
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(item, where, f"{at}[{i}]")
    elif isinstance(value, str):
        if len(value) > MAX_STRING_CHARS:
            raise StreamFormatError(
                f"{where}{at}: string of {len(value):,} characters, longer than {MAX_STRING_CHARS:,}"
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise StreamFormatError(
                f"{where}{at}: string holds a lone surrogate escape (\\ud800-\\udfff "
                "without its pair), which is not Unicode text"
            ) from None
