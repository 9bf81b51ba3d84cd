"""Foundation figures on the default model, measured in one run (not a timed test).

Prints: first (GGUF-converting) and cached model load; scorer throughput against a
one-prompt-at-a-time teacher-forced evaluation of the same prompts and against a plain
batched forward pass over the same tokens; seconds per FT-L step; bytes on disk per step.

    python benchmarks/bench_foundation.py [--prompts 300] [--edits 5] [--skip-first-load]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from lifelong.core.machine import runtime_header


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--edits", type=int, default=5)
    ap.add_argument("--skip-first-load", action="store_true", help="do not time the GGUF conversion")
    args = ap.parse_args()

    from lifelong.core.delta import DeltaStore
    from lifelong.core.models import load_model
    from lifelong.core.scorer import Scorer, answer_token_ids
    from lifelong.editors import make_editor
    from streams import load_stream

    print(runtime_header())
    if not args.skip_first_load:
        with tempfile.TemporaryDirectory() as cache:
            old = os.environ.get("LIFELONG_CACHE")
            os.environ["LIFELONG_CACHE"] = cache
            _, first = timed(lambda: load_model("smollm2-135m"))
            if old is None:
                del os.environ["LIFELONG_CACHE"]
            else:
                os.environ["LIFELONG_CACHE"] = old
        print(f"first load (GGUF -> float32 safetensors): {first:.1f} s")
    load_model("smollm2-135m")  # make sure the regular cache exists
    lm, cached = timed(lambda: load_model("smollm2-135m"))
    print(f"cached load: {cached:.2f} s")

    stream = load_stream("builtin")
    pairs = []
    for e in stream:
        pairs += [(e.rendered_prompt, e.target_new), (e.rendered_prompt, e.target_true)]
        pairs += [(p, e.target_new) for p in e.paraphrases]
        pairs += [(n.prompt, n.answer) for n in e.neighborhood]
    pairs = list(dict.fromkeys(pairs))[: args.prompts]
    n = len(pairs)
    scorer = Scorer(lm.model, lm.tokenizer)
    scorer.score(pairs[:8])  # warm-up

    def one_at_a_time():
        with torch.inference_mode():
            for prompt, answer in pairs:
                p = lm.tokenizer(prompt).input_ids
                a = answer_token_ids(lm.tokenizer, answer)
                logp = lm.model(torch.tensor([p + a])).logits[0].log_softmax(-1)
                [logp[len(p) - 1 + j, t].item() for j, t in enumerate(a)]

    _, t_single = timed(one_at_a_time)
    _, t_scorer = timed(lambda: Scorer(lm.model, lm.tokenizer).score(pairs))
    encoded = [scorer.encode(p, a) for p, a in pairs]
    tokens = sum(len(p) + len(a) for p, a in encoded)

    def plain_forward():  # the roofline: same sequences, same buckets, body only, no scoring
        with torch.inference_mode():
            lengths = torch.tensor([len(p) + len(a) for p, a in encoded]).numpy()
            for idx in scorer._batches(lengths):
                batch = scorer.collate([encoded[i] for i in idx])
                scorer.body(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)

    _, t_forward = timed(plain_forward)
    print(f"scorer: {n} prompts, {tokens} tokens")
    print(f"  one prompt at a time : {n / t_single:7.1f} prompts/s")
    print(f"  batched scorer       : {n / t_scorer:7.1f} prompts/s  ({t_single / t_scorer:.1f}x one-at-a-time)")
    print(
        f"  plain batched forward: {tokens / t_forward:7.0f} tokens/s; scorer {tokens / t_scorer:.0f} tokens/s "
        f"= {t_forward / t_scorer:.0%} of it"
    )

    editor = make_editor("ft")
    edits = list(stream)[: args.edits]
    with tempfile.TemporaryDirectory() as d:
        store = DeltaStore.for_scope(Path(d), lm.model, editor.scope(lm))
        times, sizes = [], []
        for k, e in enumerate(edits, start=1):
            delta, t = timed(lambda: editor.apply(lm, [e]))
            store.commit(k, delta, editor.state_dict())
            times.append(t)
            sizes.append(store.nbytes_on_disk(k))
    print(
        f"FT-L: {sum(times) / len(times):.2f} s per step (mean of {len(times)}; min {min(times):.2f}, "
        f"max {max(times):.2f}); {sum(sizes) / len(sizes) / 2**20:.2f} MiB on disk per step"
    )


if __name__ == "__main__":
    main()
