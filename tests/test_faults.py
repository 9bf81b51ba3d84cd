"""Nothing lost, nothing silently wrong (#17): durable writes, a kill at every write point, fuzzed input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def test_each_write_is_flushed_before_its_rename_and_its_directory_after(tmp_path, monkeypatch):
    """#17 item 12: a file published by the run's helpers survives a power cut once written."""
    import polars as pl
    import torch

    from lifelong.core.delta import atomic_save_tensors
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
        assert ("fsync", str(path.parent)) in events[i + 1 :], events  # then the rename
    # the directories the first write created were flushed into their parents
    events.clear()
    atomic_write_text(tmp_path / "x" / "y" / "z.txt", "z")
    assert [e for e in events if e[0] == "fsync"][:2] == [("fsync", str(tmp_path)), ("fsync", str(tmp_path / "x"))]


# -- a kill at every write point (#17 item 5) ------------------------------------------------------

# One process imports everything once (the imports take most of a process's start) and forks a
# fresh child per run, before it has started any thread pool (polars and torch pools do not
# survive a fork): the uninterrupted run, then per write point k a run that dies at its k-th
# os.replace (os._exit(9), as kill -9: no cleanup, no finally) and the resume that follows it.
WORKER = r"""
import json, os, sys, time, traceback
t_start = time.perf_counter()
times = []
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from lifelong.replay import replay
from lifelong.run import RunConfig

job = json.loads(sys.argv[2])
config = RunConfig(**job["config"])
root = job["root"]
real_replace = os.replace

# Warm up what every child would otherwise import and initialise again (no thread pool starts).
from lifelong.editors import make_editor
from lifelong.core.models import load_model
from lifelong.replay import default_suite, prepare_stream_and_facts

lm = load_model(config.model)
with torch.no_grad():
    lm.model(torch.tensor([lm.tokenizer("warm up").input_ids]))
make_editor(config.editor, config.editor_overrides)
default_suite(config)
prepare_stream_and_facts(config)
del lm
t_warm = time.perf_counter()


def in_child(body):
    pid = os.fork()
    if pid == 0:
        try:
            body()
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def run(out, die_at=None, record=None):
    def body():
        calls = 0

        def replace(src, dst, **kw):
            nonlocal calls
            calls += 1
            if calls == die_at:
                os._exit(9)
            real_replace(src, dst, **kw)
            if record:
                with open(record, "a") as f:
                    f.write(os.path.basename(dst) + "\n")

        os.replace = replace
        replay(config, out, progress=False, threads=1)
    t0 = time.perf_counter()
    status = in_child(body)
    times.append(round(time.perf_counter() - t0, 2))
    return status


names = os.path.join(root, "writes.txt")
report = {"whole": run(os.path.join(root, "whole"), record=names)}
writes = open(names).read().split()
report["writes"] = writes
report["killed"] = [run(os.path.join(root, f"killed-{k}"), die_at=k) for k in range(1, len(writes) + 1)]
report["left"] = [sorted(os.path.relpath(os.path.join(d, n), root)
                         for d, _, files in os.walk(os.path.join(root, f"killed-{k}")) for n in files)
                  for k in range(1, len(writes) + 1)]
report["resumed"] = [run(os.path.join(root, f"killed-{k}")) for k in range(1, len(writes) + 1)]
report["seconds"] = {"start": round(t_warm - t_start, 2), "runs": times}
print(json.dumps(report))
"""


