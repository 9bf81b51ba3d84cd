"""Cost against model size (issue #36): seconds per edit and peak memory of each editor on
random-weight models of the default model's family (benchmarks/family.py: configs only, seeded
initialisation, nothing downloaded), with the fitted exponent of each against parameter count.

Every (size, editor) cell runs in a fresh subprocess, which builds the model, times its own
yardstick (a no-grad forward over 8 × 128 = 1,024 tokens after a short warm-up: ``fwd s``; every
time is also given as a ratio to it, ``× fwd``, so that load on a shared machine cancels out), then
resets its peak resident memory (``5`` to /proc/self/clear_refs, which resets VmHWM and getrusage's
``ru_maxrss``; tracemalloc does not see torch's allocations), records the resident memory
(``weights MiB``: the weights and the libraries), prepares the editor (key statistics for
ROME/MEMIT/AlphaEdit: ``prep s``) and applies ``--edits`` single edits of the built-in stream, each
to θ0 (the edited tensors are restored between them). ``peak MiB`` is the peak from the reset on;
``extra MiB`` = peak − weights: the allowance an editor needs on top of the model.

The exponent b in ``cost ∝ params^b`` is the least-squares slope of log cost on log parameter count
over the sizes run (two sizes: the slope between them), for seconds per edit, for its ratio to the
forward (b(× fwd) > 0: the editor grows faster than a forward), for the peak and for the extra memory.

Key statistics are computed at ``--cov-tokens`` (default 2,000, not the editors' 20,000: their cost is
a pass over those tokens, linear in the count, and timed apart from the edit) from the project's
reference corpus (probes/data/reference_corpus.txt) rather than text sampled from the random model.

    python benchmarks/bench_scale.py [--sizes 135m,360m] [--editors ft,rome,memit,alphaedit,ultraedit,grace]
                                     [--edits 1] [--cov-tokens 2000] [--extra "1.7b:ft,ultraedit"]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

EDITORS = ("ft", "rome", "memit", "alphaedit", "ultraedit", "grace")
COVARIANCE = ("rome", "memit", "alphaedit")
CORPUS = ROOT / "probes" / "data" / "reference_corpus.txt"


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Reset this process's peak resident memory (Linux ≥ 4.0: ``5`` to /proc/self/clear_refs resets VmHWM
    and with it getrusage's ru_maxrss), so that the peak measured next is the editor's, not the build's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    """Peak resident memory since the last :func:`reset_peak` (ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def overrides_for(editor: str, cov_tokens: int) -> dict[str, str]:
    if editor in COVARIANCE:
        return {"cov_tokens": str(cov_tokens), "cov_corpus": str(CORPUS)}
    return {}


def forward_seconds(lm, repeats: int) -> float:
    """Median seconds of a no-grad forward over 8 × 128 = 1,024 random tokens, after a short warm-up."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(len(lm.tokenizer), 49152) - 1, (8, 128), generator=gen).to(lm.device)

    def synchronise() -> None:  # a GPU's forward returns before it is done
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)

    times = []
    with torch.no_grad():
        lm.model(input_ids=ids[:, :16])  # warm-up: kernel choice, first allocations
        for _ in range(repeats):
            synchronise()
            t = time.perf_counter()
            lm.model(input_ids=ids)
            synchronise()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def child(args) -> dict:
    """One (size, editor) in this process; returns what it measured."""
    import torch
    from family import loaded_family_model, parameter_count

    from lifelong.core.machine import release_free_memory

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.size.startswith("tiny"):
        from lifelong.core.models import load_model

        lm, tok = load_model("tiny-llama"), "byte"
    else:
        lm, tok = loaded_family_model(args.size)
    out: dict = {"size": args.size, "editor": args.editor, "params": parameter_count(lm.model), "tokenizer": tok}
    out["build_s"] = time.perf_counter() - t0
    out["forward_s"] = forward_seconds(lm, args.forwards)  # this process's own yardstick
    from lifelong.editors import make_editor
    from streams import load_stream

    edits = list(load_stream("builtin"))[: args.edits]
    editor = make_editor(args.editor, overrides_for(args.editor, args.cov_tokens)).bind(lm)
    # θ0 of the tensors the editor may change, to restore between edits (none with a single edit)
    params = dict(lm.model.named_parameters())
    base = {n: params[n].detach().clone() for n in editor.scope(lm)} if len(edits) > 1 else {}
    release_free_memory()
    out["peak_reset"] = reset_peak()
    out["weights_mib"] = _status_mib("VmRSS")  # resident now: the weights (and the libraries)
    t = time.perf_counter()
    editor.prepare(lm)
    out["prep_s"] = time.perf_counter() - t
    each = []
    for i, edit in enumerate(edits):
        t = time.perf_counter()
        editor.apply(lm, [edit])
        each.append(time.perf_counter() - t)
        if i == len(edits) - 1:
            break
        with torch.no_grad():
            for n, p in base.items():
                params[n].copy_(p)
        editor.release()  # an adaptor's hooks; a fresh bind for the next edit
        editor = make_editor(args.editor, overrides_for(args.editor, args.cov_tokens)).bind(lm)
        editor.prepare(lm)  # key statistics come from the cache the first prepare wrote
    out["edit_s"] = statistics.mean(each)
    out["each_s"] = each
    out["peak_mib"] = peak_mib()
    return out


def run_child(size: str, editor: str, args, cache: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--size", size, "--editor", editor]
    cmd += ["--edits", str(args.edits), "--cov-tokens", str(args.cov_tokens), "--threads", str(args.threads)]
    cmd += ["--forwards", str(args.forwards)]
    env = {**os.environ, "LIFELONG_CACHE": cache, "OMP_NUM_THREADS": str(args.threads)}
    env["LIFELONG_THREADS"] = str(args.threads)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode != 0:
        return {"size": size, "editor": editor, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    den = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / den if den else None


def table(results: list[dict], marked: set[tuple[str, str]]) -> str:
    ok = [r for r in results if "error" not in r]
    sizes = list(dict.fromkeys(r["size"] for r in results))
    forward = {
        s: statistics.median(r["forward_s"] for r in ok if r["size"] == s)
        for s in sizes
        if any(r["size"] == s for r in ok)
    }
    lines = [
        f"{'size':<6}{'params':>8}  {'editor':<10}{'fwd s':>7}{'s/edit':>8}{'× fwd':>7}{'prep s':>8}{'× fwd':>7}"
        f"{'weights MiB':>12}{'peak MiB':>10}{'extra MiB':>10}  note"
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['size']:<6}{'':>8}  {r['editor']:<10}  failed: {r['error']}")
            continue
        notes = []
        if (r["size"], r["editor"]) in marked:
            notes.append("1.7B: only where time allowed")
        if r["editor"] in COVARIANCE:
            notes.append("prep: key statistics")
        if not r["peak_reset"]:
            notes.append("peak not reset: includes the build")
        fwd = r["forward_s"]
        lines.append(
            f"{r['size']:<6}{r['params'] / 1e6:>7.0f}M  {r['editor']:<10}{fwd:>7.2f}{r['edit_s']:>8.2f}"
            f"{r['edit_s'] / fwd:>7.2f}{r['prep_s']:>8.2f}{r['prep_s'] / fwd:>7.2f}"
            f"{r['weights_mib']:>12.0f}{r['peak_mib']:>10.0f}{r['peak_mib'] - r['weights_mib']:>10.0f}"
            f"  {'; '.join(notes)}"
        )
    lines.append("")
    lines.append(f"{'exponent b (cost ∝ params^b)':<32}{'s/edit':>8}{'× fwd':>8}{'peak':>8}{'extra':>8}  sizes")
    params = {s: next(r["params"] for r in ok if r["size"] == s) for s in forward}
    b_fwd = slope([params[s] for s in forward], list(forward.values()))
    lines.append(f"{'forward (median of the cells)':<32}{_fmt(b_fwd):>8}{'':>8}{'':>8}{'':>8}  {','.join(forward)}")
    for editor in dict.fromkeys(r["editor"] for r in ok):
        rows = [r for r in ok if r["editor"] == editor]
        xs = [r["params"] for r in rows]
        b = slope(xs, [r["edit_s"] for r in rows])
        b_ratio = slope(xs, [r["edit_s"] / r["forward_s"] for r in rows])
        b_peak = slope(xs, [r["peak_mib"] for r in rows])
        b_extra = slope(xs, [max(r["peak_mib"] - r["weights_mib"], 1.0) for r in rows])
        lines.append(
            f"{editor:<32}{_fmt(b):>8}{_fmt(b_ratio):>8}{_fmt(b_peak):>8}{_fmt(b_extra):>8}  "
            f"{','.join(r['size'] for r in rows)}"
        )
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="135m,360m", help="comma-separated: 135m, 360m, 1.7b (tiny: the test model)")
    ap.add_argument("--editors", default=",".join(EDITORS))
    ap.add_argument(
        "--extra", default="", help="more (size:editor,editor) cells, e.g. 1.7b:ft,ultraedit, marked in the table"
    )
    ap.add_argument("--edits", type=int, default=1, help="single edits timed per (size, editor)")
    ap.add_argument("--cov-tokens", type=int, default=2000, help="tokens for key statistics (editors' default 20000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--forwards", type=int, default=1, help="timed yardstick forwards per cell (median)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds one child may take")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--editor", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    import torch
    from family import check_against_default

    from lifelong.core.machine import describe_cpu_line

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {args.threads} thread(s) per child\n{describe_cpu_line()}\n"
        f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.edits} edit(s) per cell, "
        f"key statistics over {args.cov_tokens} tokens of {CORPUS.relative_to(ROOT)}\n{check_against_default()}"
    )
    cells = [(s, e) for s in args.sizes.split(",") for e in args.editors.split(",")]
    marked: set[tuple[str, str]] = set()
    for spec in filter(None, args.extra.split(";")):
        size, _, names = spec.partition(":")
        for e in names.split(","):
            cells.append((size, e))
            marked.add((size, e))
    results = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as cache:
        for size, editor in cells:
            t = time.perf_counter()
            r = run_child(size, editor, args, cache)
            results.append(r)
            print(f"  {size} {editor}: {time.perf_counter() - t:.0f} s", "(failed)" if "error" in r else "", flush=True)
    load = os.getloadavg()
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(table(results, marked))


if __name__ == "__main__":
    main()
