"""Sweeps: editors × streams × seeds × settings, each combination (a *cell*) one ordinary run
directory, run as Ray tasks on one machine (the default) or on a cluster.

A spec is a TOML file::

    model = "smollm2-135m"
    stream = "builtin"            # or a list of streams
    steps = 20
    probe_every = 5
    editors = ["ft", "rome"]
    seeds = [0, 1, 2]
    probes = ["weight_drift"]     # optional, as --probe
    [set.rome]
    layer = [5, 6, 8]             # a list is swept; a single value is fixed

A sweep directory::

    DIR/sweep.json       the spec, and each cell: settings, run directory, state (pending, running,
                         done, failed), attempts, last error; written atomically at each change
    DIR/cells/CELL/      each cell's run directory (replay's; resumable, show/plot/checkout work on it)
    DIR/results.parquet  every finished cell's rows, with columns cell, editor, stream, seed and each
                         swept setting

Every cell is one Ray task with declared resources (``num_cpus`` = the cores of one worker,
``num_gpus`` = 1 on CUDA); the replay inside it uses as many compute threads as it has CPUs.
Workers read the model, the streams and write the run directories through paths every node sees
(a shared filesystem), and import the same version of this package as the driver.

Faults: Ray re-runs a task whose worker died (``max_retries``); a cell whose task raised is
submitted again up to ``retries`` times (not when it raised a user error, which would recur); then it
is marked failed with its error, and the other
cells go on. Re-running the same sweep keeps the done cells, resumes the interrupted ones from
their last complete step (replay resumes a run directory) and tries the failed ones again.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lifelong.run import RUN_SETTINGS, RunConfig, RunDir, atomic_write_parquet, atomic_write_text
from streams.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# One value for every cell: the replay's declared settings a sweep takes as they are (lifelong/run.py).
SCALAR_SETTINGS = tuple(s for s in RUN_SETTINGS if s.sweep == "scalar")
SPEC_KEYS = ("model", "stream", *(s.name for s in SCALAR_SETTINGS), "editors", "seeds", "probes", "retries", "set")
RETRIES = 2  # submissions again of a cell whose task raised (worker deaths: Ray's max_retries below)
WORKER_RETRIES = 2  # Ray re-runs of a task whose worker process died
STATES = ("pending", "running", "done", "failed")
LOCK_WAIT = 120.0  # seconds a task waits for an earlier worker of its cell to release the run directory
# Test hook (tests/test_sweep.py): a path; the first cell to create that file runs one step, then its
# worker process exits at once (os._exit), as a killed worker would. Read by the driver, passed to tasks.
CRASH_ENV = "LIFELONG_SWEEP_TEST_CRASH_ONCE"


class SpecError(UserError):
    """A sweep spec that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class Cell:
    """One combination of the spec: a run configuration and its stable name."""

    id: str
    editor: str
    stream: str
    seed: int
    settings: dict  # the swept settings of this cell: name -> TOML value
    config: RunConfig
    steps: int  # steps of its stream (as cut by ``steps``)

    @property
    def group(self) -> str:
        """The name without its seed: the cells of one configuration share it."""
        return self.id.rsplit("-seed", 1)[0]


@dataclass
class Spec:
    """A parsed, checked spec: the normalized values and the cells they make."""

    values: dict
    cells: list[Cell]
    path: Path | None = None

    @property
    def swept(self) -> list[str]:
        """The names of the swept settings, over all editors, in first-seen order."""
        return list(dict.fromkeys(k for c in self.cells for k in c.settings))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "_"


def _stream_slug(stream: str) -> str:
    if stream.endswith(".jsonl"):
        return _slug(Path(stream).stem)
    return _slug(stream.replace(":", "-"))


