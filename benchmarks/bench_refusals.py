"""How long the user waits without a word (#37): the time to refuse each kind of bad argument, and
the time to the first update of each progress bar of a first ROME run on the default model.

1. Refusals: each bad command is run as a separate ``python -m lifelong.cli`` process (what a user
   waits for, the interpreter's start included), three times; the median wall time is printed
   with whether it is within 2 s, the exit status and the line it printed.
2. Bars: one ROME replay of a 2-edit stream (the first two edits of the built-in stream) on the
   default model; its stderr (a pseudo-terminal, as a user's: status lines show only on a terminal)
   is read as it comes and every bar and status line timestamped, so each one's first appearance
   and first advance (its count, or a status's elapsed time, above where it started) are printed,
   then the last line's time and the exit's. Key statistics are read from the cache when it holds
   them (say so below).

    nice -n 5 env OMP_NUM_THREADS=1 python benchmarks/bench_refusals.py [--skip-bars] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
LIMIT_S = 2.0


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "lifelong.cli", *argv]


def refusal_cases(scratch: Path, run_dir: Path) -> list[tuple[str, list[str]]]:
    missing = scratch / "missing-corpus.txt"
    out = ["--out", str(scratch / "never")]
    return [
        ("unknown editor", cli("replay", "--editor", "alphedit", *out)),
        ("unknown probe", cli("replay", "--probe", "perplexty", *out)),
        ("unknown dataset", cli("replay", "--stream", "dataset:counterfakt", *out)),
        ("unknown stream", cli("replay", "--stream", "bultin", *out)),
        ("missing stream file", cli("replay", "--stream", str(scratch / "nope.jsonl"), *out)),
        ("--set nonsense=1", cli("replay", "--set", "nonsense=1", *out)),
        ("--model smollm2", cli("replay", "--model", "smollm2", *out)),
        ("--device cuda (no GPU)", cli("replay", "--device", "cuda", *out)),
        (
            "--set nullspace_threshold=-1",
            cli("replay", "--editor", "alphaedit", "--set", "nullspace_threshold=-1", *out),
        ),
        ("missing cov_corpus file", cli("replay", "--editor", "rome", "--set", f"cov_corpus={missing}", *out)),
        ("inspect RUN --tokens -1", cli("inspect", str(run_dir), "--tokens", "-1")),
    ]


def time_refusal(argv: list[str], repeats: int) -> tuple[float, int, str]:
    times, code, line = [], 0, ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=ROOT)
        times.append(time.perf_counter() - t0)
        code, line = done.returncode, (done.stderr.strip().splitlines() or [""])[-1]
    return statistics.median(times), code, line


def make_tiny_run(scratch: Path) -> Path:
    """A finished one-step run of the tiny model, for ``inspect``."""
    sys.path.insert(0, str(ROOT))
    from streams import EditStream, load_stream

    stream = scratch / "tiny.jsonl"
    EditStream(list(load_stream("builtin"))[:1]).to_jsonl(stream)
    run = scratch / "tiny-run"
    argv = cli("replay", "--model", "tiny-llama", "--stream", str(stream), "--quiet", "--threads", "1")
    subprocess.run([*argv, "--set", "max_steps=2", "--out", str(run)], check=True, capture_output=True, env=ENV)
    return run


# A tqdm line: "DESC: 12%|###  | 3/25 [...]" or, without a total, "DESC: 3it [...]".
BAR = re.compile(r"^\s*(?P<desc>[^\r\n|]*?):\s+(?:\d+%\|[^|]*\|\s*)?(?P<n>[\d.]+[kMG]?)(?:/[\d.]+[kMG]?)?(?:it|\s|\[)")


# A status line (lifelong.core.bars.phase): "DESC: 00:03 elapsed".
STATUS = re.compile(r"^\s*(?P<desc>[^\r\n|]*?):\s+(?P<t>\d+:\d\d(?::\d\d)?) elapsed")


def seconds(clock: str) -> float:
    total = 0.0
    for part in clock.split(":"):
        total = total * 60 + float(part)
    return total


def count(text: str) -> float:
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(text[-1], 1)
    return float(text.rstrip("kMG")) * scale


def bar_phases(scratch: Path) -> tuple[list[tuple[str, float, float | None]], float, float, float, int]:
    """(per bar or status description: seconds to its first appearance and to its first advance), the
    seconds to the last line, the longest wait without a new line (from the start, between lines, from
    the last line to the exit), the total seconds and the exit status of a ROME replay of two edits on
    the default model, its stderr a pseudo-terminal."""
    import fcntl
    import pty
    import struct
    import termios

    from streams import EditStream, load_stream

    stream = scratch / "two.jsonl"
    EditStream(list(load_stream("builtin"))[:2]).to_jsonl(stream)
    argv = cli("replay", "--editor", "rome", "--stream", str(stream), "--threads", "1", "--out", str(scratch / "rome"))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))  # a terminal 160 columns wide
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stderr=slave, stdout=subprocess.DEVNULL, env=ENV, cwd=ROOT)
    os.close(slave)
    seen: dict[str, list] = {}  # desc -> [first seen, first count, first advance]
    pending, last, silence = b"", 0.0, 0.0
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        now = time.perf_counter() - t0
        pending += chunk
        *pieces, pending = re.split(rb"[\r\n]", pending)
        for piece in pieces:
            text = piece.decode(errors="replace")
            status = STATUS.match(text)
            match = status or BAR.match(text)
            if not match:
                continue
            silence, last = max(silence, now - last), now
            desc = match.group("desc").strip()
            n = seconds(match.group("t")) if status else count(match.group("n"))
            entry = seen.setdefault(desc, [now, n, None])
            if entry[2] is None and n > entry[1]:
                entry[2] = now
    os.close(master)
    code = proc.wait()
    total = time.perf_counter() - t0
    return [(d, e[0], e[2]) for d, e in seen.items()], last, max(silence, total - last), total, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-bars", action="store_true", help="only the refusals")
    parser.add_argument("--skip-refusals", action="store_true", help="only the bars")
    args = parser.parse_args()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if not args.skip_refusals:
            run_dir = make_tiny_run(scratch)
            print(f"\n| bad argument | median of {args.repeats} (s) | ≤ {LIMIT_S:g} s | exit | the line printed |")
            print("|---|---|---|---|---|")
            for label, argv in refusal_cases(scratch, run_dir):
                seconds, code, line = time_refusal(argv, args.repeats)
                shown = line.replace("|", "\\|").replace(str(scratch), "TMP")
                ok = "yes" if seconds <= LIMIT_S else "**no**"
                print(f"| {label} | {seconds:.2f} | {ok} | {code} | `{shown}` |", flush=True)
        if not args.skip_bars:
            phases, last, silence, total, code = bar_phases(scratch)
            print(
                f"\nROME, 2 edits, default model: exit {code}, {total:.1f} s in all, last line at {last:.1f} s, "
                f"longest wait without a new line {silence:.1f} s"
            )
            print("\n| bar | first shown (s) | first advance (s) |\n|---|---|---|")
            for desc, shown, advanced in phases:
                print(
                    f"| {desc or '(no description)'} | {shown:.1f} | {'—' if advanced is None else f'{advanced:.1f}'} |"
                )


if __name__ == "__main__":
    main()
