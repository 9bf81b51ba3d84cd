"""Probe throughput and end-to-end replay on the default model, measured in one run.

1. Probe throughput on the pairs the edit-quality and retention probes score (each edit's
   prompt and paraphrases with the new and the true target, its neighborhood prompts with
   their answer and the new target), against two yardsticks measured here: a
   one-prompt-at-a-time teacher-forced evaluation of the same pairs, and a plain batched
   forward pass over the same prompt+answer sequences (the roofline of scoring them one
   sequence per pair).
2. An end-to-end replay (default: FT-L, 200 steps of the built-in stream cycled with fresh
   ids, retention on a log-spaced schedule): time to 50, 100 and 200 steps and how it
   grows, peak resident memory, and the resident memory after each stretch.

    python benchmarks/bench_probes.py [--edits 113] [--steps 200] [--editor ft] [--skip-replay]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import torch

from lifelong.core.machine import runtime_header


def rss_mib() -> float:
    """Resident memory now (from /proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe_pairs(edits) -> list[tuple[str, str]]:
    pairs = []
    for e in edits:
        for prompt in (e.rendered_prompt, *e.paraphrases):
            pairs += [(prompt, e.target_new), (prompt, e.target_true)]
        for n in e.neighborhood:
            pairs += [(n.prompt, n.answer), (n.prompt, e.target_new)]
    return list(dict.fromkeys(pairs))


def throughput(lm, edits) -> None:
    from lifelong.core.scorer import Scorer

    pairs = probe_pairs(edits)
    scorer = Scorer(lm.model, lm.tokenizer)
    scorer.score(pairs[:16])  # warm-up
    encoded = [scorer.encode(p, a) for p, a in pairs]
    tokens = sum(len(p) + len(a) for p, a in encoded)

    t0 = time.perf_counter()
    with torch.inference_mode():
        for p, a in encoded:
            logp = lm.model(torch.tensor([p + a])).logits[0].log_softmax(-1)
            [logp[len(p) - 1 + j, t].item() for j, t in enumerate(a)]
    single = time.perf_counter() - t0

    t0 = time.perf_counter()
    Scorer(lm.model, lm.tokenizer).score(pairs)
    batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    with torch.inference_mode():  # the roofline: every pair's sequence, bucketed, body only
        lengths = torch.tensor([len(p) + len(a) for p, a in encoded]).numpy()
        for idx in scorer._batches(lengths):
            batch = scorer.collate([encoded[i] for i in idx])
            scorer.body(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    forward = time.perf_counter() - t0
    prompts = len({p for p, _ in pairs})
    print(
        f"probe throughput: {len(pairs)} pairs ({prompts} distinct prompts, {tokens} prompt+answer tokens) "
        f"of {len(edits)} edits"
    )
    print(f"  one pair at a time, teacher-forced : {len(pairs) / single:7.1f} pairs/s")
    print(
        f"  scorer                             : {len(pairs) / batched:7.1f} pairs/s = "
        f"{single / batched:.1f} × one at a time"
    )
    print(
        f"  plain batched forward, same tokens : {tokens / forward:7.0f} tokens/s; scorer {tokens / batched:.0f} "
        f"tokens/s = {forward / batched:.0%} of it"
    )


def replay_growth(editor: str, steps: int) -> None:
    from lifelong.core.models import load_model
    from lifelong.replay import replay
    from lifelong.run import RunConfig
    from streams import EditStream, load_stream

    base = list(load_stream("builtin"))
    # The built-in stream cycled with fresh ids; retimed to one edit per step.
    cycled = [
        dataclasses.replace(base[k % len(base)], id=f"{base[k % len(base)].id}#{k // len(base)}") for k in range(steps)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stream.jsonl"
        EditStream(cycled).retimed(datetime(2024, 1, 1), timedelta(days=1)).to_jsonl(path)
        lm = load_model("smollm2-135m")
        config = RunConfig(editor=editor, stream=str(path), steps=steps, probes=["retention:schedule=log"])
        marks = [m for m in (50, 100, 200, steps) if m <= steps]
        marks = sorted(set(marks))
        done, elapsed, before, at = 0, 0.0, rss_mib(), {}
        print(
            f"\nreplay: {editor}, {steps} steps, retention on a log schedule, edit quality every step "
            f"(RSS before: {before:.0f} MiB)"
        )
        for mark in marks:
            t0 = time.perf_counter()
            replay(config, Path(tmp) / "run", lm=lm, progress=False, stop_after=mark - done)
            elapsed += time.perf_counter() - t0
            deltas = sum(f.stat().st_size for f in (Path(tmp) / "run" / "deltas").glob("*")) / 2**20
            print(
                f"  to step {mark:>4}: {elapsed:7.1f} s total ({elapsed / mark:.2f} s/step); RSS {rss_mib():.0f} MiB; "
                f"deltas on disk {deltas:.1f} MiB"
            )
            done, at[mark] = mark, elapsed
        for a, b in zip(marks, marks[1:]):
            print(f"  {a} -> {b} steps (× {b / a:.1f}): time × {at[b] / at[a]:.2f}")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"  peak RSS of this process: {peak:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=113, help="built-in edits whose probe pairs are scored")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--editor", default="ft")
    ap.add_argument("--skip-replay", action="store_true")
    args = ap.parse_args()

    from lifelong.core.models import load_model
    from streams import load_stream

    print(runtime_header())
    lm = load_model("smollm2-135m")
    throughput(lm, list(load_stream("builtin"))[: args.edits])
    if not args.skip_replay:
        replay_growth(args.editor, args.steps)


if __name__ == "__main__":
    main()