def _tensor_file(path: Path) -> tuple:
    """A safetensors file as (metadata, {name: (dtype, shape, bytes)}): everything in it but the
    order of its header's metadata entries, which safetensors writes in a per-process hash order."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k).contiguous() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return f.metadata(), {
            k: (str(t.dtype), tuple(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes())
            for k, t in tensors.items()
        }


def _bitwise_state(run_path: Path, steps: int) -> dict:
    import polars as pl

    from lifelong.replay import checkout

    table = pl.read_parquet(run_path / "results.parquet")
    deltas = {p.name: _tensor_file(p) for p in sorted((run_path / "deltas").glob("*.safetensors"))}
    model = checkout(run_path, steps).model
    return {"results": table, "deltas": deltas, "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


@pytest.mark.slow  # about a minute: 25 tiny replays in forked processes
def test_a_kill_at_any_write_point_resumes_to_the_uninterrupted_result(tmp_path, stream_file):
    """Kill the replay (``os._exit(9)`` in a separate process) at each of its file renames in
    turn; after each, re-running the same replay gives a run bitwise equal to an uninterrupted one:
    the same results table, the same delta files (tensors and metadata), the same checked-out
    weights, and no temporary file left behind."""
    import dataclasses
    import subprocess
    import sys

    import torch

    from lifelong.run import RunConfig, RunDir, is_temporary
    from tests.conftest import TINY_FT

    config = RunConfig(
        model="tiny-llama", stream=str(stream_file), steps=2, probe_every=1, editor_overrides=dict(TINY_FT)
    )
    job = {"config": dataclasses.asdict(config), "root": str(tmp_path)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIFELONG_THREADS": "1"}
    (tmp_path / "worker.py").write_text(WORKER)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "worker.py"), str(Path(__file__).parents[1]), json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    writes = report["writes"]
    assert report["whole"] == 0 and len(writes) >= 10 and writes[-1] == "results.parquet", (report, done.stderr)
    assert report["killed"] == [9] * len(writes), (report["killed"], done.stderr[-3000:])
    assert report["resumed"] == [0] * len(writes), (report["resumed"], done.stderr[-3000:])
    expected = _bitwise_state(tmp_path / "whole", 2)
    for k, (name, left) in enumerate(zip(writes, report["left"]), start=1):
        out = tmp_path / f"killed-{k}"
        assert any(is_temporary(Path(n).name) for n in left), f"write {k} ({name}) left no temporary file: {left}"
        assert RunDir(out).completed_step() == 2
        assert not [p for p in out.rglob("*") if is_temporary(p.name)], f"temporary files left after a kill at {name}"
        got = _bitwise_state(out, 2)
        assert got["results"].equals(expected["results"]), f"results differ after a kill at write {k} ({name})"
        assert got["deltas"] == expected["deltas"], f"delta files differ after a kill at write {k} ({name})"
        assert all(torch.equal(got["weights"][n], w) for n, w in expected["weights"].items()), name


# -- fuzzing what a user can type (#17 item 6) ----------------------------------------------------

# Any text, lone surrogates included (what a non-UTF-8 byte in argv becomes).
_TEXT = st.text(st.characters(blacklist_categories=()), max_size=12)
_NUMBERS = st.sampled_from(
    [
        "0",
        "-1",
        "1",
        "2",
        "3",
        "15",
        "1e-3",
        "1e30",
        "-1e30",
        "nan",
        "inf",
        "-inf",
        "none",
        "true",
        "",
        " ",
        "1_000",
        "0x10",
        "+5",
        "99999999999999999999",
    ]
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=6,
)
_FIELDS = [
    "id",
    "timestamp",
    "subject",
    "relation_id",
    "prompt",
    "target_new",
    "target_true",
    "paraphrases",
    "neighborhood",
    "candidates",
    "chain",
    "colour",
]


@st.composite
def _stream_text(draw) -> bytes:
    """A one- or two-edit stream file, its lines valid, mutated, or raw bytes."""
    from tests.conftest import make_edits

    lines = []
    for edit in make_edits(draw(st.integers(1, 2))):
        record = edit.to_dict()
        kind = draw(st.sampled_from(["valid"] * 4 + ["field", "field", "drop", "raw"]))
        if kind == "field":
            record[draw(st.sampled_from(_FIELDS))] = draw(
                _JSON
                | st.sampled_from(
                    ["9999-12-31T23:00:00-05:00", "2024-02-30", "The {} is", "x" * 70_000, "\ud800", None]
                )
            )
        elif kind == "drop":
            record.pop(draw(st.sampled_from(_FIELDS[:6])))
        line = (json.dumps(record) if kind != "raw" else draw(_TEXT)).encode("utf-8", "surrogatepass")
        lines.append(
            draw(st.sampled_from([line, line, line[: len(line) // 2], b"\xff" + line])) if kind == "raw" else line
        )
    return b"\n".join(lines) + b"\n"


_SETS = st.tuples(
    st.lists(
        st.tuples(
            st.sampled_from(["lr", "max_steps", "layer", "norm_constraint", "stop_loss", "speed"]),
            _NUMBERS | _NUMBERS | _TEXT,
        ).map(lambda kv: f"{kv[0]}={kv[1]}"),
        max_size=2,
    ),
    st.lists(_TEXT, max_size=1) | st.just([]) | st.just([]),  # now and then an item that is not key=value
).map(lambda parts: parts[0] + parts[1])
_PROBES = st.lists(
    st.tuples(
        st.sampled_from(["weight_drift", "retention", "perplexity", "edit_quality", "nope"]),
        st.lists(
            st.tuples(
                st.sampled_from(["schedule", "max_tokens", "fraction", "seed", "chunk_tokens", "zzz"]),
                _NUMBERS | st.sampled_from(["every:0", "every:2", "log", "end", "chains"]) | _TEXT,
            ),
            max_size=2,
        ),
    ).map(lambda p: p[0] + (":" + ",".join(f"{k}={v}" for k, v in p[1]) if p[1] else "")),
    max_size=1,
)


def _tree(directory: Path) -> dict:
    return {
        p.relative_to(directory): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


_FUZZ = {"n": 0}


@pytest.mark.slow  # about a minute: a few of the 25 inputs run a replay
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=_stream_text(), sets=_SETS, probes=_PROBES)
def test_any_input_runs_or_is_refused_in_one_line_leaving_nothing(tmp_path, capsys, stream, sets, probes):
    """Every stream file, --set and --probe a user can give either runs, or is refused with one
    line and exit status 2, and then no run directory was created and an existing one is unchanged."""
    from lifelong.cli import main
    from tests.conftest import TINY_FT

    _FUZZ["n"] += 1
    path = tmp_path / f"s{_FUZZ['n']}.jsonl"
    path.write_bytes(stream)
    argv = [
        "replay",
        "--model",
        "tiny-llama",
        "--stream",
        str(path),
        "--steps",
        "1",
        "--probe-every",
        "1",
        "--quiet",
        *[f"--set={k}={v}" for k, v in TINY_FT.items() if not any(s.startswith(k + "=") for s in sets)],
        *[f"--set={s}" for s in sets],
        *[f"--probe={p}" for p in probes],
    ]
    existing = tmp_path / "existing"
    if not existing.exists():  # one finished run, shared by the examples
        assert (
            main(
                [
                    "replay",
                    "--model",
                    "tiny-llama",
                    "--stream",
                    str(_good_stream(tmp_path)),
                    "--steps",
                    "1",
                    "--quiet",
                    "--out",
                    str(existing),
                    *[f"--set={k}={v}" for k, v in TINY_FT.items()],
                ]
            )
            == 0
        )
        capsys.readouterr()
    out = tmp_path / f"r{_FUZZ['n']}"
    code = main([*argv, "--out", str(out)])
    _, err = capsys.readouterr()
    assert code in (0, 2), (code, err)
    if code == 0:
        assert (out / "results.parquet").is_file()
        return
    assert len(err.strip().splitlines()) == 1 and err.startswith("lifelong: error: "), err
    assert not out.exists(), err
    before = _tree(existing)
    assert main([*argv, "--out", str(existing)]) == 2
    capsys.readouterr()
    assert _tree(existing) == before


def _good_stream(tmp_path: Path, edits: int = 1) -> Path:
    from streams import EditStream
    from tests.conftest import make_edits

    path = tmp_path / "good.jsonl"
    EditStream(make_edits(edits)).to_jsonl(path)
    return path


# -- a full disk at each kind of write, an interrupt at the end (#37) ------------------------------

# Two steps of quick FT edits on the tiny model: the CLI command every case below runs and resumes.
_QUICK_FT = {"layer": "1", "lr": "0.05", "norm_constraint": "0.05", "max_steps": "3"}


def _replay_argv(stream: Path, out: Path) -> list[str]:
    argv = ["replay", "--model", "tiny-llama", "--stream", str(stream), "--steps", "2", "--probe-every", "1"]
    return [*argv, "--quiet", "--threads", "1", "--out", str(out), *[f"--set={k}={v}" for k, v in _QUICK_FT.items()]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(stream file, the state of an uninterrupted run of :func:`_replay_argv`), shared by the cases."""
    from lifelong.cli import main

    root = tmp_path_factory.mktemp("whole")
    stream = _good_stream(root, edits=3)
    assert main(_replay_argv(stream, root / "run")) == 0
    return stream, _bitwise_state(root / "run", 2)


