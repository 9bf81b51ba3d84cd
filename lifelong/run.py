"""A run directory on disk: manifest, per-step results, deltas, plots (docs/DESIGN.md §5).

Layout::

    DIR/manifest.json          what was run (model, editor + hyperparameters, stream hash, probes, seed, versions)
    DIR/progress.json          the last complete step, per-step timestamps and timings
    DIR/reference.json         θ0 reference values of the probes, computed once
    DIR/results/step_*.parquet rows of each completed step (step 0 = θ0)
    DIR/results.parquet        all rows, one long table (written when the run ends)
    DIR/deltas/                per-step deltas and editor state (safetensors)
    DIR/plots/                 PNGs

Every file is written under a temporary name, flushed to disk and renamed (and the
directory flushed: :mod:`lifelong.core.durable`), so a killed run or a power cut leaves only
whole files; a step counts once ``progress.json`` says it is complete.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

import polars as pl
from polars.datatypes import DataTypeClass

from lifelong.core.durable import append_line, make_dirs, publish
from lifelong.settings import UNLESS_DEFAULT, declare, settings_of
from streams.errors import UserError

RESULT_SCHEMA: dict[str, DataTypeClass | pl.DataType] = {
    "run_id": pl.String,
    "step": pl.Int64,
    "timestamp": pl.Datetime("us", "UTC"),
    "probe": pl.String,
    "metric": pl.String,
    "protocol": pl.String,
    "edit_id": pl.String,
    "value": pl.Float64,
}


# The run directory's format, written into each new manifest. Format 1 (no "format" key) predates
# the model configuration and tokenizer fingerprints in the identity; such a run still resumes.
RUN_FORMAT = 2
_IDENTITY_KEYS_SINCE = {2: ("base_config", "base_tokenizer")}

LOCK_NAME = ".lock"  # held by the process writing to a run directory (see RunDir.writer_lock)


def identity_for_format(identity: dict, run_format: int, legacy: dict | None = None) -> dict:
    """``identity`` as a run directory of ``run_format`` recorded it: keys added by later formats left out,
    and for format 1 the ``legacy`` values (the editor overrides as typed, before numbers were normalised)."""
    later = {k for fmt, keys in _IDENTITY_KEYS_SINCE.items() if fmt > run_format for k in keys}
    old = {**identity, **(legacy or {})} if run_format < 2 else identity
    return {k: v for k, v in old.items() if k not in later}


class RunDirError(UserError):
    """A run directory that cannot be used as asked; the message says why."""


@dataclass
class RunConfig:
    """Everything that determines a run's results: the replay's settings, each declared once
    (:mod:`lifelong.settings`); the CLI, TOML configs, manifests and sweep specs are generated from them."""

    model: str = declare("smollm2-135m", "registered model name or local Hugging Face directory", str, sweep="special")
    editor: str = declare("ft", "editor name (see 'lifelong editors')", str, sweep="swept")
    editor_overrides: dict[str, str] = declare({}, "editor hyperparameter overrides", dict, form="set", sweep="swept")
    stream: str = declare(
        "builtin", "stream name (see 'lifelong streams'), dataset:NAME or a .jsonl file", str, sweep="special"
    )
    steps: int | None = declare(
        None, "replay the first N steps (default: the whole stream)", int, optional=True, least=1
    )
    batch_size: int | None = declare(
        None, "edits per step; without it, one step per distinct timestamp", int, optional=True, least=1
    )
    probe_every: int = declare(5, "probe retention every K steps and at the end", int, least=1)
    seed: int = declare(
        0,
        "seeds torch at every step (stochastic editors, sampled probes) and, with --sample, draws the edits",
        int,
        least=0,
        sweep="swept",
    )
    sample: int | None = declare(
        None,
        "replay N edits drawn by the seed from the stream (whole chains, kept in stream order); without it "
        "runs that differ only in seed edit the same edits",
        int,
        optional=True,
        least=1,
        identity=UNLESS_DEFAULT,
    )
    device: str = declare("cpu", "cpu, cuda or cuda:N", str)
    probes: list[str] = declare([], "extra probes: NAME or NAME:KEY=VALUE,...", list, form="probe", sweep="swept")
    # Storage, not results; in the identity only when not "all", so a run resumes under the policy it began with.
    keep_deltas: str = declare(
        "all",
        "steps kept for checkout: all, every:K, last:N or log (1, 2, 4, ...); the latest step is always kept, "
        "so resume stays exact. Bounds disk on long runs",
        str,
        identity=UNLESS_DEFAULT,
    )
    dtype: str = declare(
        "float32",
        "the model weights' dtype (float16 on a GPU only; bfloat16 is slow on CPUs without native support)",
        str,
        choices=("float32", "bfloat16", "float16"),
        identity=UNLESS_DEFAULT,
    )


RUN_SETTINGS = settings_of(RunConfig)


def is_temporary(name: str) -> bool:
    """A file name :func:`atomic_write_text` and friends write before renaming."""
    return name.startswith(".") and ".tmp-" in name


def temporary_path(path: Path) -> Path:
    """Where a file is written before it is renamed to ``path`` (see :func:`is_temporary`)."""
    make_dirs(path.parent)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = temporary_path(path)
    tmp.write_text(text)
    publish(tmp, path)


def atomic_write_parquet(df: pl.DataFrame, path: Path) -> str:
    """Write ``df`` to ``path`` atomically; returns the file's digest (:func:`file_digest`)."""
    tmp = temporary_path(path)
    df.write_parquet(tmp)
    digest = file_digest(tmp)
    publish(tmp, path)
    return digest


