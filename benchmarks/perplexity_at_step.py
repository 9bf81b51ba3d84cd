"""Perplexity of finished runs at a kept step, re-measured on any corpus, with intervals over its chunks.

A run's perplexity probe reads the corpus and length it was given; this re-reads the model of each
run as it stood after ``--step`` (checked out from its kept deltas: bitwise the model the run had)
on another corpus or more of it. For each run: its perplexity and its ratio to θ0 with the 95% t
interval over the chunks; for every pair of runs (same model and base weights): the ratio of their
ratios, paired chunk by chunk (docs/METRICS.md §5). The runs must share the model.

    python benchmarks/perplexity_at_step.py RUN_A RUN_B --corpus wikitext --max-tokens 16384
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lifelong.core.machine import ComputeThreads, runtime_header, thread_policy  # noqa: E402
from lifelong.core.models import load_model  # noqa: E402
from lifelong.core.scorer import Scorer  # noqa: E402
from lifelong.core.stats import ratio_interval  # noqa: E402
from lifelong.replay import checkout, scorer_for  # noqa: E402
from lifelong.run import RunDir  # noqa: E402
from probes import make_probe  # noqa: E402
from streams.errors import UserError  # noqa: E402


def ratio_text(d: np.ndarray, counts: np.ndarray) -> str:
    """exp(Σd / Σn) [95% interval over chunks] for per-chunk NLL differences ``d`` over ``counts`` tokens."""
    r, low, high = ratio_interval(d, counts)
    return f"{math.exp(r):.4g} [{math.exp(low):.3f}, {math.exp(high):.3f}] n={len(d)}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--step", type=int, default=None, help="the step to read (default: each run's last completed)")
    ap.add_argument("--corpus", default="builtin", help="builtin, wikitext (shared data) or a text file")
    ap.add_argument("--max-tokens", type=int, default=8192, help="the corpus's first N tokens (0: all)")
    ap.add_argument("--chunk-tokens", type=int, default=128)
    ap.add_argument("--threads", default=None)
    args = ap.parse_args(argv)

    runs = [RunDir(p) for p in args.runs]
    identities = [r.manifest()["identity"] for r in runs]
    if len({(i["model"], i.get("base_weights")) for i in identities}) > 1:
        raise UserError("the runs edited different models (or base weights): their ratios share no θ0")
    probe = make_probe(f"perplexity:corpus={args.corpus},max_tokens={args.max_tokens},chunk_tokens={args.chunk_tokens}")
    with ComputeThreads(thread_policy(args.threads)):
        print(runtime_header())
        base = load_model(identities[0]["model"])
        _, theta0 = probe.score(Scorer(base.model, base.tokenizer))
        counts = np.array(probe.chunk_tokens(base.tokenizer), dtype=float)
        theta0_nll = np.array(theta0)
        print(
            f"corpus {probe.path.name}: {len(counts)} chunks, {int(counts.sum())} tokens; "
            f"perplexity at θ0 {math.exp(theta0_nll.sum() / counts.sum()):.4g}\n"
        )
        nll = {}
        for run in runs:
            step = run.completed_step() if args.step is None else args.step
            lm = checkout(run.path, step)
            _, chunks = probe.score(scorer_for(lm))
            nll[run.path.name] = np.array(chunks)
            print(f"{run.path.name} step {step}: ratio to θ0 {ratio_text(nll[run.path.name] - theta0_nll, counts)}")
    if len(nll) > 1:
        print("\npaired over the chunks (a / b):")
        for a, b in itertools.combinations(nll, 2):
            print(f"  {a} / {b}: {ratio_text(nll[a] - nll[b], counts)}")


if __name__ == "__main__":
    main()
