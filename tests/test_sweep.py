"""lifelong sweep: spec checking, and sweeps on a real local Ray instance (2 CPUs) whose cells equal the
same runs replayed one by one, after a worker killed mid-cell and after a driver killed mid-sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from lifelong import cli
from lifelong.cli import expand_sweeps
from lifelong.replay import replay
from lifelong.run import RunConfig, RunDir
from lifelong.sweep import CRASH_ENV, SpecError, SweepDir, format_sweep, load_spec, parse_spec, run_sweep
from streams import EditStream
from tests.conftest import TINY_FT, make_edits

ROOT = Path(__file__).resolve().parents[1]

# 2 editors x 2 seeds on the tests' stream; FT with the tiny-model settings, max_steps as a one-value grid
# (so it is a swept setting: in the cell names and a results column).
SPEC = """
model = "tiny-llama"
stream = "tiny.jsonl"
steps = 3
probe_every = 2
editors = ["ft", "memory"]
seeds = [0, 1]
[set.ft]
layer = {layer}
lr = {lr}
norm_constraint = {norm_constraint}
max_steps = [{max_steps}]
""".format(**TINY_FT)


def write_spec(directory: Path, text: str = SPEC) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    EditStream(make_edits()).to_jsonl(directory / "tiny.jsonl")
    (directory / "spec.toml").write_text(text)
    return directory / "spec.toml"


def rows(run: RunDir) -> pl.DataFrame:
    return run.results().sort(["step", "probe", "metric", "protocol", "edit_id"])


# -- the spec


def test_spec_cells_names_and_settings(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC + "[set.memory]\ntop_k = [1, 2]\n"))
    ids = [c.id for c in spec.cells]
    assert ids == [
        "ft-tiny-max_steps=15-seed0",
        "ft-tiny-max_steps=15-seed1",
        "memory-tiny-top_k=1-seed0",
        "memory-tiny-top_k=1-seed1",
        "memory-tiny-top_k=2-seed0",
        "memory-tiny-top_k=2-seed1",
    ]
    ft = spec.cells[0].config
    assert ft.editor_overrides == TINY_FT and ft.stream == str(tmp_path / "tiny.jsonl") and ft.steps == 3
    assert spec.cells[3].settings == {"top_k": 1} and spec.cells[3].config.editor_overrides == {"top_k": "1"}
    assert spec.swept == ["max_steps", "top_k"] and all(c.steps == 3 for c in spec.cells)
    assert load_spec(write_spec(tmp_path)).values == load_spec(tmp_path / "spec.toml").values  # stable


BAD = [
    ("colour = 1\n" + SPEC, "key 'colour': unknown key"),
    (SPEC.replace('editors = ["ft", "memory"]', ""), "key 'editors': is required"),
    (SPEC.replace('"memory"', '"nope"'), "key 'editors': unknown editor 'nope'"),
    (SPEC.replace("seeds = [0, 1]", "seeds = 3"), "key 'seeds'"),
    (SPEC.replace("seeds = [0, 1]", "seeds = [0, 0]"), "key 'seeds': lists a seed twice"),
    (SPEC.replace("steps = 3", "steps = 0"), "key 'steps'"),
    (SPEC.replace("steps = 3", "steps = 99"), "key 'steps'"),
    (SPEC.replace("tiny.jsonl", "missing.jsonl"), "key 'stream'"),
    (SPEC.replace("probe_every = 2", 'probe_every = 2\nprobes = ["nope"]'), "key 'probes'"),
    (SPEC.replace("lr = 0.05", "lr = -1"), "key 'set.ft.lr'"),
    (SPEC.replace("max_steps = [15]", "max_steps = []"), "key 'set.ft.max_steps'"),
    (SPEC.replace("max_steps = [15]", "nonsense = 1"), "key 'set.ft.nonsense'"),
    (SPEC + "[set.rome]\nlayer = [1]\n", "key 'set.rome': editor 'rome' is not in editors"),
    (SPEC.replace('model = "tiny-llama"', 'model = "no-such-model"'), "key 'model'"),
    ("editors = [", "not valid TOML"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_bad_spec_refused_in_one_line_before_anything_is_written(tmp_path, capsys, text, message):
    spec = write_spec(tmp_path / "spec", text)
    out = tmp_path / "out"
    assert cli.main(["sweep", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lifelong: error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()
    with pytest.raises(SpecError, match="key|TOML"):
        parse_spec(text, "spec", tmp_path / "spec")


def test_other_spec_in_a_sweep_dir_is_refused(tmp_path):
    sweep = SweepDir(tmp_path / "out")
    sweep.save({"spec": {"seeds": [0]}, "cells": []})
    before = sweep.state_path.read_text()
    with pytest.raises(ValueError, match="holds a sweep of another spec"):
        run_sweep(load_spec(write_spec(tmp_path / "spec")), sweep.path, progress=False)
    assert sweep.state_path.read_text() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(ValueError, match="not a sweep directory"):
        run_sweep(load_spec(tmp_path / "spec" / "spec.toml"), tmp_path / "other", progress=False)


# -- on Ray


@pytest.fixture(scope="module")
def cluster():
    """A real local Ray instance with 2 CPUs, shared by this module's sweeps (starting one takes ~30 s here)."""
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    return write_spec(tmp_path_factory.mktemp("spec"))


