"""The device script's CPU dry run (issue #36): ``benchmarks/device_check.sh --dry-run`` runs every step
of the GPU check on the tiny model, prints one table with a row for every step and every editor, and
writes it to the file given."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["step", "item", "dtype", "status", "seconds", "× fwd", "peak memory", "note"]


def parse(table: str) -> list[dict[str, str]]:
    """The table's rows as {column: text}, cut where the header's columns start."""
    lines = table.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("step  "))
    starts = [lines[at].index(c) for c in COLUMNS] + [None]
    rows = []
    for line in lines[at + 2 :]:
        if not line.strip():
            break
        rows.append({c: line[starts[i] : starts[i + 1]].strip() for i, c in enumerate(COLUMNS)})
    return rows


@pytest.mark.slow  # about a minute on a busy 2-core machine: a pytest run, 12 tiny replays, a kill and resume
def test_the_dry_run_executes_every_step_and_prints_the_table(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from device_check import DTYPES, EDITORS, STEPS

    out = tmp_path / "table.txt"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "LIFELONG_THREADS": "1"}
    env.pop("OUT", None)
    done = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "device_check.sh"),
            "--dry-run",
            "--out",
            str(out),
            "--keep",
            str(tmp_path / "w"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    table = out.read_text()
    assert table.strip() in done.stdout  # the same table printed and written
    assert "device check (DRY RUN): device cpu" in table and "model: tiny-llama" in table
    assert f"steps run: {', '.join(STEPS)}\n" in table and "NOT RUN" not in table
    rows = parse(table)
    by_step = {s: [r for r in rows if r["step"] == s] for s in STEPS}
    assert {r["step"] for r in rows} == set(STEPS), table
    # tests: pytest ran the cuda-marked tests on the CPU and they passed (not skipped)
    [tests] = by_step["tests"]
    assert tests["status"] == "ok" and " passed" in tests["note"] and "failed" not in tests["note"], table
    # replay: every editor in every dtype, with a time per step and a peak
    replays = {(r["item"], r["dtype"]): r for r in by_step["replay"]}
    assert set(replays) == {(e, d) for e in EDITORS for d in DTYPES}, table
    for r in replays.values():
        assert r["status"] == "ok" and r["seconds"].endswith("s/step") and r["peak memory"].endswith("(process peak)")
    # resume: killed inside the run and bitwise equal after resuming
    [resume] = by_step["resume"]
    assert resume["status"] == "ok: bitwise equal" and resume["note"].startswith("killed at write"), table
    # cost: a forward per dtype, and one edit per editor and dtype as a ratio to it
    forwards = [r for r in by_step["cost"] if r["item"].startswith("forward")]
    assert [r["dtype"] for r in forwards] == list(DTYPES) and all(r["× fwd"] == "1.00" for r in forwards)
    edits = {(r["item"], r["dtype"]): r for r in by_step["cost"] if r["item"].endswith("one edit")}
    assert set(edits) == {(f"{e}: one edit", d) for e in EDITORS for d in DTYPES}, table
    assert all(float(r["× fwd"]) > 0 for r in edits.values())
    # the run directories are there: the replays and the resume's two runs really ran
    work = tmp_path / "w"
    assert all((work / f"replay-{e}-{d}" / "results.parquet").is_file() for e in EDITORS for d in DTYPES)
    assert (work / "resume" / "whole" / "results.parquet").is_file()
    assert (work / "resume" / "killed" / "results.parquet").is_file()


def test_a_step_left_out_shows_in_the_table(tmp_path, capsys):
    """The table names every step that did not run (what the dry-run test above relies on), and an
    editor without a replay has no cost figure rather than a made-up one."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from device_check import main

    out = tmp_path / "table.txt"
    code = main(["--dry-run", "--only", "cost", "--editors", "rome", "--out", str(out), "--keep", str(tmp_path / "w")])
    table = out.read_text()
    assert code == 0 and "steps run: cost; NOT RUN: tests, replay, resume" in table
    rows = [r for r in parse(table) if r["item"] == "rome: one edit"]
    assert [r["status"] for r in rows] == ["no figure: no replay of it completed"] * 2