def _assert_resumes_bitwise(capsys, stream: Path, out: Path, expected: dict) -> None:
    """Re-running the command completes the run, equal bitwise to the uninterrupted one, and leaves no
    temporary file behind."""
    import torch

    from lifelong.cli import main
    from lifelong.run import is_temporary

    code = main(_replay_argv(stream, out))
    _, err = capsys.readouterr()
    assert code == 0, err
    assert not [p for p in out.rglob("*") if is_temporary(p.name)]
    got = _bitwise_state(out, 2)
    assert got["results"].equals(expected["results"])
    assert got["deltas"] == expected["deltas"]
    assert all(torch.equal(got["weights"][n], w) for n, w in expected["weights"].items())


def _disk_full(what: str) -> BaseException:
    """The error each writer raises on a full disk (the Rust ones carry the errno in their text)."""
    import errno

    from polars.exceptions import ComputeError
    from safetensors import SafetensorError

    text = "No space left on device (os error 28)"
    return {
        "os": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        "polars": ComputeError(f"parquet: File out of specification: underlying IO error: {text}"),
        "safetensors": SafetensorError(f"Error while serializing: I/O error: {text}"),
    }[what]


def _resolve(owner: str):
    """A module or a class, by its dotted name."""
    import importlib

    try:
        return importlib.import_module(owner)
    except ModuleNotFoundError:
        module, _, name = owner.rpartition(".")
        return getattr(importlib.import_module(module), name)