@pytest.fixture(scope="module")
def expected(spec_path, tmp_path_factory) -> dict[str, pl.DataFrame]:
    """Each cell replayed on its own, one after another, in this process."""
    root = tmp_path_factory.mktemp("serial")
    return {
        c.id: rows(replay(c.config, root / c.id, progress=False, threads=1).run) for c in load_spec(spec_path).cells
    }


def check_equal(out: Path, expected: dict[str, pl.DataFrame]) -> dict:
    state = SweepDir(out).state()
    assert [c["state"] for c in state["cells"]] == ["done"] * 4, state["cells"]
    for cell in state["cells"]:
        assert rows(RunDir(out / "cells" / cell["id"])).equals(expected[cell["id"]]), cell["id"]
    return state


@pytest.mark.ray
def test_sweep_on_local_ray_with_a_worker_killed_equals_cells_replayed_one_by_one(
    cluster, spec_path, expected, tmp_path, monkeypatch, capsys
):
    marker = tmp_path / "crash-once"  # the test hook: the first cell's worker exits after its first step
    monkeypatch.setenv(CRASH_ENV, str(marker))
    out = tmp_path / "sweep"
    result = run_sweep(load_spec(spec_path), out, workers=2, progress=False)
    assert (result.workers, result.cores_per_worker) == (2, 1)
    state = check_equal(out, expected)
    assert all(c["error"] is None for c in state["cells"])
    crashed = RunDir(marker.read_text())  # Ray ran its task again on a new worker, which resumed the run
    assert [s["from_step"] for s in crashed.manifest()["sessions"]] == [0, 1]
    assert state["spec"]["editors"] == ["ft", "memory"] and state["spec"]["seeds"] == [0, 1]
    table = pl.read_parquet(out / "results.parquet")
    assert table.columns[:5] == ["cell", "editor", "stream", "seed", "max_steps"]
    assert table.schema["max_steps"] == pl.Int64 and table.schema["seed"] == pl.Int64
    assert set(table["cell"]) == set(expected)
    for cell, part in table.group_by("cell"):
        assert (
            part.drop(table.columns[:5])
            .sort(["step", "probe", "metric", "protocol", "edit_id"])
            .equals(expected[cell[0]])
        ), cell
    memory = table.filter(pl.col("editor") == "memory")
    assert memory["max_steps"].null_count() == memory.height > 0
    # show; compare and plot take a sweep directory as its done cells
    assert cli.main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert all(c in shown for c in expected) and "ft-tiny-max_steps=15" in shown
    # Both editors are deterministic and the seeds draw no sample: seed 1 repeats seed 0, counted once.
    assert "ft-tiny-max_steps=15: seed 1 repeats seed 0 exactly" in shown and "counted once" in shown
    assert "mean over seeds" in shown and format_sweep(out) in shown  # (Ray may print a note on the dead worker)
    assert expand_sweeps([str(out)]) == [str(out / "cells" / c["id"]) for c in state["cells"]]
    # a finished sweep run again does nothing (no Ray needed) and keeps everything
    before = {c["id"]: RunDir(out / c["dir"]).progress() for c in state["cells"]}
    again = run_sweep(load_spec(spec_path), out, progress=False)
    assert again.counts()["done"] == 4
    assert before == {c["id"]: RunDir(out / c["dir"]).progress() for c in state["cells"]}


