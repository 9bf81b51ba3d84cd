"""Durable publication of files: once a write returns, a power cut cannot undo it (#17 item 12).

Every file of a run directory is written under a temporary name and renamed into place, so a
killed process leaves only whole files. A rename alone does not survive a power cut, though: the
kernel may persist the rename before the file's bytes (a whole-looking file of zeros), or lose the
rename itself. :func:`publish` therefore flushes the temporary file to disk before the rename and
the directory after it, and :func:`make_dirs` flushes each directory it creates into its parent.
Since the replay loop publishes a step's delta and rows before the ``progress.json`` that marks
the step complete, a step that ``progress.json`` names as complete is on disk whole.

The cost was measured on a tiny-model replay (see docs/RUNS.md, "What a run promises").
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path | str) -> None:
    """Flush a file's or directory's contents (for a directory: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path | str) -> Path:
    """``mkdir -p``, with each directory it creates flushed into its parent."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_path(created.parent)
    return path


def append_line(path: Path | str, line: str) -> None:
    """Append one line to a log file, durably. A line half-written by a killed writer is cut off
    first, so every line before the new one is whole."""
    path = Path(path)
    existed = path.exists()
    # O_NOFOLLOW: a log that is a link is refused (ELOOP), never followed to a user's file.
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644), "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(max(0, size - 65536))
            tail = f.read()
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                f.truncate(size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= 65536 else size))
        f.seek(0, os.SEEK_END)
        f.write(line.rstrip("\n").encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    if not existed:
        fsync_path(path.parent)


def publish(tmp: Path | str, path: Path | str) -> None:
    """Rename the finished temporary file (or directory tree) ``tmp`` to ``path``, durably:
    ``tmp``'s contents reach the disk before the rename, the rename before this returns."""
    tmp, path = Path(tmp), Path(path)
    if tmp.is_dir():
        for root, _, files in os.walk(tmp):
            for name in files:
                fsync_path(Path(root) / name)
            fsync_path(root)
    else:
        fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
