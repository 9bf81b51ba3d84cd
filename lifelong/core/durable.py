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

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


class WriteError(OSError):
    """A file of a run could not be written (a full disk, a quota, an I/O error): the message names
    the file and the system's reason. Nothing half-written is left under the file's name, so the
    same command resumes once the cause is fixed."""

    def __init__(self, path: Path | str, code: int | None, reason: str):
        super().__init__(code, reason, str(path))

    def __str__(self) -> str:
        code = errno.errorcode.get(self.errno) if self.errno is not None else None
        name = f" ({code})" if code else ""
        return (
            f"cannot write {self.filename}: {self.strerror}{name}; nothing half-written was kept: "
            "free space (or fix the cause) and re-run the same command to resume"
        )


# How the Rust writers (safetensors, polars) report a system error: "... (os error 28)".
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_failure(err: BaseException) -> tuple[int | None, str] | None:
    """(errno, reason) when ``err`` is a failure of the file system: an OSError, or a writer library's
    error that carries one; None for anything else (a bug keeps its traceback)."""
    if isinstance(err, OSError):
        return err.errno, err.strerror or str(err)
    found = _OS_ERROR.search(str(err))
    if found:
        code = int(found.group(1))
        return code, os.strerror(code)
    return None


@contextmanager
def writing(path: Path | str, tmp: Path | str | None = None) -> Iterator[None]:
    """Write ``path`` (through its temporary ``tmp``) inside the block: a failure of the file system
    becomes one :class:`WriteError` naming ``path``; on any exit by an exception (an interrupt too)
    ``tmp`` is removed, so no half-written file is left to resume over."""
    try:
        yield
    except BaseException as err:
        if tmp is not None:
            with suppress(OSError):
                if Path(tmp).is_dir() and not Path(tmp).is_symlink():
                    shutil.rmtree(tmp)
                else:
                    Path(tmp).unlink(missing_ok=True)
        failure = None if isinstance(err, WriteError) else write_failure(err)
        if failure is None:
            raise
        raise WriteError(path, *failure) from err


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
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):
            fsync_path(created.parent)
    return path


def append_line(path: Path | str, line: str) -> None:
    """Append one line to a log file, durably. A line half-written by a killed writer is cut off
    first, so every line before the new one is whole."""
    path = Path(path)
    with writing(path):
        _append_line(path, line)


def _append_line(path: Path, line: str) -> None:
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
    with writing(path, tmp):
        _publish(tmp, path)


def _publish(tmp: Path, path: Path) -> None:
    if tmp.is_dir():
        for root, _, files in os.walk(tmp):
            for name in files:
                fsync_path(Path(root) / name)
            fsync_path(root)
    else:
        fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
