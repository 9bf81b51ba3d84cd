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
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, overload

import numpy as np

from .edit import Edit, EditError, to_utc


class StreamFormatError(ValueError):
    """A stream file that cannot be loaded; the message is one line, ``path:line: reason``."""


class EditStream:
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
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, name: str | None = None) -> EditStream:
        """Read a stream written by :meth:`to_jsonl` (or by hand; see FORMAT.md).

        The whole file is checked before anything is returned: the first bad
        line raises :class:`StreamFormatError` ``"path:line: reason"``. Blank
        lines are allowed. ``name`` defaults to the file's stem.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise StreamFormatError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None

        edits: list[Edit] = []
        first_line: dict[str, int] = {}
        # Split on "\n" only: str.splitlines() would also split on U+2028 and friends,
        # which JSON strings may contain unescaped.
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}: "
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise StreamFormatError(f"{where}invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(record, dict):
                raise StreamFormatError(f"{where}expected a JSON object, got {type(record).__name__}")
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
