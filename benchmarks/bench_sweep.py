"""A sweep's wall time against the same cells replayed one after another, measured in one run.

The cells: one editor (FT by default) on the built-in stream, ``--steps`` steps each, seeds
0..N-1 (N = ``--cells`` ≥ 4), on ``--model`` (default: the default model). They are run

1. one after another in this process, each a fresh ``replay`` (model loaded, all usable cores),
   timed: the serial sum;
2. as a sweep with 1 worker (each cell gets every core), into a fresh directory;
3. as a sweep with 2 workers (each cell half the cores), into another.

Both sweeps run on one local Ray instance started once beforehand, sized to the machine; its
start, and the start of its worker processes (importing torch and this package, loading the model
a first time), are timed and printed apart (a `lifelong sweep` command pays both once per call).
Each sweep's wall time includes every cell's model load, as each serial replay does. Printed:
each wall time as a ratio to the serial sum.

    python benchmarks/bench_sweep.py [--model smollm2-135m] [--cells 4] [--steps 3] [--editor ft]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from lifelong.core.machine import available_cores, runtime_header
from lifelong.replay import replay
from lifelong.sweep import load_spec, run_sweep


def _warm(model: str) -> int:
    """What a worker process does once: import torch and this package, load the model a first time."""
    import lifelong.replay  # noqa: F401
    from lifelong.core.models import load_model

    load_model(model)
    return os.getpid()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editor", default="ft")
    ap.add_argument("--cells", type=int, default=4, help="cells (seeds 0..N-1), at least 4")
    ap.add_argument("--steps", type=int, default=3, help="steps per cell")
    args = ap.parse_args()
    if args.cells < 4:
        ap.error("--cells must be at least 4")
    cores = available_cores()
    print(runtime_header())
    print(
        f"{args.editor} on {args.model}, built-in stream, {args.cells} cells x {args.steps} steps "
        f"(seeds 0..{args.cells - 1}); {cores} usable cores\n"
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec_path = root / "spec.toml"
        spec_path.write_text(
            f'model = "{args.model}"\nstream = "builtin"\nsteps = {args.steps}\n'
            f'probe_every = {args.steps}\neditors = ["{args.editor}"]\n'
            f"seeds = {list(range(args.cells))}\n"
        )
        spec = load_spec(spec_path)

        from lifelong.core.models import load_model

        load_model(args.model)  # the model's one-time conversion is cached before anything is timed

        serial = []
        for cell in spec.cells:
            t0 = time.perf_counter()
            replay(cell.config, root / "serial" / cell.id, progress=False, threads=cores)
            serial.append(time.perf_counter() - t0)
        total = sum(serial)
        print(
            f"{'serial, one after another':<36}{cores} threads/cell  sum {total:8.1f} s   "
            f"[{', '.join(f'{s:.1f}' for s in serial)}]"
        )

        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        print(f"{'ray start (local, not in the sweeps)':<36}{time.perf_counter() - t0:27.1f} s")
        try:
            # Worker processes import torch and this package, and load a model a first time, once; a sweep
            # command pays that once per worker.
            t0 = time.perf_counter()
            ray.get([ray.remote(_warm).options(num_cpus=1).remote(args.model) for _ in range(max(2, cores))])
            print(f"{'worker start (not in the sweeps)':<36}{time.perf_counter() - t0:27.1f} s")
            for workers in (1, 2):
                t0 = time.perf_counter()
                result = run_sweep(spec, root / f"sweep-{workers}", workers=workers, progress=False)
                wall = time.perf_counter() - t0
                counts = result.counts()
                if counts["done"] != len(spec.cells):
                    raise SystemExit(f"sweep with {workers} worker(s) did not finish: {counts}")
                label = f"sweep, {workers} worker{'s' if workers > 1 else ''}"
                if workers > cores:
                    label += f" ({cores} CPU: 1 at once)" if cores == 1 else f" ({cores} CPUs)"
                print(
                    f"{label:<36}{result.cores_per_worker} threads/cell  wall {wall:7.1f} s = "
                    f"{wall / total:.2f} x serial sum"
                )
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
