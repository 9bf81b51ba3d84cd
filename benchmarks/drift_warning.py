"""The collapse warning's threshold, measured: weight drift against perplexity step by step.

Replays each editor on a model with the weight-drift and perplexity probes every step and prints,
per step, the relative updates ‖W_t − W_0‖_F/‖W_0‖_F summed over the edited matrices (the collapse
warning's measure) and their largest, the largest norm ratio ‖W_t‖_F/‖W_0‖_F and the corpus
perplexity ratio to θ0; then, per editor, the warning's step and the first step where the perplexity
ratio passes 2 (docs/PROBES.md, "Collapse warning", reports runs of this).

    python benchmarks/drift_warning.py --editors kn,mend,rome,memit --steps 20
    python benchmarks/drift_warning.py --editors mend --set mend:hypernet=FILE --steps 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lifelong.core.machine import ComputeThreads, runtime_header, thread_policy  # noqa: E402
from lifelong.replay import replay  # noqa: E402
from lifelong.run import RunConfig  # noqa: E402
from probes.weight_drift import warning_step  # noqa: E402


def series(results: pl.DataFrame, probe: str, metric: str, protocol: str) -> dict[int, float]:
    rows = results.filter((pl.col("probe") == probe) & (pl.col("metric") == metric) & (pl.col("protocol") == protocol))
    return dict(zip(rows["step"].to_list(), rows["value"].to_list()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editors", default="kn,mend,rome,memit,grace")
    ap.add_argument("--stream", default="builtin")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=1024, help="corpus tokens the perplexity probe reads")
    ap.add_argument("--set", action="append", default=[], help="EDITOR:KEY=VALUE, an editor setting")
    ap.add_argument("--threads", default=None)
    args = ap.parse_args(argv)
    overrides: dict[str, dict[str, str]] = {}
    for spec in args.set:
        editor, _, kv = spec.partition(":")
        key, _, value = kv.partition("=")
        overrides.setdefault(editor, {})[key] = value
    table = [
        "| editor | steps | Σ at step 1 (largest matrix) | warning step: Σ, largest, norm ratio, ppl ratio "
        "| first step with ppl ratio > 2: Σ, ppl ratio | ppl ratio at the last step |",
        "|---|---|---|---|---|---|",
    ]
    with ComputeThreads(thread_policy(args.threads)), tempfile.TemporaryDirectory() as tmp:
        print(runtime_header())
        for name in args.editors.split(","):
            config = RunConfig(
                model=args.model,
                editor=name,
                editor_overrides=overrides.get(name, {}),
                stream=args.stream,
                steps=args.steps,
                probe_every=args.steps,
                probes=[
                    f"perplexity:schedule=every:1,max_tokens={args.max_tokens},max_sentences=1",
                    "weight_drift",
                ],
            )
            results = replay(config, Path(tmp) / name, progress=False).run.results()
            summed = series(results, "weight_drift", "relative", "sum")
            largest = series(results, "weight_drift", "relative", "max")
            norm = series(results, "weight_drift", "norm_ratio", "max")
            ppl = series(results, "perplexity", "ratio", "corpus")
            print(f"\n{name} on {args.model}, {args.stream}, {args.steps} steps")
            print(f"{'step':>5}{'sum rel. update':>17}{'largest':>10}{'max norm ratio':>16}{'ppl ratio':>12}")
            for step in sorted(s for s in ppl if s > 0):
                print(f"{step:>5}{summed[step]:>17.4g}{largest[step]:>10.4g}{norm[step]:>16.6g}{ppl[step]:>12.4g}")
            burst = next((s for s in sorted(ppl) if ppl[s] > 2), None)
            warned = warning_step(results)
            print(f"{name}: collapse warning at step {warned}; first step with perplexity ratio > 2: {burst}")
            table.append(table_row(name, args.steps, warned, burst, summed, largest, norm, ppl))
    print("\n" + "\n".join(table))


def table_row(name, steps, warned, burst, summed, largest, norm, ppl) -> str:
    """One editor's line of the docs' table (docs/PROBES.md, "Collapse warning")."""

    def g(x: float) -> str:
        return f"{x:.3g}"

    at_warning = "none"
    if warned is not None:
        at_warning = f"{warned}: {g(summed[warned])}, {g(largest[warned])}, {norm[warned]:.4f}, ×{g(ppl[warned])}"
    at_burst = f"{burst}: {g(summed[burst])}, ×{g(ppl[burst])}" if burst is not None else "none"
    last = max(ppl)
    return (
        f"| {name} | {steps} | {g(summed.get(1, 0.0))} ({g(largest.get(1, 0.0))}) | "
        f"{at_warning} | {at_burst} | ×{g(ppl[last])} |"
    )


if __name__ == "__main__":
    main()
