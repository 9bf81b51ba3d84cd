"""Replays side by side: two replays started at once against one alone, measured in one run.

Each replay is a separate ``lifelong replay`` process on the default model (FT-L on the
built-in stream). With the default thread policy, the two divide the machine's cores
between them (each registers itself and takes its share); ``--naive`` adds the case that
policy replaces, each process taking every core, as torch does on its own.

Prints, per case, each process's wall time and its steps' time (edit + probes, from the
run's progress.json) as ratios to the replay alone. Two processes on the cores one had
can at best take 2× as long each (1× where one alone cannot use all cores).

    python benchmarks/bench_threads.py [--steps 6] [--editor ft] [--naive]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lifelong.core.machine import THREADS_ENV, available_cores, runtime_header
from lifelong.run import RunDir


def start(out: Path, args, threads: int | None) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "lifelong.cli",
        "replay",
        "--model",
        "smollm2-135m",
        "--editor",
        args.editor,
        "--stream",
        "builtin",
        "--steps",
        str(args.steps),
        "--probe-every",
        str(args.steps),
        "--out",
        str(out),
        "--quiet",
    ]
    if threads is not None:
        command += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in (THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_together(root: Path, name: str, count: int, args, threads: int | None) -> list[tuple[float, float]]:
    """(wall seconds, seconds of the steps) for ``count`` replays started at the same moment."""
    t0 = time.perf_counter()
    procs = [(start(root / f"{name}-{i}", args, threads), root / f"{name}-{i}") for i in range(count)]
    out = []
    for proc, directory in procs:
        _, err = proc.communicate()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(
                f"replay in {directory} failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}"
            )
        seconds = RunDir(directory).progress()["seconds"]
        steps = sum(sum(v.values()) for k, v in seconds.items() if int(k) > 0)
        threads_used = json.loads((directory / "manifest.json").read_text())["sessions"][-1]["threads"]["threads"]
        out.append((wall, steps, threads_used))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="replay steps per process")
    ap.add_argument("--editor", default="ft")
    ap.add_argument("--naive", action="store_true", help="also run two processes that each take every core")
    args = ap.parse_args()
    print(runtime_header())
    print(
        f"{args.editor} on smollm2-135m, built-in stream, {args.steps} steps per replay; "
        f"{available_cores()} usable cores\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        [(wall1, steps1, threads1)] = run_together(root, "alone", 1, args, None)
        print(f"{'case':<34}{'threads':>8}{'wall s':>9}{'x alone':>9}{'steps s':>9}{'x alone':>9}")
        print(f"{'alone':<34}{threads1:>8}{wall1:9.1f}{1:9.2f}{steps1:9.1f}{1:9.2f}")
        cases = [("two at once (default policy)", None)]
        if args.naive:
            cases.append((f"two at once, each --threads {available_cores()}", available_cores()))
        for label, threads in cases:
            for i, (wall, steps, used) in enumerate(
                run_together(root, label.split()[0] + str(threads), 2, args, threads)
            ):
                print(
                    f"{label + f' #{i + 1}':<34}{used:>8}{wall:9.1f}{wall / wall1:9.2f}"
                    f"{steps:9.1f}{steps / steps1:9.2f}"
                )


if __name__ == "__main__":
    main()
