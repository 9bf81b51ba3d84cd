"""Which layer to edit: single-edit ES/PS/NS per layer on the default model (one run).

How the defaults were chosen: each layer in ``--layers`` edits the same facts (each on a
fresh base) and the table gives efficacy, paraphrase generalization and neighborhood
locality; the chosen layer is the one with the best PS + NS among those with ES = 1.

    python benchmarks/layer_sweep.py --editor rome --layers 2,4,6,8,10,14,20 --facts 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_locate import restore  # benchmarks/ is on sys.path when run as a script
from single_edit_quality import quality


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--editor", default="rome")
    ap.add_argument("--layers", default="2,4,6,8,10,14,20")
    ap.add_argument("--facts", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], help="key=value for the editor")
    args = ap.parse_args()

    from lifelong.core.models import load_model
    from lifelong.core.scorer import Scorer
    from lifelong.editors import make_editor
    from streams import load_stream

    lm = load_model("smollm2-135m")
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    scorer = Scorer(lm.model, lm.tokenizer)
    edits = list(load_stream("builtin"))[:: max(1, 113 // args.facts)][: args.facts]  # spread over relations
    overrides = dict(kv.split("=", 1) for kv in args.set)
    layers = [int(x) for x in args.layers.split(",")]
    if args.editor in ("rome", "r-rome") and overrides.get("mom2", "true").lower() in ("true", "1", "yes"):
        from lifelong.editors.covariance import key_second_moments

        key_second_moments(lm, layers)  # one pass over the corpus for every layer not cached yet
    print(f"{args.editor} on {len(edits)} built-in facts, each edit on a fresh base")
    print(f"{'layer':>5}{'ES':>7}{'PS':>7}{'NS':>7}{'s/edit':>8}")
    for layer in layers:
        editor = make_editor(args.editor, {**overrides, "layer": str(layer)}).bind(lm)
        rows, seconds = [], []
        for edit in edits:
            t0 = time.perf_counter()
            editor.apply(lm, [edit])
            seconds.append(time.perf_counter() - t0)
            rows.append(quality(scorer, edit))
            restore(lm, base)
        es, ps, ns = np.nanmean(np.array(rows), axis=0)
        print(f"{layer:>5}{es:>7.2f}{ps:>7.2f}{ns:>7.2f}{np.mean(seconds):>8.2f}", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