@pytest.mark.ray
def test_driver_killed_mid_sweep_then_rerun_gives_the_same_results(cluster, spec_path, expected, tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIFELONG_THREADS": "1"}
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lifelong.cli",
            "sweep",
            str(spec_path),
            "--out",
            str(out),
            "--address",
            cluster,
            "--workers",
            "1",
            "--quiet",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and driver.poll() is None:
            if SweepDir(out).state_path.is_file() and any(c["state"] == "done" for c in SweepDir(out).state()["cells"]):
                break
            time.sleep(0.2)
        assert driver.poll() is None, driver.stderr.read()
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone; its running cell is cut off mid-way
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    driver.stderr.close()
    killed = SweepDir(out).state()["cells"]
    first = [c["id"] for c in killed if c["state"] == "done"]
    assert first and len(first) < 4, killed
    run_sweep(load_spec(spec_path), out, workers=2, progress=False)
    state = check_equal(out, expected)
    for cell in state["cells"]:
        if cell["id"] in first:  # kept, not run again
            assert cell["attempts"] == 1 and len(RunDir(out / cell["dir"]).manifest()["sessions"]) == 1


# -- the driver's bookkeeping, on a stand-in for Ray that runs each task at once in this process


class _Ref:
    def __init__(self, fn, args):
        self.value, self.error = None, None
        try:
            self.value = fn(*args)
        except Exception as err:  # noqa: BLE001 — handed to the driver, as ray.get would
            self.error = err


class _Task:
    def __init__(self, fn):
        self.fn = fn

    def options(self, **kwargs):
        return self

    def remote(self, *args):
        return _Ref(self.fn, args)


class _InlineRay:
    """The few calls run_sweep makes, with tasks run in order in this process."""

    def cluster_resources(self):
        return {"CPU": 2.0}

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": 2.0}}]

    def remote(self, fn):
        return _Task(fn)

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.value


def test_a_failing_cell_is_retried_then_marked_failed_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    from contextlib import contextmanager

    import lifelong.sweep as sweep_module

    @contextmanager
    def inline(address, device):
        yield _InlineRay()

    monkeypatch.setattr(sweep_module, "ray_session", inline)
    monkeypatch.setenv("TQDM_DISABLE", "1")  # run_cell sets it; restored after the test
    # layer 99 passes the spec's checks (the model's depth is known only once it is loaded) and fails in the task
    text = (
        SPEC.replace("layer = 1", "layer = [1, 99]")
        .replace("seeds = [0, 1]", "seeds = [0]")
        .replace('"ft", "memory"', '"ft"')
    )
    spec = write_spec(tmp_path / "spec", text)
    out = tmp_path / "out"
    assert cli.main(["sweep", str(spec), "--out", str(out), "--quiet"]) == 1
    printed = capsys.readouterr()
    cells = {c["id"]: c for c in SweepDir(out).state()["cells"]}
    bad, good = cells["ft-tiny-layer=99-max_steps=15-seed0"], cells["ft-tiny-layer=1-max_steps=15-seed0"]
    assert (bad["state"], bad["attempts"]) == ("failed", 1) and "out of range" in bad["error"]  # not retried
    assert (good["state"], good["attempts"], good["error"]) == ("done", 1, None)
    assert "failed after 1 attempts" in printed.err and "1 cell(s) failed" in printed.out
    assert "error: UserError" in format_sweep(out)  # layer 99: a user mistake, found in the task
    table = pl.read_parquet(out / "results.parquet")
    assert set(table["cell"]) == {good["id"]} and table.schema["layer"] == pl.Int64
    # run again: the failed cell is tried again (and fails again), the done one is kept
    assert cli.main(["sweep", str(spec), "--out", str(out), "--quiet"]) == 1
    again = {c["id"]: c for c in SweepDir(out).state()["cells"]}
    assert again[bad["id"]]["attempts"] == 2 and again[good["id"]]["attempts"] == 1


def test_only_failures_that_could_pass_again_are_retried():
    """A task that raised a user mistake (as such, or wrapped by Ray with it as the cause) would fail the
    same way again; anything else (a bug that may be transient, a lost resource) is retried."""
    from lifelong.sweep import _is_user_error
    from streams.errors import UserError

    class Wrapped(Exception):  # what Ray raises on the driver for a task's exception
        def __init__(self, cause):
            self.cause = cause

    assert _is_user_error(UserError("layer 99 out of range")) and _is_user_error(Wrapped(UserError("x")))
    assert not _is_user_error(RuntimeError("CUDA error")) and not _is_user_error(Wrapped(MemoryError()))


def test_an_address_where_nothing_answers_is_refused_in_one_line(tmp_path, capsys):
    spec = write_spec(tmp_path / "spec")
    for address, message in (("127.0.0.1:1", "no Ray cluster answers there"), ("nonsense", "--address must be")):
        assert cli.main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--address", address]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lifelong: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


# -- what the sweep's bar says of running cells (workers draw no bars)


def test_a_running_cells_activity_is_read_from_its_run_directory(tmp_path, stream_file):
    import os

    from lifelong.sweep import cell_activity, running_note

    cell = tmp_path / "cell"
    now = time.time()
    assert cell_activity(cell, 3, now - 10, now) == "starting"
    assert cell_activity(cell, 3, now - 400, now) == "waiting 6m40s to start (its worker may be short of CPU)"
    config = RunConfig(model="tiny-llama", stream=str(stream_file), steps=3, editor_overrides=dict(TINY_FT))
    replay(config, cell, stop_after=1, progress=False)
    now = time.time()
    assert cell_activity(cell, 3, now - 30, now) == "on step 2/3"
    old = now - 300
    for name in ("manifest.json", "steps.jsonl"):
        os.utime(cell / name, (old, old))
    assert cell_activity(cell, 3, now - 400, now) == "on step 2/3, last step done 5m00s ago"
    # files older than the submission are an earlier attempt's: this one's worker has not begun
    assert cell_activity(cell, 3, now - 100, now) == "waiting 1m40s to start (its worker may be short of CPU)"
    (cell / "steps.jsonl").unlink()
    (cell / "progress.json").unlink()
    os.utime(cell / "manifest.json", (now - 75, now - 75))
    assert cell_activity(cell, 3, now - 80, now) == "preparing for 1m15s (key statistics, θ0 probes)"
    assert running_note([("a", "starting"), ("b", "on step 2/3"), ("c", "starting")]) == (
        "a: starting; b: on step 2/3; +1 more running"
    )
    assert running_note([]) == ""


class _LazyRef:
    def __init__(self, fn, args):
        self.fn, self.args, self.ran = fn, args, False

    def run(self):
        if not self.ran:
            self.ran, self.ref = True, _Ref(self.fn, self.args)
        return self.ref


class _StarvedRay(_InlineRay):
    """Tasks start only at the third wait: until then their workers wait for a CPU."""

    waits = 0

    def remote(self, fn):
        task = _Task(fn)
        task.remote = lambda *args: _LazyRef(fn, args)  # type: ignore[method-assign]
        return task

    def wait(self, refs, num_returns=1, timeout=None):
        self.waits += 1
        if self.waits < 3:
            return [], refs
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return super().get(ref.run())


def test_the_sweep_bar_says_a_cell_waits_to_start(tmp_path, monkeypatch):
    from contextlib import contextmanager

    import lifelong.core.bars as bars
    import lifelong.sweep as sweep_module

    @contextmanager
    def starved(address, device):
        yield _StarvedRay()

    notes: list[str] = []
    real = bars.bar

    def recording(*args, **kwargs):
        made = real(*args, **kwargs)
        shown = made.set_postfix_str

        def note(text="", refresh=True):
            notes.append(text)
            return shown(text, refresh=refresh)

        made.set_postfix_str = note
        return made

    monkeypatch.setattr(sweep_module, "ray_session", starved)
    monkeypatch.setattr(sweep_module, "START_HINT", 0.0)
    monkeypatch.setattr(bars, "bar", recording)
    monkeypatch.setenv("TQDM_DISABLE", "0")  # run_cell sets it; restored after the test
    text = (
        SPEC.replace("seeds = [0, 1]", "seeds = [0]")
        .replace('"ft", "memory"', '"ft"')
        .replace("\nsteps = 3", "\nsteps = 1")
    )
    spec = load_spec(write_spec(tmp_path / "spec", text))
    run_sweep(spec, tmp_path / "out", progress=True)
    cell = spec.cells[0].id
    assert notes[0].startswith(f"cells 0/1 done, 1 running, 0 failed | {cell}: waiting 0s to start")
    assert notes[-1] == "cells 1/1 done, 0 running, 0 failed"
