"""Long streams: what one run's time, memory and disk do as it grows (issue #19).

Replays one editor over a long stream in a single process, stopping at 25%, 50% and 100% of its
steps, and prints at each: seconds per step over the last stretch (edit and probe apart), the
items the probes scored per step and the probe milliseconds per item, the resident memory now, and
the bytes the run directory holds; then the growth ratios between the stretches. Linear growth in
steps shows as a time-per-step ratio near 1 and disk/memory ratios near the steps' ratio (2 from
25% to 50%, 2 from 50% to 100%) or below. Items per step can grow on their own (the retention probe
also scores the superseded edits it holds, more as a stream re-edits facts); probe ms per item is
the cost of scoring one. ``--report RUN`` reprints a finished run's stretches from its records.

    python benchmarks/bench_long.py --editor memory --model tiny-llama --steps 10000
    python benchmarks/bench_long.py --editor ft --steps 400 --keep-deltas every:100
    python benchmarks/bench_long.py --editor alphaedit --steps 3 --batch-size 100
    python benchmarks/bench_long.py --editor ultraedit --steps 100 --batch-size 100 --probe retention:sample=200
    python benchmarks/bench_long.py --report runs/long-grace

The stream is CounterFact's 10,000 EasyEdit records from ../shared/data (its load time and skipped
records are printed), or with ``--stream builtin-cycle`` the built-in facts repeated (ids made
unique), which needs no data.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    """Resident memory of this process now (not the peak), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak: only where /proc is missing


