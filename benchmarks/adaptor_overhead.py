"""Probe-time overhead of adaptor editors: scoring with a run's editor state over the plain forward.

For each run directory (a GRACE, WISE or memory replay), the model is checked out at its
last step with the editor's state (codebook, side memories, stored edit texts), and the
probe pairs of the built-in facts (prompts, paraphrases, neighborhood prompts) are scored
through ``scorer_for`` (hooks and prompt rewriting) and through a plain scorer on the same
weights with the hooks detached. Prints both times and their ratio, best of ``--repeats``.

    python benchmarks/adaptor_overhead.py /tmp/wt4-runs/grace /tmp/wt4-runs/memory
"""

from __future__ import annotations

import argparse
import time

import torch

from lifelong.core.scorer import Scorer
from lifelong.replay import checkout, scorer_for
from lifelong.run import RunDir
from streams import load_stream


def best_time(make_scorer, pairs, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        scorer = make_scorer()  # fresh: no tokenization cache carried between repeats
        t0 = time.perf_counter()
        scorer.score(pairs)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--facts", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    edits = list(load_stream("builtin"))[: args.facts]
    pairs = [(p, e.target_new) for e in edits for p in (e.rendered_prompt, *e.paraphrases)]
    pairs += [(n.prompt, n.answer) for e in edits for n in e.neighborhood]
    print(f"{'run':<28}{'editor':<8}{'step':>5}{'pairs':>7}{'edited s':>10}{'plain s':>9}{'ratio':>7}")
    for path in args.runs:
        step = RunDir(path).completed_step()
        lm = checkout(path, step)
        edited = best_time(lambda: scorer_for(lm), pairs, args.repeats)
        lm.editor.release()
        plain = best_time(lambda: Scorer(lm.model, lm.tokenizer), pairs, args.repeats)
        print(
            f"{path[-28:]:<28}{lm.editor.name:<8}{step:>5}{len(pairs):>7}{edited:>10.2f}{plain:>9.2f}"
            f"{edited / plain:>7.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
