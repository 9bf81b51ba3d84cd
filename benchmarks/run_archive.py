"""Finished runs' figures kept in the repository, so that a table gathers arms measured in different
sessions (a machine's run directories do not outlive it; an arm of the long tables takes hours).

An archived run is two files beside each other under ``benchmarks/results/<table>/``: ``NAME.parquet``,
the rows of its results table that the table reads (a filter each table gives; every column), and ``NAME.json``, its
manifest (identity, versions with the commit that measured it, sessions) and its progress (completed
and total steps, each step's timings). A table reads a finished run directory first and archives it;
where none is on the machine, it reads the archive and says which commit measured the figures.

    archive(RunDir(path), dest, keep, extra)  ->  dest.parquet, dest.json
    load(dest)                                ->  Archived(results, manifest, progress, extra) or None
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

COLUMNS = ("step", "probe", "metric", "protocol", "edit_id", "value")  # what every results table has
MANIFEST_KEYS = ("format", "identity", "versions", "sessions", "created", "run_id")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Archived:
    results: pl.DataFrame
    manifest: dict
    progress: dict
    extra: dict  # what the table adds (e.g. a yardstick measured on the same machine)

    @property
    def commit(self) -> str:
        """The commit that measured it (short), ``+dirty`` kept; "unknown" for a run outside a checkout."""
        commit = self.manifest.get("versions", {}).get("git") or "unknown"
        head, _, dirty = commit.partition("+")
        return head[:7] + (f"+{dirty}" if dirty else "")


def is_finished(progress: dict) -> bool:
    total = progress.get("total_steps")
    return total is not None and progress.get("completed_step", -1) >= total


def archive(run, dest: Path, keep: Callable[[pl.DataFrame], pl.DataFrame], extra: dict | None = None) -> Archived:
    """Write the finished ``run``'s kept rows, manifest and ``extra`` to ``dest``.parquet/.json (replacing
    an older archive of the same name) and return what was written."""
    progress = run.progress()
    if not is_finished(progress):
        raise ValueError(f"{run.path}: not finished ({progress.get('completed_step')}/{progress.get('total_steps')})")
    results = keep(run.results()).sort(*COLUMNS[:5])
    manifest = run.manifest()
    kept = {k: manifest[k] for k in MANIFEST_KEYS if k in manifest}
    steps = {k: progress[k] for k in ("completed_step", "total_steps", "seconds", "timestamps") if k in progress}
    dest.parent.mkdir(parents=True, exist_ok=True)
    results.write_parquet(dest.with_suffix(".parquet"), compression="zstd", compression_level=19)
    stored = {"manifest": kept, "progress": steps, "extra": extra or {}}
    dest.with_suffix(".json").write_text(json.dumps(stored, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return Archived(results, kept, steps, extra or {})


def identity_differences(stored: Archived, identity: dict, legacy: dict | None = None) -> list[str]:
    """The identity fields in which an archived run differs from ``identity`` (a planned run's), read as
    :meth:`lifelong.run.RunDir.identity_differences` reads a run directory's."""
    from lifelong.run import identity_for_format

    planned = identity_for_format(identity, stored.manifest.get("format", 1), legacy)
    recorded = stored.manifest.get("identity", {})
    differs = [k for k in sorted(set(planned) | set(recorded)) if planned.get(k) != recorded.get(k)]
    # a stream file is named by its path, which holds the checkout's location: the same content (its hash)
    # under another checkout or work folder is the same stream
    same_content = planned.get("stream_hash") is not None and planned.get("stream_hash") == recorded.get("stream_hash")
    return [k for k in differs if not (k == "stream" and same_content)]


def load(dest: Path) -> Archived | None:
    """The archive at ``dest`` (.parquet and .json), or None when there is none."""
    table, meta = dest.with_suffix(".parquet"), dest.with_suffix(".json")
    if not (table.is_file() and meta.is_file()):
        return None
    stored = json.loads(meta.read_text())
    return Archived(pl.read_parquet(table), stored["manifest"], stored["progress"], stored.get("extra", {}))


def finished(run, dest: Path | None, keep: Callable[[pl.DataFrame], pl.DataFrame], extra: dict | None = None):
    """A finished run's kept figures: from ``run`` (a RunDir) when it is finished there, archived to
    ``dest`` first and read back (so that a fresh run and an archived one give the same figures); else
    from the archive at ``dest``; else None. ``dest`` None: the run only, never archived."""
    progress = run.progress() if run.exists() else None
    if progress is not None and is_finished(progress):
        if dest is None:
            manifest = run.manifest()
            return Archived(keep(run.results()), manifest, progress, extra or {})
        archive(run, dest, keep, extra)
    return load(dest) if dest is not None else None


THETA0 = "theta0"  # the folder of a table's θ0 kit, beside its archived runs


def theta0_kit(run, dest: Path) -> Path:
    """Copy the finished step 0 of ``run`` (a RunDir) to ``dest`` as a run directory of that step alone:
    its manifest, θ0's references, step 0's result and generation parts, and progress and step log cut to
    step 0. ``replay --references-from dest`` then borrows θ0 from it on a machine without the run (and,
    as from any run, refuses it when the identities or θ0 checks differ)."""
    import shutil

    if run.completed_step() < 0:
        raise ValueError(f"{run.path}: step 0 is not complete")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run.manifest_path, dest / run.manifest_path.name)
    shutil.copy2(run.reference_path, dest / run.reference_path.name)
    for part in (run.part_path(0), run.generation_path(0)):
        if part.is_file():
            target = dest / part.relative_to(run.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(part, target)
    lines = run.step_log_path.read_text().splitlines() if run.step_log_path.is_file() else []
    first = [line for line in lines if line.strip() and json.loads(line).get("step") == 0]
    (dest / run.step_log_path.name).write_text("".join(line + "\n" for line in first[:1]))
    progress = run.progress()
    cut = {"completed_step": 0, "total_steps": progress["total_steps"], "timestamps": {}, "seconds": {}}
    (dest / run.progress_path.name).write_text(json.dumps(cut) + "\n")
    return dest
