"""Batched greedy generation vs one prompt at a time, on the default model (issue #38).

The prompts are CounterFact-style questions of the built-in stream (each edit's prompt, then its
paraphrases, until there are ``--prompts`` of them; lengths differ), answered as the generation
protocols answer them: greedy, the authors' natural stop (".", newline, EOS) within 50 new tokens.

- one at a time: the authors' call (R evaluate_utils.py:120-129), ``model.generate`` on one
  unpadded prompt with HF ``stop_strings``, but with the KV cache (theirs runs ``use_cache=False``,
  which is slower still);
- batched: :func:`lifelong.core.model_access.generate_answers` (prompts batched by length, left
  padding, KV cache, per-row stop rule).

It prints both times, their ratio (target: batched at least 5x faster) and how many of the answers
are token for token the same (on a real model a padded batch can round differently from one prompt,
and a near-tie can then go the other way). One compute thread, like the tests.

    python benchmarks/bench_generation.py [--prompts 64] [--model smollm2-135m] [--context question]
"""

from __future__ import annotations

import argparse
import time

import torch

from lifelong.core.machine import runtime_header


def questions(n: int) -> list[str]:
    from streams import load_stream

    edits = list(load_stream("builtin"))
    out = [e.rendered_prompt for e in edits]
    out += [p for e in edits for p in e.paraphrases]
    return out[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", default="question", choices=["question", "qa", "chat"])
    parser.add_argument("--max-new-tokens", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from lifelong.core.model_access import generate_answers, in_context, stop_strings
    from lifelong.core.models import load_model

    print(runtime_header())
    lm = load_model(args.model)
    tok = lm.tokenizer
    prompts = in_context(tok, args.context, questions(args.prompts))
    stops = stop_strings(tok)
    lengths = [len(tok(p).input_ids) for p in prompts]
    print(
        f"model {args.model}, context {args.context}: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} "
        f"tokens, greedy, stop {stops!r}, max_new_tokens {args.max_new_tokens}"
    )
    budgets = [args.max_new_tokens] * len(prompts)
    generate_answers(lm.model, tok, prompts[:2], budgets[:2], stops)  # warm-up

    t0 = time.perf_counter()
    single = []
    with torch.inference_mode():
        for p in prompts:
            enc = tok(p, return_tensors="pt")
            out = lm.model.generate(
                **enc,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                stop_strings=list(stops),
                tokenizer=tok,
                pad_token_id=tok.eos_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            single.append(out[0, enc.input_ids.shape[1] :].tolist())
    t_single = time.perf_counter() - t0

    t0 = time.perf_counter()
    batched = generate_answers(lm.model, tok, prompts, budgets, stops)
    t_batched = time.perf_counter() - t0

    same = sum(list(b.ids) == s for b, s in zip(batched, single))
    new_tokens = sum(len(b.ids) for b in batched)
    print(f"one prompt at a time: {t_single:7.2f} s ({len(prompts) / t_single:5.2f} prompts/s)")
    print(f"batched:              {t_batched:7.2f} s ({len(prompts) / t_batched:5.2f} prompts/s)")
    print(f"batched is {t_single / t_batched:.1f}x faster; {new_tokens} new tokens in all")
    print(f"answers identical token for token: {same} of {len(prompts)}")
    for b in batched[:3]:
        print(f"  e.g. {b.text!r}")


if __name__ == "__main__":
    main()
