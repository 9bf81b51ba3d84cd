"""Locate-and-edit speed on the default model, measured in one run (not a timed test).

Prints, each with its ratio to a plain batched forward pass over 1,024 tokens measured
in the same run (the yardstick):
- ROME seconds per edit at the paper's optimisation budget (20 steps, 21 context
  templates, early stop at total loss 0.05), with the upper layers fused in the default
  precision (``auto``: bfloat16 where this machine runs it natively and fast, else float32), in float32 and in
  bfloat16 explicitly, with our NLL-only early stop (stop_on=nll: fewer steps than the
  original's total-loss rule), and through the model's own layers (v_stack=model); then ``auto``'s
  time as a ratio to the faster explicit dtype on the same edits. A variant that is clearly
  slow (emulated bfloat16: 30–70×) stops being timed once it has spent --variant-budget s;
- MEMIT and AlphaEdit seconds per edit at batch size 1 and 16;
- covariance statistics for the default corpus: sampling the text, then the pass over it
  for one layer and for MEMIT's five layers at once.
Each edit is applied to the base model and reverted, so every edit starts from θ0.

    python benchmarks/bench_locate.py [--edits 5] [--batch 16] [--cov-tokens 20000] [--skip-covariance]
                                      [--variant-budget 240] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import torch

from lifelong.core.machine import ComputeThreads, choose_dtype, runtime_header, thread_policy


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def forward_yardstick(lm, repeats: int = 3) -> float:
    """Median seconds of one no-grad forward over 8 × 128 = 1,024 tokens (logits included)."""
    ids = torch.randint(100, lm.tokenizer.vocab_size - 100, (8, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lm.model(input_ids=ids)  # warm-up
        return statistics.median(timed(lambda: lm.model(input_ids=ids))[1] for _ in range(repeats))


def restore(lm, base) -> None:
    """θ0 bitwise (subtracting a delta again is not exact, and cached statistics are keyed by the weights).

    Only the tensors that changed are written back, as a replay never touches the others:
    rewriting them all would make editors rebuild what they cache per weight version."""
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if not torch.equal(p, base[n]):
                p.copy_(base[n])


def per_edit(lm, editor, batches, base, budget: float = float("inf")) -> tuple[float, list[float]]:
    """Mean seconds per edit over ``batches``, each applied to θ0 and then undone; batches stop
    once ``budget`` seconds are spent (at least one always runs)."""
    editor.prepare(lm)
    seconds, each, edits = 0.0, [], 0
    for batch in batches:
        _, t = timed(lambda: editor.apply(lm, batch))
        restore(lm, base)
        seconds += t
        edits += len(batch)
        each.append(t / len(batch))
        if seconds > budget:
            break
    return seconds / edits, each


def warm_up(lm, editor, edit, base) -> None:
    """One short untimed edit: builds what an editor makes once (covariance inverse, converted upper layers)."""
    params = editor.params
    editor.params = dataclasses.replace(params, v_steps=1) if hasattr(params, "v_steps") else params
    try:
        per_edit(lm, editor, [[edit]], base)
    finally:
        editor.params = params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=5, help="edits timed per editor at batch size 1")
    ap.add_argument("--batch", type=int, default=16, help="the larger batch size for MEMIT and AlphaEdit")
    ap.add_argument("--cov-tokens", type=int, default=20000)
    ap.add_argument("--skip-covariance", action="store_true")
    ap.add_argument("--only-covariance", action="store_true")
    ap.add_argument(
        "--variant-budget",
        type=float,
        default=240.0,
        help="seconds after which a ROME variant stops being timed (emulated bfloat16 takes minutes per edit)",
    )
    ap.add_argument("--threads", default=None, help="compute threads (default: this machine's share of its cores)")
    args = ap.parse_args()
    with ComputeThreads(thread_policy(args.threads)):
        run(args)


def run(args) -> None:
    from lifelong.core.models import load_model
    from lifelong.editors import make_editor
    from lifelong.editors.covariance import MODEL_SAMPLE, _token_rows, compute_second_moments
    from lifelong.editors.memit import default_layers
    from streams import load_stream

    lm = load_model("smollm2-135m")
    edits = list(load_stream("builtin"))
    print(runtime_header(lm.device))
    print(f"model {lm.name} ({lm.num_layers} layers)")
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    yard = forward_yardstick(lm)
    print(f"yardstick: forward over 1,024 tokens {yard:.3f} s ({1024 / yard:.0f} tokens/s)\n")

    def report(label: str, seconds: float, extra: str = "") -> None:
        print(f"{label:<38}{seconds:7.2f} s/edit  = {seconds / yard:6.2f} × forward(1,024 tok){extra}")

    warm = edits[-1]  # one short untimed edit per editor: covariance inverse, converted upper layers
    singles = [[e] for e in edits[: args.edits]]
    if not args.only_covariance:
        times = {}
        for name, overrides in [
            ("rome", {}),
            ("rome", {"v_dtype": "float32"}),
            ("rome", {"v_dtype": "bfloat16"}),
            ("rome", {"stop_on": "nll"}),
            ("rome", {"v_stack": "model"}),
            ("r-rome", {}),
        ]:
            editor = make_editor(name, overrides).bind(lm)
            warm_up(lm, editor, warm, base)
            seconds, each = per_edit(lm, editor, singles, base, args.variant_budget)
            label = f"{name}" + (f" ({', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else "")
            if name == "rome" and not overrides:
                label += f" (v_dtype=auto -> {choose_dtype('auto', lm.device).name})"
            cut = (
                f" (stopped after {len(each)} of {len(singles)} edits: budget spent)"
                if len(each) < len(singles)
                else ""
            )
            report(label, seconds, f"   [{', '.join(f'{s:.2f}' for s in each)}]{cut}")
            if name == "rome" and set(overrides) <= {"v_dtype"}:
                times[overrides.get("v_dtype", "auto")] = each
        common = min(len(t) for t in times.values())
        mean = {k: statistics.fmean(t[:common]) for k, t in times.items()}
        fastest = min(("float32", "bfloat16"), key=mean.get)
        print(
            f"\nrome on the same {common} edit(s): auto {mean['auto']:.2f} s, float32 {mean['float32']:.2f} s, "
            f"bfloat16 {mean['bfloat16']:.2f} s; auto / faster explicit ({fastest}) = "
            f"{mean['auto'] / mean[fastest]:.2f}; bfloat16 / float32 = {mean['bfloat16'] / mean['float32']:.2f}\n"
        )
        for name in ("memit", "alphaedit"):
            editor = make_editor(name).bind(lm)
            warm_up(lm, editor, warm, base)
            seconds, _ = per_edit(lm, editor, singles, base)
            report(f"{name} batch 1", seconds)
            big = [edits[args.edits : args.edits + args.batch]]
            seconds, _ = per_edit(lm, editor, big, base)
            report(f"{name} batch {len(big[0])}", seconds)

    if not args.skip_covariance:
        with tempfile.TemporaryDirectory() as empty:  # sample afresh: the text is cached once made
            os.environ["LIFELONG_CACHE"], saved = empty, os.environ.get("LIFELONG_CACHE")
            try:
                rows, sampling = timed(lambda: _token_rows(lm, MODEL_SAMPLE, args.cov_tokens, 128, 0))
            finally:
                os.environ.pop("LIFELONG_CACHE")
                if saved is not None:
                    os.environ["LIFELONG_CACHE"] = saved
        print(f"\ncovariance, default corpus ({MODEL_SAMPLE}, {args.cov_tokens} tokens):")
        print(f"  sampling the text once            {sampling:7.1f} s = {sampling / yard:7.1f} × forward")
        layer = default_layers(lm.num_layers)[0]
        _, one = timed(lambda: compute_second_moments(lm, [layer], rows))
        print(f"  pass for 1 layer                  {one:7.1f} s = {one / yard:7.1f} × forward")
        layers = default_layers(lm.num_layers)
        _, five = timed(lambda: compute_second_moments(lm, layers, rows))
        print(
            f"  pass for {len(layers)} layers at once          {five:7.1f} s = {five / yard:7.1f} × forward "
            f"({five / len(layers):.1f} s per layer)"
        )


if __name__ == "__main__":
    main()