def _fd_name(fd) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


# (what, where the writer is, its attribute, which call fails: a name its arguments hold and the
# how-many-th such call, the error, the file the message must name)
_FULL_DISK = [
    ("delta", "lifelong.core.delta", "save_file", "step_000002", 1, "safetensors", "deltas/step_000002.safetensors"),
    ("result part", "polars.DataFrame", "write_parquet", "step_000002", 1, "polars", "results/step_000002.parquet"),
    ("progress", "pathlib.Path", "write_text", "progress.json", 2, "os", "progress.json"),
    ("consolidated table", "polars.LazyFrame", "sink_parquet", "results.parquet", 1, "polars", "results.parquet"),
    ("step log (its flush)", "os", "fsync", "steps.jsonl", 2, "os", "steps.jsonl"),
    ("manifest (its rename)", "os", "replace", "manifest.json", 2, "os", "manifest.json"),
]


@pytest.mark.parametrize("what,owner,attr,name,nth,kind,named", _FULL_DISK, ids=[c[0] for c in _FULL_DISK])
def test_a_full_disk_at_a_write_is_one_line_naming_the_file_and_the_run_resumes(
    tmp_path, capsys, monkeypatch, uninterrupted, what, owner, attr, name, nth, kind, named
):
    """#37: a write that fails for want of space (any OSError, or a writer library's error carrying
    one) ends the command in one line naming the file and the system's reason, exit status 2, with no
    temporary file left; the same command then resumes to the uninterrupted run's results, bitwise."""
    from lifelong.cli import main
    from lifelong.run import is_temporary

    stream, expected = uninterrupted
    target = _resolve(owner)
    real = getattr(target, attr)
    seen = [0]

    def failing(*args, **kwargs):
        names = [_fd_name(a) if attr == "fsync" else str(a) for a in args if isinstance(a, (str, os.PathLike, int))]
        if any(name in n for n in names):
            seen[0] += 1
            if seen[0] == nth:
                raise _disk_full(kind)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, failing)
    out = tmp_path / "run"
    code = main(_replay_argv(stream, out))
    _, err = capsys.readouterr()
    monkeypatch.undo()
    assert seen[0] == nth, f"the {what} write was never reached"
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("lifelong: error: cannot write "), err
    assert f"{out / named}: No space left on device (ENOSPC)" in err, err
    assert not [p for p in out.rglob("*") if is_temporary(p.name)], "a half-written temporary file was left"
    _assert_resumes_bitwise(capsys, stream, out, expected)


def test_a_full_disk_during_a_checkout_names_its_directory_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    from lifelong.cli import main

    stream = _good_stream(tmp_path, edits=1)
    argv = _replay_argv(stream, tmp_path / "run")
    assert main([a if a != "2" else "1" for a in argv]) == 0  # one step

    def full(*args, **kwargs):
        raise _disk_full("safetensors")

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    capsys.readouterr()
    code = main(["checkout", str(tmp_path / "run"), "--step", "1", "--out", str(tmp_path / "model")])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot write {tmp_path / 'model'}: No space left on device" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl", "run"]


INTERRUPTED_LINE = (
    "interrupted: completed steps (and key-statistics text sampled so far) are saved; re-run the same command to resume"
)


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


# Where the end of a run can be interrupted: its last step's probes, the consolidation of its results,
# the plots and the summary printed after it.
_AT_THE_END = [
    ("last probes", "probes.base.ProbeSuite", "run"),
    ("consolidation", "lifelong.run.RunDir", "consolidate"),
    ("plots", "lifelong.plots", "plot_run"),
    ("summary", "lifelong.summary", "format_summary"),
]


