"""GRACE's nearest-key lookup at scale: time per query and decisions, on real keys (issue #19).

The keys are those GRACE stores: the input of its layer's MLP output projection at the last
token of each edit's prompt (one padded forward per batch of prompts; no value is trained, since
the lookup reads only keys, radii and labels). They enter a codebook by GRACE's own add rule
(expand, split by label), so the radii are the ones a run would have. The queries are what the
probes send: edit prompts (retention), their paraphrases and neighborhood prompts.

For each codebook size it prints the time per query, in batches of ``--batch`` queries as a scorer
sends them, of

- ``full``: every key measured exactly (the lookup before session 13);
- ``lookup``: GRACE's lookup now (a matmul-form screen with an error bound, survivors measured
  exactly), whose hits and indices it checks are identical to ``full``'s;
- ``hnsw`` (when ``faiss`` is importable): GRACE's ``index=hnsw`` (a faiss HNSW graph proposes 16
  candidates per query, measured exactly; the graph is built as the keys are added, and not timed),
  and the share of queries whose decision (hit, and which key) agrees with the exact rule, with its
  95% Wilson interval;

and the growth of each time between successive sizes next to the growth in keys.

    python benchmarks/grace_lookup.py --model smollm2-135m --sizes 1000 2500 5000 10000
    python benchmarks/grace_lookup.py --model tiny-llama --streams builtin
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lifelong.core.machine import runtime_header  # noqa: E402
from lifelong.core.models import load_model  # noqa: E402
from lifelong.core.stats import wilson  # noqa: E402
from lifelong.editors.adaptor import default_adaptor_layer  # noqa: E402
from lifelong.editors.grace import GRACEEditor, GRACEParams  # noqa: E402
from lifelong.editors.locate import keys_at  # noqa: E402
from streams import load_stream  # noqa: E402


def last_token_keys(lm, layer: int, prompts: list[str], batch: int = 64) -> torch.Tensor:
    """The layer's out-projection input at each prompt's last token (float32), in padded batches."""
    out = []
    for start in range(0, len(prompts), batch):
        texts = prompts[start : start + batch]
        ends = [len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) - 1 for t in texts]
        out.append(keys_at(lm, layer, texts, ends).float().cpu())
        print(f"\r  keys {min(start + batch, len(prompts))}/{len(prompts)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return torch.cat(out)


def full_scan(g: GRACEEditor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dist, idx = torch.cdist(q, g.keys, compute_mode="donot_use_mm_for_euclid_dist").min(1)
    return dist <= g.eps[idx], idx


def per_query(fn, queries: torch.Tensor, batch: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds per query over all queries sent in batches of ``batch``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for start in range(0, len(queries), batch):
            fn(queries[start : start + batch])
        best = min(best, time.perf_counter() - t0)
    return best / len(queries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--streams", nargs="+", default=["dataset:counterfact_easyedit", "dataset:zsre"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1000, 2500, 5000, 10000])
    ap.add_argument("--queries", type=int, default=1024, help="queries sampled (seeded) from the edits' prompts")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import faiss  # noqa: F401  (GRACE's index=hnsw)

        graph = True
    except ImportError:
        graph = False

    lm = load_model(args.model)
    layer = default_adaptor_layer(lm.adapter.num_layers)
    print(runtime_header(lm.device))
    t0 = time.perf_counter()
    edits = [e for spec in args.streams for e in load_stream(spec)]
    prompts = list(dict.fromkeys(e.rendered_prompt for e in edits))  # one key per distinct prompt
    labels = {e.rendered_prompt: e.target_new for e in edits}
    n_max = min(max(args.sizes), len(prompts))
    sizes = sorted({min(s, n_max) for s in args.sizes})
    print(
        f"model {args.model}, layer {layer}; {len(edits)} edits from {', '.join(args.streams)}; "
        f"{len(prompts)} distinct prompts, codebooks of {', '.join(map(str, sizes))} prompts"
    )
    keys = last_token_keys(lm, layer, prompts[:n_max])
    # Probe-like queries over the largest codebook's edits: their prompts, paraphrases, neighbors.
    gen = torch.Generator().manual_seed(args.seed)
    stored = set(prompts[:n_max])
    pool = [p for e in edits if e.rendered_prompt in stored for p in (e.rendered_prompt, *e.paraphrases)]
    pool += [n.prompt for e in edits if e.rendered_prompt in stored for n in e.neighborhood]
    pick = torch.randperm(len(pool), generator=gen)[: args.queries].tolist()
    queries = last_token_keys(lm, layer, [pool[i] for i in pick])
    print(f"keys and {len(queries)} queries computed in {time.perf_counter() - t0:.0f} s; width {keys.shape[1]}")

    g = GRACEEditor(GRACEParams())
    rows, added = [], 0
    head = f"{'prompts':>8}{'keys':>7}{'hits':>6}{'full ms/q':>11}{'lookup ms/q':>13}{'same':>6}"
    head += f"{'hnsw ms/q':>11}{'hnsw agrees (95% CI)':>28}" if graph else ""
    print(head)
    for size in sizes:
        for i in range(added, size):
            g.add(keys[i], torch.zeros(1), labels[prompts[i]])
        added = size
        hit, idx = full_scan(g, queries)
        got_hit, got_idx = g.lookup(queries)
        same = bool(torch.equal(hit, got_hit) and torch.equal(idx, got_idx))
        t_full = per_query(lambda q: full_scan(g, q), queries, args.batch)
        t_look = per_query(g.lookup, queries, args.batch)
        line = f"{size:>8}{len(g):>7}{float(hit.float().mean()):>6.2f}{t_full * 1e3:>11.3f}{t_look * 1e3:>13.3f}"
        line += f"{'yes' if same else 'NO':>6}"
        t_hnsw = float("nan")
        if graph:
            h_hit, h_idx = g._graph_lookup(queries)
            agree = int(((h_hit == hit) & (~hit | (h_idx == idx))).sum())
            lo, hi = wilson(agree, len(queries))
            t_hnsw = per_query(g._graph_lookup, queries, args.batch)
            line += f"{t_hnsw * 1e3:>11.3f}{agree / len(queries):>10.4f} [{lo:.4f}, {hi:.4f}] n={len(queries)}"
        print(line, flush=True)
        rows.append((len(g), t_full, t_look, t_hnsw))
    print("growth between successive sizes (time per query ratio, keys ratio):")
    for (k0, *t0s), (k1, *t1s) in zip(rows, rows[1:]):
        ratios = "  ".join(f"{name} x{b / a:.2f}" for name, a, b in zip(("full", "lookup", "hnsw"), t0s, t1s) if a == a)
        print(f"  {k0} -> {k1} keys (x{k1 / k0:.2f}): {ratios}")


if __name__ == "__main__":
    main()
