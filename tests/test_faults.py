"""Nothing lost, nothing silently wrong (#17): durable writes, and kills at every write point."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def test_each_write_is_flushed_before_its_rename_and_its_directory_after(tmp_path, monkeypatch):
    """#17 item 12: a file published by the run's helpers survives a power cut once written."""
    import polars as pl
    import torch

    from lifelong.delta import atomic_save_tensors
    from lifelong.run import atomic_write_parquet, atomic_write_text

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "new" / "sub"
    writes = [
        (target / "a.json", lambda p: atomic_write_text(p, "{}")),
        (target / "b.parquet", lambda p: atomic_write_parquet(pl.DataFrame({"x": [1]}), p)),
        (target / "c.safetensors", lambda p: atomic_save_tensors({"t": torch.ones(2)}, p)),
    ]
    for path, write in writes:
        events.clear()
        write(path)
        tmp = f"{path.parent}/.{path.name}.tmp-{os.getpid()}"
        i = events.index(("replace", tmp, str(path)))
        assert ("fsync", tmp) in events[:i], events  # the bytes first
        assert ("fsync", str(path.parent)) in events[i + 1:], events  # then the rename
    # the directories the first write created were flushed into their parents
    events.clear()
    atomic_write_text(tmp_path / "x" / "y" / "z.txt", "z")
    assert [e for e in events if e[0] == "fsync"][:2] == [("fsync", str(tmp_path)), ("fsync", str(tmp_path / "x"))]