def file_digest(path: Path) -> str:
    """A hash of a file's bytes: a results file is checked against it before it is parsed, so a flipped
    bit is refused by name instead of becoming a wrong value (or a crash in the parquet reader)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("lifelong-editing", "torch", "transformers", "polars", "numpy", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    commit = git_commit()
    if commit:
        out["git"] = commit
    return out


def git_commit() -> str | None:
    """The commit of the checkout this code runs from (``+dirty`` with uncommitted changes), or None
    when it is not a git checkout (an installed package) or git is missing."""
    import subprocess

    where = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


class RunDir:
    """Reads and writes one run directory."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    # -- paths
    manifest_path = property(lambda self: self.path / "manifest.json")
    progress_path = property(lambda self: self.path / "progress.json")
    # One line per completed step (timestamp, timings), appended: progress.json stays small, so
    # marking a step complete costs the same at step 10,000 as at step 1.
    step_log_path = property(lambda self: self.path / "steps.jsonl")
    reference_path = property(lambda self: self.path / "reference.json")
    results_path = property(lambda self: self.path / "results.parquet")
    results_digest_path = property(lambda self: self.path / "results.parquet.digest")
    parts_dir = property(lambda self: self.path / "results")
    deltas_dir = property(lambda self: self.path / "deltas")
    plots_dir = property(lambda self: self.path / "plots")

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    # -- manifest
    def manifest(self) -> dict:
        if not self.exists():
            raise RunDirError(f"{self.path}: not a run directory (no manifest.json)")
        manifest = _read_json(self.manifest_path, "manifest")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("identity"), dict):
            raise RunDirError(f"{self.manifest_path}: damaged manifest (no run identity in it)")
        return manifest

    def _refuse_foreign_files(self) -> list[Path]:
        """Refuse a directory holding anything but our lock and our own half-written temporary
        files (all a kill during the very first write leaves); returns those temporary files."""
        if not self.path.exists():
            return []
        entries = list(self.path.iterdir())
        leftovers = [p for p in entries if p.is_file() and is_temporary(p.name)]
        if len(leftovers) < sum(1 for p in entries if p.name != LOCK_NAME):
            raise RunDirError(f"{self.path} exists, is not empty and is not a run directory; choose another --out")
        return leftovers

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold the run's writer lock (an OS file lock on ``DIR/.lock``, released when the process
        ends, however it ends): a second replay into the same directory is refused in one line."""
        import fcntl

        if not self.exists():
            self._refuse_foreign_files()
        make_dirs(self.path)
        # A link in a run directory would have a write here land on its target (a user's file).
        links = sorted(p.name for p in self.path.iterdir() if p.is_symlink())
        if links:
            raise RunDirError(
                f"{self.path}: {', '.join(links)} is a symbolic link; a run directory holds only files it "
                "wrote (nothing was changed)"
            )
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:  # ELOOP: the lock became a link after the check above
            raise RunDirError(f"{self.path / LOCK_NAME}: cannot open the writer lock ({e.strerror})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise RunDirError(
                    f"{self.path}: another process (pid {holder}) is writing to this run; "
                    "wait for it to end or choose another --out"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def start(self, identity: dict, legacy: dict | None = None) -> dict:
        """Create the run, or check that an existing one was started with the same identity (``legacy``:
        identity values as a format-1 run recorded them, see :func:`identity_for_format`)."""
        if self.exists():
            manifest = self.manifest()
            identity = identity_for_format(identity, manifest.get("format", 1), legacy)
            if manifest["identity"] != identity:
                diffs = [
                    k
                    for k in sorted(set(identity) | set(manifest["identity"]))
                    if identity.get(k) != manifest["identity"].get(k)
                ]
                raise RunDirError(
                    f"{self.path} holds a different run (differs in: {', '.join(diffs)}); "
                    "choose another --out or delete it"
                )
            return manifest
        for p in self._refuse_foreign_files():
            p.unlink()
        manifest = {
            "run_id": run_id(identity),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "identity": identity,
            "format": RUN_FORMAT,
            "versions": package_versions(),
        }
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
        return manifest

    def record_session(self, info: dict) -> None:
        """Append what this session of the run brings (machine, threads, resolved precisions) to the
        manifest's ``sessions``; say so when a precision resolves differently from the first session."""
        manifest = self.manifest()
        sessions = manifest.setdefault("sessions", [])
        if sessions and sessions[0].get("numerics") != info.get("numerics"):
            first = {k: v.get("dtype") for k, v in (sessions[0].get("numerics") or {}).items()}
            now = {k: v.get("dtype") for k, v in (info.get("numerics") or {}).items()}
            print(
                f"note: {self.path} started with compute precision {first} and resumes with {now} on this "
                "machine; steps from here on differ from an uninterrupted run by rounding",
                file=sys.stderr,
            )
        sessions.append(info)
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True))

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporary files (``.NAME.tmp-PID``) that writers which are no longer alive
        left anywhere in the run directory (a kill between a write and its rename); returns them."""
        stale = []
        for path in self.path.rglob(".*.tmp-*"):
            pid = path.name.rpartition(".tmp-")[2]
            if path.is_file() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                path.unlink(missing_ok=True)
                stale.append(path)
        return stale

    # -- progress
    def _progress_file(self) -> dict:
        if not self.progress_path.is_file():
            return {"completed_step": -1, "total_steps": None, "timestamps": {}, "seconds": {}}
        progress = _read_json(self.progress_path, "progress file")
        if not (
            isinstance(progress, dict)
            and isinstance(progress.get("completed_step"), int)
            and isinstance(progress.get("timestamps"), dict)
            and isinstance(progress.get("seconds"), dict)
        ):
            raise RunDirError(
                f"{self.progress_path}: damaged progress file (not the object a run writes); "
                "it cannot say which steps are complete"
            )
        return progress

    def progress(self) -> dict:
        """completed_step, total_steps, and per completed step its timestamp and timings (from
        steps.jsonl; runs from before it kept them in progress.json itself) and the editor's report
        on it (``editor``: step -> dict, for editors that give one)."""
        progress = {**self._progress_file(), "editor": {}, "results": {}}
        done = progress["completed_step"]
        if self.step_log_path.is_file():
            lines = self.step_log_path.read_bytes().split(b"\n")
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    step = int(entry["step"])
                except (ValueError, KeyError, TypeError):
                    if number >= len(lines) - 1:  # the last line, cut by a kill: its step is not complete
                        break
                    raise RunDirError(f"{self.step_log_path}:{number}: damaged line; restore the file") from None
                if step <= done:  # a later line for the same step (a redone step) wins
                    progress["timestamps"][str(step)] = entry.get("timestamp")
                    progress["seconds"][str(step)] = entry.get("seconds") or {}
                    if entry.get("editor"):
                        progress["editor"][str(step)] = entry["editor"]
                    if entry.get("results"):
                        progress["results"][str(step)] = entry["results"]
        return progress

    def completed_step(self) -> int:
        return self._progress_file()["completed_step"]

    def mark_complete(
        self,
        step: int,
        timestamp: datetime | None,
        seconds: dict[str, float],
        total: int,
        editor: dict | None = None,
        results: str | None = None,
    ) -> None:
        """Record ``step`` as complete: its line in steps.jsonl first (with the editor's report on
        the step, when it gives one, and the digest of its result part), then progress.json (the commit)."""
        line = {"step": step, "timestamp": timestamp.isoformat() if timestamp else None, "seconds": seconds}
        if results is not None:
            line["results"] = results
        append_line(self.step_log_path, json.dumps({**line, **({"editor": editor} if editor else {})}))
        progress = self._progress_file()
        progress["completed_step"] = step
        progress["total_steps"] = total
        atomic_write_text(self.progress_path, json.dumps(progress, indent=1))

    def step_at(self, when: datetime) -> int:
        """The last completed step whose timestamp is at or before ``when`` (0 if none)."""
        best = 0
        for step, stamp in self.progress()["timestamps"].items():
            if stamp and datetime.fromisoformat(stamp) <= when:
                best = max(best, int(step))
        return best

    # -- reference values
    def save_reference(self, reference: dict) -> None:
        atomic_write_text(self.reference_path, json.dumps(reference))

    def load_reference(self) -> dict | None:
        return _read_json(self.reference_path, "reference file") if self.reference_path.is_file() else None

    # -- results
    def part_path(self, step: int) -> Path:
        return self.parts_dir / f"step_{step:06d}.parquet"

    def write_rows(self, step: int, rows: list[dict]) -> str:
        """Write step ``step``'s result part; returns its digest, which :meth:`mark_complete` records."""
        return atomic_write_parquet(pl.DataFrame(rows, schema=RESULT_SCHEMA, orient="row"), self.part_path(step))

    def part_digests(self) -> dict[int, str]:
        """The digest of each completed step's result part, as its line in steps.jsonl records it (steps
        of runs from before the digests have none, and are read unchecked)."""
        return {int(k): v for k, v in self.progress()["results"].items()}

    def check_parts(self, step: int) -> None:
        """Refuse, naming the file, when a result part of steps 0..``step`` is missing (every
        completed step wrote one, if only an empty one)."""
        missing = [p for p in map(self.part_path, range(step + 1)) if not p.is_file()]
        if missing:
            raise RunDirError(
                f"{missing[0]}: result part of a completed step is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; its rows cannot be recovered from this directory"
            )

    def discard_after(self, step: int) -> None:
        """Remove result parts of steps after ``step`` (leftovers of a killed run)."""
        for part in self.parts_dir.glob("step_*.parquet"):
            if int(part.stem.split("_")[1]) > step:
                part.unlink()

    def joined_parts(self) -> pl.DataFrame:
        """The completed steps' parts as one table (read only)."""
        parts = self._completed_parts()
        digests = self.part_digests()
        tables = [_read_parquet(p, digests.get(step)) for step, p in enumerate(parts)]
        return pl.concat(tables) if tables else pl.DataFrame(schema=RESULT_SCHEMA)

    def _completed_parts(self) -> list[Path]:
        """The result parts of steps 0..completed, refused (naming the file) if one is missing."""
        done = self.completed_step()
        self.check_parts(done)
        return [self.part_path(s) for s in range(done + 1)]

    def consolidate(self) -> None:
        """Join the completed steps' parts into ``results.parquet``. Streamed from the part files
        to the output: joining 10,000 parts in memory (1.3 M rows) left the process 236 MiB
        larger for good (allocator retention); streaming costs 42 MiB (docs/BENCHMARKS.md)."""
        parts = self._completed_parts()
        digests = self.part_digests()
        for step, part in enumerate(parts):  # checked before the stream reads them (it names no file)
            _check_digest(part, digests.get(step))
        tmp = temporary_path(self.results_path)
        try:
            pl.scan_parquet(parts, schema=RESULT_SCHEMA).sink_parquet(tmp)
        except Exception:
            tmp.unlink(missing_ok=True)
            for part in parts:  # name the damaged part (the streamed error does not)
                _read_parquet(part)
            raise
        atomic_write_text(self.results_digest_path, file_digest(tmp))  # before the table it vouches for
        publish(tmp, self.results_path)

    def results(self) -> pl.DataFrame:
        """The results table: ``results.parquet`` if current, else joined from the parts. Never
        writes: ``show``, ``plot --out`` and ``compare`` work on a read-only run directory."""
        if not self.exists():
            raise RunDirError(f"{self.path}: not a run directory (no manifest.json)")
        if self.results_path.is_file() and (
            not self.progress_path.is_file() or self.results_path.stat().st_mtime >= self.progress_path.stat().st_mtime
        ):
            digest = self.results_digest_path.read_text().strip() if self.results_digest_path.is_file() else None
            return _read_parquet(self.results_path, digest)
        return self.joined_parts()


