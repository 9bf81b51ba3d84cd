"""Every registered editor on the default model, measured in one run: seconds per edit,
bytes on disk per step (delta + editor state) and the time to check out an arbitrary step
from the base, each also as a ratio to a plain batched forward pass over 1,024 tokens.

Each editor replays the same first ``--steps`` built-in edits (one per step) into a
fresh delta store, as a run would, then step ⌈steps/2⌉ is checked out from θ0.

    python benchmarks/bench_editors.py [--steps 8] [--editors ft,rome,...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_locate import forward_yardstick, restore  # benchmarks/ is on sys.path when run as a script

from lifelong.core.machine import runtime_header


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--editors", default=None, help="comma-separated (default: every registered editor)")
    args = ap.parse_args()

    from lifelong.core.delta import DeltaStore
    from lifelong.core.models import load_model
    from lifelong.editors import EDITORS, make_editor
    from streams import load_stream

    lm = load_model("smollm2-135m")
    edits = list(load_stream("builtin"))[: args.steps]
    yard = forward_yardstick(lm)
    print(f"{runtime_header(lm.device)}\nyardstick: forward over 1,024 tokens {yard:.3f} s\n")
    print(f"{'editor':<11}{'s/edit':>8}{'× fwd':>8}{'KiB/step':>10}{'checkout s':>12}{'× fwd':>8}  notes")
    names = args.editors.split(",") if args.editors else sorted(EDITORS)
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    for name in names:
        restore(lm, base)
        try:
            editor = make_editor(name).bind(lm)
            editor.prepare(lm)
            editor.apply(lm, [list(load_stream("builtin"))[-1]])  # untimed warm-up (statistics, copies)
            restore(lm, base)
            editor = make_editor(name).bind(lm)
            editor.prepare(lm)
        except Exception as err:  # e.g. MEND without a trained hypernetwork
            print(f"{name:<11}{'—':>8}{'':>8}{'':>10}{'':>12}{'':>8}  skipped: {str(err).splitlines()[0][:90]}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            store = DeltaStore.for_scope(Path(tmp), lm.model, editor.scope(lm))
            seconds, sizes = [], []
            for step, edit in enumerate(edits, start=1):
                t0 = time.perf_counter()
                delta = editor.apply(lm, [edit])
                seconds.append(time.perf_counter() - t0)
                store.commit(step, delta, editor.step_state())
                sizes.append(store.nbytes_on_disk(step))  # the delta and the editor state saved with it
            middle = (len(edits) + 1) // 2
            t0 = time.perf_counter()
            store.checkout(lm.model, middle)
            editor.load_step_states(store.step_states(middle, editor.incremental_state))
            checkout = time.perf_counter() - t0
        per_edit = sum(seconds) / len(seconds)
        print(
            f"{name:<11}{per_edit:8.2f}{per_edit / yard:8.1f}{sum(sizes) / len(sizes) / 1024:10.1f}"
            f"{checkout:12.3f}{checkout / yard:8.2f}"
        )


if __name__ == "__main__":
    main()
