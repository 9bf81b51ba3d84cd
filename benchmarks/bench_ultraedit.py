"""UltraEdit's speed on the default model, measured in one run (not a timed test).

One step of ``--edits`` (default 100, the authors' turn) CounterFact edits (``dataset:counterfact``),
applied to θ0 by a fresh editor (empty normaliser) and undone, ``--repeats`` times; printed as
seconds per edit and as a ratio to the yardstick measured in the same run: one forward and
backward over the same step's prompts with their answers (teacher forcing), in the editor's
sub-batches of 10, the token-mean loss backpropagated to the input embeddings (every layer's
backward, no weight gradients) with logits at every position, as a plain training step would
compute them. Also printed: the part of each step spent in its forward/backward passes that
capture K and G (timed inside the step; the rest is the normaliser, the solves and the add), for
``solve=original`` (the authors' d_k × d_k solve) and ``solve=kernel`` (our N × N form). Medians
over the repeats.

    python benchmarks/bench_ultraedit.py [--edits 100] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lifelong.core.machine import ComputeThreads, runtime_header, thread_policy


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def restore(lm, base) -> None:
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if not torch.equal(p, base[n]):
                p.copy_(base[n])


def yardstick(lm, editor, batch) -> float:
    """Seconds of one forward+backward over the step's (prompt, answer) sequences, in the editor's
    sub-batches, logits at every position, gradients down to the input embeddings."""
    from lifelong.core.model_access import Codec

    codec = Codec(lm.tokenizer)
    t0 = time.perf_counter()
    for encoded in editor.sub_batches(lm, batch):
        data = codec.collate(encoded, lm.device)
        with torch.enable_grad():
            embeds = lm.adapter.embedding()(data.ids).detach().requires_grad_(True)
            logits = lm.model(inputs_embeds=embeds, attention_mask=data.mask, use_cache=False).logits
            F.cross_entropy(logits[data.rows, data.cols].float(), data.targets).backward()
    return time.perf_counter() - t0


def timing_capture(editor) -> list[float]:
    """Times each of ``editor``'s K/G captures (a sub-batch's forward and backward) inside its apply."""
    spent: list[float] = []
    collect = editor.collect

    def timed_collect(lm, encoded):
        out, t = timed(lambda: collect(lm, encoded))
        spent.append(t)
        return out

    editor.collect = timed_collect
    return spent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=100, help="edits in the step (the authors' turn: 100)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default=None, help="compute threads (default: this machine's share of its cores)")
    args = ap.parse_args()
    with ComputeThreads(thread_policy(args.threads)):
        run(args)


def run(args) -> None:
    from lifelong.core.models import load_model
    from lifelong.editors.ultraedit import UltraEditEditor, UltraEditParams
    from streams import load_stream

    lm = load_model("smollm2-135m")
    batch = list(load_stream("dataset:counterfact"))[: args.edits]
    print(runtime_header(lm.device))
    print(f"model {lm.name} ({lm.num_layers} layers), one step of {len(batch)} dataset:counterfact edits")
    probe = UltraEditEditor().bind(lm)
    print(f"modules {probe.params.modules}, sub_batch {probe.params.sub_batch}")
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    yardstick(lm, probe, batch[:10])  # warm-up
    yard = statistics.median(yardstick(lm, probe, batch) for _ in range(args.repeats))
    print(f"yardstick: forward+backward over the step's prompts {yard:.2f} s ({yard / len(batch) * 1e3:.1f} ms/edit)\n")
    for solve in ("original", "kernel"):
        times, captures, rows = [], [], 0
        for _ in range(args.repeats):
            editor = UltraEditEditor(UltraEditParams(solve=solve)).bind(lm)
            spent = timing_capture(editor)
            _, t = timed(lambda: editor.apply(lm, batch))
            rows = editor.step_report()["rows"]
            restore(lm, base)
            times.append(t)
            captures.append(sum(spent))
        step, capture = statistics.median(times), statistics.median(captures)
        print(
            f"ultraedit solve={solve:<8} {step / len(batch) * 1e3:7.1f} ms/edit  x{step / yard:.2f} yardstick  "
            f"(step {step:.2f} s, N = {rows} rows; of it capture {capture:.2f} s, "
            f"normaliser + solves + apply {step - capture:.3f} s)"
        )


if __name__ == "__main__":
    main()