def scored_items(run_dir: Path, first: int, last: int) -> int:
    """Per-item rows the probes wrote for steps first..last (protocol ``exact``: one per edit scored).
    The retention probe scores its sample of live edits and, apart, the superseded ones it holds, so its
    work per probe grows as the stream re-edits facts (up to twice its cap)."""
    import polars as pl

    from lifelong.run import RunDir

    rows = (
        RunDir(run_dir)
        .results()
        .filter(
            pl.col("step").is_between(first, last) & (pl.col("protocol") == "exact") & pl.col("edit_id").is_not_null()
        )
    )
    return rows.height


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cycled_builtin(steps: int, path: Path) -> str:
    """A stream file of ``steps`` edits: the built-in edits over and over, each copy's ids unique."""
    import dataclasses
    from datetime import timedelta

    from streams import EditStream, load_stream

    base = list(load_stream("builtin"))
    edits = []
    for i in range(steps):
        e = base[i % len(base)]
        edits.append(
            dataclasses.replace(e, id=f"{e.id}-c{i // len(base)}", timestamp=base[0].timestamp + timedelta(days=i))
        )
    EditStream(edits).to_jsonl(path)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--editor", default="memory")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=1, help="edits per step (AlphaEdit's paper: 100)")
    ap.add_argument("--stream", default="dataset:counterfact_easyedit", help="a stream, or builtin-cycle")
    ap.add_argument("--probe-every", type=int, default=10, help="retention schedule (every K steps)")
    ap.add_argument("--keep-deltas", default="all")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--probe",
        action="append",
        default=[],
        metavar="NAME[:KEY=VALUE,...]",
        help="a probe as replay takes it, e.g. retention:sample=200 (a smaller sample of past edits per probed step)",
    )
    ap.add_argument("--threads", default="1")
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    ap.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="RUN",
        help="print the stretches of a finished run from its records (no replay; no wall time or memory)",
    )
    args = ap.parse_args()
    if args.report is not None:
        report(args.report)
        return

    from lifelong.cli import _parse_set as parse_set_items
    from lifelong.core.machine import ComputeThreads, runtime_header, thread_policy
    from lifelong.replay import prepare_stream_and_facts, replay
    from lifelong.run import RunConfig

    with ComputeThreads(thread_policy(args.threads)):
        print(runtime_header())
    work = Path(tempfile.mkdtemp(prefix="bench_long-"))
    stream = (
        cycled_builtin(args.steps * args.batch_size, work / "cycle.jsonl")
        if args.stream == "builtin-cycle"
        else args.stream
    )
    config = RunConfig(
        model=args.model,
        editor=args.editor,
        editor_overrides=parse_set_items(args.set),
        stream=stream,
        steps=args.steps,
        batch_size=args.batch_size,
        probe_every=args.probe_every,
        keep_deltas=args.keep_deltas,
        probes=list(args.probe),
    )
    t0 = time.perf_counter()
    _, steps, _, _ = prepare_stream_and_facts(config)
    print(
        f"stream {args.stream}: {len(steps)} steps of {args.batch_size} edit(s) loaded in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    if len(steps) < args.steps:
        print(f"note: the stream has only {len(steps)} steps", file=sys.stderr)
    out = args.out or work / "run"
    marks = sorted({max(1, round(len(steps) * f)) for f in (0.25, 0.5, 1.0)})
    print(
        f"{args.editor} on {args.model}, {len(steps)} steps, retention every {args.probe_every}, "
        f"--keep-deltas {args.keep_deltas}\n"
    )
    print(
        f"{'to step':>8} {'s/step':>8} {'edit s':>8} {'probe s':>8} {'items':>7} {'probe ms/item':>14} "
        f"{'RSS MiB':>8} {'disk MiB':>9}"
    )
    done, rows = 0, []
    for mark in marks:
        t0 = time.perf_counter()
        replay(config, out, progress=False, stop_after=mark - done, threads=args.threads)
        wall = time.perf_counter() - t0
        # resident memory first: reading the results (in stretch_row) is the benchmark's memory, not the run's
        rss, disk = rss_mib(), dir_bytes(out) / 2**20
        row = {**stretch_row(out, done, mark), "per_step": wall / (mark - done), "rss": rss, "disk": disk}
        rows.append(row)
        print(
            f"{mark:>8} {row['per_step']:>8.3f} {row['edit']:>8.3f} {row['probe']:>8.3f} {row['items']:>7.1f} "
            f"{per_item_ms(row):>14.3f} {row['rss']:>8.0f} {row['disk']:>9.1f}"
        )
        done = mark
    print("\ngrowth between stretches (steps ratio in brackets):")
    for a, b in zip(rows, rows[1:]):
        ratio = b["step"] / a["step"]
        print(
            f"  {a['step']} -> {b['step']} (×{ratio:.1f}): s/step ×{b['per_step'] / a['per_step']:.2f}, "
            f"{probe_growth(a, b)}, RSS ×{b['rss'] / a['rss']:.2f}, "
            f"disk ×{b['disk'] / max(a['disk'], 1e-9):.2f}"
        )
    print(f"\nrun directory: {out}")


def stretch_row(run_dir: Path, done: int, mark: int) -> dict:
    """Steps done+1..mark of a run, from its records: mean edit and probe seconds per step, and the
    items its probes scored per step."""
    from lifelong.run import RunDir

    seconds = RunDir(run_dir).progress()["seconds"]
    stretch = [seconds[str(k)] for k in range(done + 1, mark + 1)]
    return {
        "step": mark,
        "edit": sum(s.get("edit", 0.0) for s in stretch) / len(stretch),
        "probe": sum(s.get("probe", 0.0) for s in stretch) / len(stretch),
        "items": scored_items(run_dir, done + 1, mark) / len(stretch),
    }


def per_item_ms(row: dict) -> float:
    return 1e3 * row["probe"] / max(row["items"], 1e-9)


def probe_growth(a: dict, b: dict) -> str:
    return (
        f"probe s/step ×{b['probe'] / max(a['probe'], 1e-9):.2f}, items/step ×{b['items'] / a['items']:.2f}, "
        f"probe ms/item ×{per_item_ms(b) / per_item_ms(a):.2f}"
    )


def report(run_dir: Path) -> None:
    """The stretches (25%, 50%, 100% of the steps done) of a finished run, from its records."""
    from lifelong.run import RunDir

    run = RunDir(run_dir)
    last, identity = run.completed_step(), run.manifest()["identity"]
    print(f"{identity['editor']} on {identity['model']}, {last} steps done ({run_dir}); from its records\n")
    print(f"{'to step':>8} {'edit s':>8} {'probe s':>8} {'items':>7} {'probe ms/item':>14}")
    done, rows = 0, []
    for mark in sorted({max(1, round(last * f)) for f in (0.25, 0.5, 1.0)}):
        row = stretch_row(run_dir, done, mark)
        rows.append(row)
        print(f"{mark:>8} {row['edit']:>8.3f} {row['probe']:>8.3f} {row['items']:>7.1f} {per_item_ms(row):>14.3f}")
        done = mark
    print("\ngrowth between stretches:")
    for a, b in zip(rows, rows[1:]):
        edit = b["edit"] / max(a["edit"], 1e-9)
        print(f"  {a['step']} -> {b['step']}: edit s/step ×{edit:.2f}, {probe_growth(a, b)}")


if __name__ == "__main__":
    main()