def _as_override(value) -> str:
    """A TOML value as the string ``--set key=value`` would give."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _scalar(value) -> bool:
    return isinstance(value, (str, int, float, bool))


def parse_spec(text: str, where: str = "spec", base: Path | None = None) -> Spec:
    """Check a spec's TOML text and make its cells; a bad spec raises :class:`SpecError` naming the key.
    Relative stream files and model directories are taken from ``base`` (the spec file's folder)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{where}: not valid TOML: {err}") from None
    spec = _SpecReader(raw, where, base or Path.cwd())
    unknown = [k for k in raw if k not in SPEC_KEYS]
    if unknown:
        raise spec.bad(unknown[0], f"unknown key (expected one of {', '.join(SPEC_KEYS)})")
    model, streams, scalars = spec.model(), spec.streams(), spec.scalars()
    retries = spec.whole("retries", RETRIES, 0)
    editors, seeds = spec.editors(), spec.seeds()
    probes = spec.probes(scalars["probe_every"])
    grids = spec.grids(editors)
    lengths = spec.stream_lengths(streams, scalars)
    cells = [
        Cell("-".join(parts + [f"seed{seed}"]), editor, stream, seed, chosen, config, lengths[stream])
        for editor in editors
        for stream in streams
        for chosen, overrides, parts in _grid_points(editor, stream, *grids.get(editor, ({}, {})))
        for seed in seeds
        for config in [
            RunConfig(
                model=model,
                editor=editor,
                editor_overrides=overrides,
                stream=stream,
                seed=seed,
                probes=list(probes),
                **scalars,
            )
        ]
    ]
    ids = [c.id for c in cells]
    twice = next((i for i in ids if ids.count(i) > 1), None)
    if twice:
        raise spec.bad("stream", f"two cells would share the name '{twice}' (streams with one file name?)")
    values = {"model": model, "stream": streams, **scalars, "editors": editors, "seeds": seeds}
    return Spec({**values, "probes": list(probes), "retries": retries, "set": raw.get("set", {})}, cells)


def _grid_points(editor: str, stream: str, fixed: dict, swept: dict):
    """(the swept settings chosen, every override as text, the cell name's parts) per point of a grid."""
    names = sorted(swept)
    for combo in itertools.product(*(swept[n] for n in names)):
        chosen = dict(zip(names, combo))
        overrides = {k: _as_override(v) for k, v in {**fixed, **chosen}.items()}
        parts = [editor, _stream_slug(stream)] + [f"{n}={_slug(_as_override(v))}" for n, v in chosen.items()]
        yield chosen, overrides, parts


class _SpecReader:
    """Reads one key of a parsed sweep spec at a time, each refused in one line naming the key."""

    def __init__(self, raw: dict, where: str, base: Path):
        self.raw, self.where, self.base = raw, where, base

    def bad(self, key: str, message: str) -> SpecError:
        return SpecError(f"{self.where}: key '{key}': {message}")

    def whole(self, key: str, default, least: int):
        value = self.raw.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise self.bad(key, f"must be a whole number ≥ {least}, got {value!r}")
        return value

    def model(self) -> str:
        from lifelong.core.names import DEFAULT_MODEL, TINY_MODELS

        model = self.raw.get("model", DEFAULT_MODEL)
        if not isinstance(model, str) or not model:
            raise self.bad("model", f"must be a model name or directory, got {model!r}")
        if model == DEFAULT_MODEL or model.split(":")[0] in TINY_MODELS:
            return model
        directory = Path(model).expanduser()
        directory = directory if directory.is_absolute() else self.base / directory
        if not directory.is_dir():
            known = f"{DEFAULT_MODEL}, {', '.join(TINY_MODELS)}"
            raise self.bad("model", f"'{model}' is neither a registered model ({known}) nor a directory")
        return str(directory.resolve())

    def streams(self) -> list[str]:
        streams = self.raw.get("stream", "builtin")
        streams = [streams] if isinstance(streams, str) else streams
        if not isinstance(streams, list) or not streams or not all(isinstance(s, str) and s for s in streams):
            raise self.bad("stream", "must be a stream name, a .jsonl file, or a non-empty list of them")
        base = self.base
        streams = [
            str((base / s).resolve()) if s.endswith(".jsonl") and not Path(s).is_absolute() else s for s in streams
        ]
        if len(set(streams)) < len(streams):
            raise self.bad("stream", "lists a stream twice")
        return streams

    def scalars(self) -> dict[str, Any]:
        """The replay's declared settings a sweep takes as one value (lifelong/run.py), checked as declared."""
        scalars = {}
        for setting in SCALAR_SETTINGS:
            try:
                scalars[setting.name] = setting.check(self.raw.get(setting.name, setting.default), setting.name)
            except UserError as err:
                raise self.bad(setting.name, str(err).split(" ", 1)[1]) from None
        if not (scalars["device"] == "cpu" or scalars["device"].startswith("cuda")):
            raise self.bad("device", f"must be 'cpu' or 'cuda', got {scalars['device']!r}")
        if scalars["preset"] is not None:  # its batching and schedule, so cells count their steps as they run
            from lifelong.presets import apply_preset

            try:
                applied, choice = apply_preset(RunConfig(**scalars))
            except UserError as err:
                raise self.bad("preset", str(err)) from None
            if choice is not None and choice.sequence_length is not None:
                raise self.bad(
                    "preset", f"{choice.spec} writes a directory of runs, not one run per cell: use lifelong replay"
                )
            scalars.update({k: getattr(applied, k) for k in ("preset", "batch_size", "probe_every")})
        return scalars

    def editors(self) -> list[str]:
        from lifelong.editors import UnknownEditorError, editor_class

        editors = self.raw.get("editors")
        if editors is None:
            raise self.bad("editors", "is required: a list of editor names (see 'lifelong editors')")
        if not isinstance(editors, list) or not editors or not all(isinstance(e, str) for e in editors):
            raise self.bad("editors", "must be a non-empty list of editor names")
        for e in editors:
            try:
                editor_class(e)
            except UnknownEditorError as err:
                raise self.bad("editors", str(err)) from None
        if len(set(editors)) < len(editors):
            raise self.bad("editors", "lists an editor twice")
        return editors

    def seeds(self) -> list[int]:
        seeds = self.raw.get("seeds", [0])
        if (
            not isinstance(seeds, list)
            or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        ):
            raise self.bad("seeds", f"must be a non-empty list of whole numbers ≥ 0, got {seeds!r}")
        if len(set(seeds)) < len(seeds):
            raise self.bad("seeds", "lists a seed twice")
        return seeds

    def probes(self, probe_every: int) -> list[str]:
        from lifelong.replay import default_suite

        probes = self.raw.get("probes", [])
        if not isinstance(probes, list) or not all(isinstance(p, str) for p in probes):
            raise self.bad(
                "probes", 'must be a list of probe specs as --probe takes them, e.g. "perplexity:schedule=every:5"'
            )
        try:
            default_suite(RunConfig(probes=list(probes), probe_every=probe_every))
        except ValueError as err:
            raise self.bad("probes", str(err)) from None
        return probes

    def grids(self, editors: list[str]) -> dict[str, tuple[dict, dict]]:
        """editor -> (fixed settings, swept settings) from the ``[set.EDITOR]`` tables."""
        settings = self.raw.get("set", {})
        if not isinstance(settings, dict):
            raise self.bad("set", "must be tables [set.EDITOR] of settings")
        grids = {}
        for editor, table in settings.items():
            key = f"set.{editor}"
            if editor not in editors:
                raise self.bad(key, f"editor '{editor}' is not in editors")
            if not isinstance(table, dict):
                raise self.bad(key, "must be a table of settings, e.g. layer = [5, 6]")
            fixed: dict[str, Any] = {}
            swept: dict[str, list] = {}
            for name, value in table.items():
                self._check_setting(editor, f"{key}.{name}", name, value)
                (swept if isinstance(value, list) else fixed)[name] = value
            grids[editor] = (fixed, swept)
        return grids

    def _check_setting(self, editor: str, key: str, name: str, value) -> None:
        from lifelong.editors import editor_class, parse_overrides

        values = value if isinstance(value, list) else [value]
        if not values or not all(_scalar(v) for v in values):
            raise self.bad(key, f"must be a value or a non-empty list of values, got {value!r}")
        if len({_as_override(v) for v in values}) < len(values):
            raise self.bad(key, "lists a value twice")
        for v in values:
            try:
                parse_overrides(editor_class(editor).Params, {name: _as_override(v)}, editor)
            except ValueError as err:
                raise self.bad(key, str(err)) from None

    def stream_lengths(self, streams: list[str], scalars: dict) -> dict[str, int]:
        from lifelong.replay import prepare_stream_and_facts

        lengths = {}
        for stream in streams:
            try:
                lengths[stream] = len(prepare_stream_and_facts(RunConfig(stream=stream, **scalars))[1])
            except (ValueError, FileNotFoundError, OSError) as err:
                raise self.bad("steps" if "--steps" in str(err) else "stream", str(err)) from None
        return lengths


def load_spec(path: Path | str) -> Spec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"{path}: cannot read the spec: {err.strerror or err}") from None
    spec = parse_spec(text, str(path), path.resolve().parent)
    spec.path = path.resolve()
    return spec