@pytest.mark.parametrize("what,owner,attr", _AT_THE_END, ids=[c[0] for c in _AT_THE_END])
def test_an_interrupt_at_the_end_of_a_run_says_so_and_the_run_resumes(
    tmp_path, capsys, monkeypatch, uninterrupted, what, owner, attr
):
    """#37: Ctrl-C at any of the last stages prints the 'interrupted: ... saved' line (no traceback),
    exits 130, and the same command then completes the run bitwise."""
    from lifelong.cli import main

    stream, expected = uninterrupted
    target = _resolve(owner)
    if what == "last probes":
        real = target.run

        def interrupt_last(self, ctx, references):
            if ctx.is_last:
                raise KeyboardInterrupt
            return real(self, ctx, references)

        monkeypatch.setattr(target, attr, interrupt_last)
    else:
        monkeypatch.setattr(target, attr, _interrupt)
    out = tmp_path / "run"
    code = main(_replay_argv(stream, out))
    _, err = capsys.readouterr()
    monkeypatch.undo()
    assert code == 130, err
    assert err.strip() == INTERRUPTED_LINE, err
    _assert_resumes_bitwise(capsys, stream, out, expected)


def test_an_interrupt_while_the_program_ends_says_so(tmp_path):
    """#37: the program ends itself once its command is done (before: the interpreter's seconds-long
    teardown, where no Python handler runs, so a Ctrl-C there ended it bare, exit -2); a Ctrl-C while
    it ends (here: while it waits for a thread) prints the 'interrupted' line and exits 130."""
    import subprocess
    import sys

    script = tmp_path / "end.py"
    script.write_text(
        "import os, signal, sys, threading, time\nfrom lifelong import cli\n"
        "def late():\n    time.sleep(1)\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(1)\n"
        "threading.Thread(target=late).start()\nsys.argv = ['lifelong', 'streams']\ncli.main()\n"
        "print('main returned', file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stdout.strip() and done.stderr.strip() == INTERRUPTED_LINE, done.stderr


# -- a step's memory, estimated before it starts (#37) ---------------------------------------------


def test_a_step_estimated_beyond_the_available_memory_is_refused_before_it_starts(
    tmp_path, capsys, monkeypatch, uninterrupted
):
    """Too little memory for the largest step: refused in one line naming the step, the estimate, the
    memory available and the remedy, before the run directory exists. Memory taken away during a
    run: the step is refused before anything of it is written, and the run then resumes bitwise."""
    import lifelong.replay
    from lifelong.cli import main
    from lifelong.run import RunDir

    stream, expected = uninterrupted
    out = tmp_path / "run"
    monkeypatch.setattr(lifelong.replay, "available_memory", lambda device: 2**20)
    code = main(_replay_argv(stream, out))
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "step 1 (1 edits): its memory is estimated at " in err and "more than the 1 MiB available on cpu" in err
    assert "--batch-size" in err and not out.exists(), err

    calls = [0]

    def taken_away(device):  # plenty for the check before the run and step 1's, then 1 MiB
        calls[0] += 1
        return 2**40 if calls[0] <= 2 else 2**20

    monkeypatch.setattr(lifelong.replay, "available_memory", taken_away)
    code = main(_replay_argv(stream, out))
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("lifelong: error: step 2 (1 edits): its memory is estimated"), err
    run = RunDir(out)
    assert run.completed_step() == 1
    assert not (run.deltas_dir / "step_000002.safetensors").exists() and not run.part_path(2).exists()
    monkeypatch.undo()
    _assert_resumes_bitwise(capsys, stream, out, expected)


def test_the_step_memory_estimate_grows_with_the_edits_and_their_texts():
    """The estimate counts each edit (at least its fixed share, so a 300,000-edit step, which grew past
    20 GB, is estimated beyond 18 GiB) and its texts' length; a one-edit step is estimated small."""
    import dataclasses

    from lifelong.core.memory import PER_EDIT_BYTES, step_estimate
    from lifelong.core.models import load_model
    from lifelong.editors import make_editor
    from tests.conftest import make_edits

    lm = load_model("tiny-llama")
    editor = make_editor("ft", dict(_QUICK_FT))
    scope = editor.scope(lm)
    one, many = step_estimate(lm.model, scope, make_edits(1)), step_estimate(lm.model, scope, make_edits(101))
    per_edit = (many - one) / 100
    assert PER_EDIT_BYTES < per_edit < 4 * PER_EDIT_BYTES
    assert one + 300_000 * per_edit > 18 * 2**30
    assert one < 64 * 2**20
    long = [dataclasses.replace(e, paraphrases=("x " * 500 + "{}",)) for e in make_edits(1)]
    assert step_estimate(lm.model, scope, long) > one + 900 * 8  # 8 bytes a byte of text (as token ids)
    assert editor.memory_estimate(lm, make_edits(1)) == one  # an editor's default is the generic estimate