class RunAsOf(RunDir):
    """A read-only view of a run as it stood after ``step``: its results, progress and timings up to
    that step (``show --step``, ``compare --step``: runs of different lengths compared at one step).
    Rows a run writes only at its last step are absent unless ``step`` is that step."""

    def __init__(self, path: Path | str, step: int):
        super().__init__(path)
        self.manifest()  # a one-line error for a directory that is not a run
        done = RunDir(path).completed_step()  # the whole run's (this view's own is capped at self.step)
        if step < 0 or step > done:
            raise RunDirError(f"{self.path}: --step {step}: the run has completed steps 0..{done}")
        self.step = step

    def _progress_file(self) -> dict:
        progress = super()._progress_file()

        def keep(per_step: dict) -> dict:
            return {k: v for k, v in per_step.items() if int(k) <= self.step}

        return {
            **progress,
            "completed_step": self.step,
            "timestamps": keep(progress["timestamps"]),
            "seconds": keep(progress["seconds"]),
        }

    def results(self) -> pl.DataFrame:
        return super().results().filter(pl.col("step") <= self.step)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = f"{err.msg} at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise RunDirError(f"{path}: damaged {what}, cannot be read ({reason})") from None


def _check_digest(path: Path, digest: str | None) -> None:
    if digest is not None and path.is_file() and file_digest(path) != digest:
        raise RunDirError(
            f"{path}: damaged results file (its bytes do not match the digest recorded when it was written)"
        )


def _read_parquet(path: Path, digest: str | None = None) -> pl.DataFrame:
    """A results table, checked against its recorded digest first (None: an older run's, unchecked)."""
    _check_digest(path, digest)
    try:
        return pl.read_parquet(path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # polars raises several kinds for a garbled file, a panic among them
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RunDirError(f"{path}: damaged results file, cannot be read ({reason})") from None


def run_id(identity: dict) -> str:
    """A stable id: the same configuration always gets the same id (so a resumed run keeps it)."""
    import hashlib

    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def identity_of(config: RunConfig, **resolved) -> dict:
    """The fields that must match for a directory to be resumed."""
    identity = {**asdict(config), **resolved}
    for s in RUN_SETTINGS:
        if s.identity == UNLESS_DEFAULT and identity.get(s.name) == s.default:
            del identity[s.name]
    return identity