# -- the sweep directory


def is_sweep_dir(path: Path | str) -> bool:
    return (Path(path) / "sweep.json").is_file()


class SweepDir:
    """Reads and writes a sweep directory (see the module's docstring)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    state_path = property(lambda self: self.path / "sweep.json")
    results_path = property(lambda self: self.path / "results.parquet")
    cells_dir = property(lambda self: self.path / "cells")

    def state(self) -> dict:
        if not self.state_path.is_file():
            raise UserError(f"{self.path}: not a sweep directory (no sweep.json)")
        try:
            return json.loads(self.state_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{self.state_path}: unreadable: {err}") from None

    def save(self, state: dict) -> None:
        state["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(self.state_path, json.dumps(state, indent=1))

    def cell_dir(self, cell_id: str) -> Path:
        return self.cells_dir / cell_id

    def runs(self, states: tuple[str, ...] = ("done",)) -> list[RunDir]:
        """The run directories of the cells in ``states`` (in the spec's order)."""
        return [
            RunDir(self.cell_dir(c["id"]))
            for c in self.state()["cells"]
            if c["state"] in states and RunDir(self.cell_dir(c["id"])).exists()
        ]

    def check_target(self, spec: Spec) -> None:
        """Refuse a directory that holds something else, or a sweep of another spec (nothing is written)."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise UserError(f"{self.path} is not a directory; choose another --out")
        if not self.state_path.is_file():
            if any(p.name != ".lock" for p in self.path.iterdir()):
                raise UserError(f"{self.path} exists, is not empty and is not a sweep directory; choose another --out")
            return
        old = self.state().get("spec")
        if old != json.loads(json.dumps(spec.values)):
            diffs = [k for k in SPEC_KEYS if (old or {}).get(k) != json.loads(json.dumps(spec.values)).get(k)]
            raise UserError(
                f"{self.path} holds a sweep of another spec (differs in: {', '.join(diffs) or '?'}); "
                "choose another --out or delete it"
            )

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One driver per sweep directory (an OS lock on ``DIR/.lock``, released however the driver ends)."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{self.path}: another sweep driver is running on this directory") from None
            yield
        finally:
            os.close(fd)

    def write_results(self, spec_cells: list[dict] | None = None) -> Path | None:
        """``results.parquet``: the rows of every done cell, with its cell, editor, stream, seed and swept settings."""
        import polars as pl

        state = self.state()
        cells = [c for c in (spec_cells or state["cells"]) if c["state"] == "done"]
        swept = list(dict.fromkeys(k for c in state["cells"] for k in c["settings"]))
        kinds = {k: _column_type([c["settings"][k] for c in state["cells"] if k in c["settings"]]) for k in swept}
        tables = []
        for c in cells:
            run = RunDir(self.cell_dir(c["id"]))
            rows = run.results()
            extra = [
                pl.lit(c["id"]).alias("cell"),
                pl.lit(c["editor"]).alias("editor"),
                pl.lit(c["stream"]).alias("stream"),
                pl.lit(c["seed"], pl.Int64).alias("seed"),
            ]
            extra += [pl.lit(_typed(c["settings"].get(k), kinds[k]), kinds[k]).alias(setting_column(k)) for k in swept]
            tables.append(rows.select(extra + [pl.col(n) for n in rows.columns]))
        if not tables:
            return None
        atomic_write_parquet(pl.concat(tables), self.results_path)
        return self.results_path


RESERVED_COLUMNS = (
    "cell",
    "editor",
    "stream",
    "seed",
    "run_id",
    "step",
    "timestamp",
    "probe",
    "metric",
    "protocol",
    "edit_id",
    "value",
)


def setting_column(name: str) -> str:
    """The results column of a swept setting: its name, or ``set_NAME`` where that names another column
    (an editor's own ``seed`` hyperparameter)."""
    return f"set_{name}" if name in RESERVED_COLUMNS else name


def _column_type(values: list):
    import polars as pl

    if all(isinstance(v, bool) for v in values):
        return pl.Boolean
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return pl.Int64
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return pl.Float64
    return pl.String


def _typed(value, kind):
    import polars as pl

    if value is None:
        return None
    if kind == pl.String:
        return _as_override(value)
    if kind == pl.Float64:
        return float(value)
    return value


# -- one cell, inside a Ray task


def run_cell(config: dict, path: str, threads: int, crash_marker: str | None = None) -> dict:
    """Replay one cell into its run directory (resuming it); returns its completed and total steps."""
    os.environ["TQDM_DISABLE"] = "1"  # no bars in workers, the one-time ones included
    from lifelong.replay import replay
    from lifelong.run import RunDirError

    cfg = RunConfig(**config)
    if crash_marker:  # test hook (CRASH_ENV): the first cell to claim the marker dies after one step
        try:
            fd = os.open(crash_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.write(fd, path.encode())
            os.close(fd)
            replay(cfg, path, progress=False, threads=threads, stop_after=1)
            os._exit(17)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            result = replay(cfg, path, progress=False, threads=threads)
            break
        except RunDirError as err:
            # The cell's previous worker (its driver killed, or its task cancelled) may still be ending:
            # its OS lock goes with its process, so wait for it rather than fail the attempt.
            if "is writing to this run" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    return {"completed": result.run.completed_step(), "total": result.total_steps, "steps_run": result.steps_run}


# -- the driver's view of running cells (workers draw no bars: their run directories show how they stand)

START_HINT = 60.0  # seconds a submitted cell may show no sign of its worker before the bar says it waits
STEP_HINT = 120.0  # seconds without a new step before the bar says how long ago the last one was
SHOWN_CELLS = 2  # running cells described in the bar; the rest are counted
HEARTBEAT = 2.0  # seconds between redraws of an unchanged bar (its elapsed time)


def _span(seconds: float) -> str:
    """``42s``, ``7m05s``, ``2h03m``: a duration as the bar shows it."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def cell_activity(path: Path, steps: int, submitted: float, now: float) -> str:
    """How a running cell stands, from its run directory (``submitted``, ``now``: wall-clock seconds):
    ``starting`` until its worker writes there (then, after START_HINT, how long it has waited: a
    worker short of CPU, or a task Ray has not placed yet), ``preparing`` before step 0 is done (key
    statistics, θ0 probes), then the step it is on, with the time since the last one after STEP_HINT."""
    run = RunDir(path)
    stamps = [p.stat().st_mtime for p in (run.manifest_path, run.step_log_path) if p.is_file()]
    # The replay rewrites its manifest when it starts (its session): older files are an earlier attempt's.
    if not stamps or max(stamps) < submitted - 2.0:
        waited = now - submitted
        if waited < START_HINT:
            return "starting"
        return f"waiting {_span(waited)} to start (its worker may be short of CPU)"
    done = run.completed_step()
    if done < 0:
        return f"preparing for {_span(now - max(stamps))} (key statistics, θ0 probes)"
    where = f"on step {min(done + 1, steps)}/{steps}"
    idle = now - max(stamps)
    return where + (f", last step done {_span(idle)} ago" if idle >= STEP_HINT else "")


def running_note(activities: list[tuple[str, str]]) -> str:
    """The bar's note on running cells: the first SHOWN_CELLS as ``id: activity``, the rest counted."""
    shown = [f"{cell}: {what}" for cell, what in activities[:SHOWN_CELLS]]
    more = len(activities) - SHOWN_CELLS
    return "; ".join(shown + ([f"+{more} more running"] if more > 0 else []))


# -- the driver


@dataclass
class SweepResult:
    dir: SweepDir
    cells: list[dict]  # sweep.json's cells at the end
    workers: int
    cores_per_worker: int

    def counts(self) -> dict[str, int]:
        return {s: sum(c["state"] == s for c in self.cells) for s in STATES}


def _initial_state(spec: Spec, sweep: SweepDir) -> dict:
    """sweep.json's content for this run of the driver: earlier states kept where the cell's run
    directory agrees, interrupted (running) and failed cells made pending."""
    old = {c["id"]: c for c in sweep.state()["cells"]} if sweep.state_path.is_file() else {}
    cells = []
    for cell in spec.cells:
        prior = old.get(cell.id, {})
        run = RunDir(sweep.cell_dir(cell.id))
        complete = run.exists() and run.completed_step() >= cell.steps
        state = "done" if complete else "pending"
        cells.append(
            {
                "id": cell.id,
                "editor": cell.editor,
                "stream": cell.stream,
                "seed": cell.seed,
                "settings": cell.settings,
                "dir": f"cells/{cell.id}",
                "steps": cell.steps,
                "config": dataclasses.asdict(cell.config),
                "state": state,
                "attempts": prior.get("attempts", 0),
                "error": None if complete else prior.get("error"),
            }
        )
    return {
        "spec": json.loads(json.dumps(spec.values)),
        "spec_file": str(spec.path) if spec.path else None,
        "cells": cells,
    }


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Refuse, in one line, a ``HOST:PORT`` or ``ray://HOST:PORT`` where nothing answers (Ray itself would
    retry for minutes); ``auto`` and None are left to Ray."""
    import socket

    if not address or address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--address must be auto, HOST:PORT or ray://HOST:PORT, got '{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise UserError(f"--address {address}: no Ray cluster answers there ({err.strerror or err})") from None


@contextmanager
def ray_session(address: str | None, device: str) -> Iterator[Any]:
    """The Ray instance to run on: the one this process is already connected to, an existing cluster
    (``address``: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``), or a local one sized to this machine."""
    import logging

    import ray

    from lifelong.core.machine import available_cores

    owned = not ray.is_initialized()
    if owned:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        else:
            gpus = 0
            if device.startswith("cuda"):
                import torch

                gpus = torch.cuda.device_count()
            ray.init(
                num_cpus=available_cores(),
                num_gpus=gpus,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
    try:
        yield ray
    finally:
        if owned:
            ray.shutdown()


def plan_workers(ray, workers: int | None, device: str, cells: int) -> tuple[int, int]:
    """(cells at once, CPUs per cell): ``workers`` (default: one per CPU, or one per GPU on CUDA), each
    given an equal share of the cluster's CPUs, at most one node's worth."""
    total = ray.cluster_resources()
    cpus = int(total.get("CPU", 1))
    if workers is None:
        workers = max(1, int(total.get("GPU", 0))) if device.startswith("cuda") else max(1, cpus)
    node_cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    per = max(1, cpus // max(1, min(workers, cells)))
    if node_cpus:
        per = max(1, min(per, max(node_cpus)))
    return workers, per


def _error_text(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}".strip()


def _is_user_error(err: BaseException) -> bool:
    """Whether a task failed on a user mistake (bad setting, missing file): it would fail again."""
    from streams.errors import UserError

    cause = getattr(err, "cause", None)
    return isinstance(cause if isinstance(cause, BaseException) else err, UserError)


def run_sweep(
    spec: Spec, out: Path | str, *, address: str | None = None, workers: int | None = None, progress: bool = True
) -> SweepResult:
    """Run every cell of ``spec`` not yet done into sweep directory ``out`` (see the module's docstring)."""
    from tqdm import tqdm

    from lifelong.core.bars import bar as progress_bar

    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    sweep = SweepDir(out)
    sweep.check_target(spec)  # before anything is written
    check_address(address)
    with sweep.lock():
        state = _initial_state(spec, sweep)
        sweep.save(state)
        cells = {c["id"]: c for c in state["cells"]}
        todo = [c for c in state["cells"] if c["state"] == "pending"]
        if not todo:
            sweep.write_results()
            return SweepResult(sweep, state["cells"], 0, 0)
        device = spec.values["device"]
        retries = spec.values["retries"]
        crash = os.environ.get(CRASH_ENV) or None
        with ray_session(address, device) as ray:
            n_workers, per = plan_workers(ray, workers, device, len(todo))
            task = ray.remote(run_cell).options(
                num_cpus=per,
                num_gpus=1 if device.startswith("cuda") else 0,
                max_retries=WORKER_RETRIES,
                retry_exceptions=False,
            )
            tries: dict[str, int] = {}  # submissions in this run of the driver
            queue = list(todo)
            running: dict[Any, dict] = {}

            def cell_steps(c: dict) -> int:
                if c["state"] == "done":
                    return c["steps"]
                run = RunDir(sweep.cell_dir(c["id"]))
                return max(0, run.completed_step()) if run.exists() else 0

            idle = {c["id"]: cell_steps(c) for c in state["cells"]}  # cells not running: read once

            def done_steps() -> int:
                return sum(
                    cell_steps(c) if c["state"] in ("running", "done") else idle[c["id"]] for c in state["cells"]
                )

            total = sum(c["steps"] for c in state["cells"])
            bar = progress_bar(
                total=total, initial=done_steps(), desc="sweep", unit="step", show=progress, dynamic_ncols=True
            )

            shown: list = [None, 0.0]
            submitted: dict[str, float] = {}  # wall-clock time of each running cell's submission

            def show() -> None:
                counts = {s: sum(c["state"] == s for c in state["cells"]) for s in STATES}
                now = time.time()
                activities = [
                    (c["id"], cell_activity(sweep.cell_dir(c["id"]), c["steps"], submitted[c["id"]], now))
                    for c in running.values()
                ]
                seen = (done_steps(), counts, activities)
                # Redrawn at least every HEARTBEAT seconds, unchanged or not: the elapsed time moves.
                if seen == shown[0] and now - shown[1] < HEARTBEAT:
                    return
                shown[0], shown[1] = seen, now
                bar.n = seen[0]
                note = running_note(activities)
                bar.set_postfix_str(
                    f"cells {counts['done']}/{len(state['cells'])} done, {counts['running']} running, "
                    f"{counts['failed']} failed" + (f" | {note}" if note else ""),
                    refresh=False,
                )
                bar.refresh()

            try:
                while queue or running:
                    while queue and len(running) < n_workers:
                        cell = queue.pop(0)
                        tries[cell["id"]] = tries.get(cell["id"], 0) + 1
                        cell["attempts"] += 1
                        cell["state"] = "running"
                        ref = task.remote(cell["config"], str(sweep.cell_dir(cell["id"]).resolve()), per, crash)
                        running[ref] = cell
                        submitted[cell["id"]] = time.time()
                        sweep.save(state)
                    ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                    for ref in ready:
                        cell = running.pop(ref)
                        try:
                            ray.get(ref)
                        except Exception as err:  # the task raised, or its worker died more often than retried
                            cell["error"] = _error_text(err)
                            if tries[cell["id"]] <= retries and not _is_user_error(err):
                                cell["state"] = "pending"
                                queue.append(cell)
                            else:
                                cell["state"] = "failed"
                                tqdm.write(
                                    f"cell {cell['id']} failed after {tries[cell['id']]} attempts: {cell['error']}",
                                    file=sys.stderr,
                                )
                        else:
                            cell["state"] = "done"
                            cell["error"] = None
                        idle[cell["id"]] = cell_steps(cell)
                        sweep.save(state)
                    show()
            except BaseException:
                for cell in running.values():  # interrupted: resumed by the next run of the sweep
                    cell["state"] = "pending"
                sweep.save(state)
                raise
            finally:
                bar.close()
                sweep.write_results()
        return SweepResult(sweep, list(cells.values()), n_workers, per)


# -- reading a sweep


def cell_lines(sweep: SweepDir) -> list[str]:
    """One line per cell: name, state, steps done of all, attempts, and the error of a failed one."""
    state = sweep.state()
    cells = state["cells"]
    width = max(len(c["id"]) for c in cells) + 2
    lines = [f"{'cell':<{width}}{'state':<9}{'steps':>9}  attempts  retained (es, last)", "-" * (width + 50)]
    for c in cells:
        run = RunDir(sweep.cell_dir(c["id"]))
        done = max(0, run.completed_step()) if run.exists() else 0
        retained = ""
        if c["state"] == "done":
            retained = _last_retained(run)
        steps = f"{done}/{c['steps']}"
        line = f"{c['id']:<{width}}{c['state']:<9}{steps:>9}  {c['attempts']:>8}  {retained}"
        if c.get("error"):
            line += f"  error: {c['error'][:160]}"
        lines.append(line)
    return lines


def _last_retained(run: RunDir) -> str:
    import polars as pl

    rows = run.results().filter((pl.col("metric") == "retained_fraction") & (pl.col("protocol") == "es"))
    if not rows.height:
        return ""
    value = rows.sort("step")["value"][-1]
    return "" if value is None or math.isnan(value) else f"{value:.2f}"


def format_sweep(path: Path | str) -> str:
    """``lifelong show`` of a sweep: the spec in one line, one line per cell, then each configuration's
    summary figures as the mean over its seeds ± a 95% t interval (n = seeds)."""
    from lifelong.summary import configurations, format_table, group_note, seed_mean_table

    sweep = SweepDir(path)
    state = sweep.state()
    spec = state["spec"]
    counts = {s: sum(c["state"] == s for c in state["cells"]) for s in STATES}
    head = (
        f"sweep {sweep.path}: model {spec['model']}, streams {', '.join(spec['stream'])}, "
        f"steps {spec['steps'] or 'all'}, editors {', '.join(spec['editors'])}, seeds "
        f"{', '.join(map(str, spec['seeds']))}; {len(state['cells'])} cells: "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    )
    out = [head, "", *cell_lines(sweep)]
    done = [c for c in state["cells"] if c["state"] == "done"]
    if done:
        runs = [RunDir(sweep.cell_dir(c["id"])) for c in done]
        groups = configurations(runs)
        names = [done[g[0]]["id"].rsplit("-seed", 1)[0] for g in groups]
        table = seed_mean_table(runs, groups, names)
        notes = [f"{name}: {note}" for name, g in zip(names, groups) if len(g) > 1 and (note := group_note(runs, g))]
        out += [
            "",
            "mean over seeds [95% t interval, cut to the quantity's range] n = seeds that are distinct runs, "
            "per configuration (done cells only):",
            *notes,
            "",
            format_table(table),
        ]
    return "\n".join(out)
