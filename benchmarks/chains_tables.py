"""Round-edit and conflict tables (issue 5) on the default model, measured in one run.

RoundEdit: the Pitfalls easy records whose true object the default model answers (teacher-forced
greedy exact match of o on the edit prompt), replayed as a stream (o -> o*, then o* -> o, with
``--gap`` plain fillers between the two) with the ``chains`` probe: Succ, D (JS, nats), the
Pitfalls variant, IR and FR at each chain's completion. ConflictEdit (reverse, composite,
coverage): the first records (or, with --conflict-known, those whose e1 true object the model
answers), replayed the same way: CS explicit and implicit, CM, TFD (composite). Each editor
starts from θ0. P uses the chain probe's default p (``meantok``, as the Pitfalls code).

    python benchmarks/chains_tables.py --editors ft,rome,memit --round 200 --conflict 30
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import torch

from lifelong.core.models import load_model
from lifelong.core.scorer import Scorer
from lifelong.replay import replay
from lifelong.run import RunConfig
from streams import EditStream, layout, read_dataset
from streams.generators import chains_of

ROUND_COLS = [
    ("round_success", "Succ"),
    ("distortion_js", "D"),
    ("distortion_js_pitfalls", "D_pit"),
    ("ignore_rate", "IR"),
    ("failure_rate", "FR"),
]
CONFLICT_COLS = [
    ("conflict_score_explicit", "CS_exp"),
    ("conflict_score_implicit", "CS_imp"),
    ("conflict_magnitude", "CM"),
    ("tied_fact_damage", "TFD"),
]


def known_chains(
    scorer: Scorer | None, dataset: str, first_role: str, limit: int, rule: str = "exact"
) -> tuple[list, int]:
    """The first ``limit`` chains of ``dataset`` whose ``first_role`` edit's true object the model
    answers, and how many records were checked to find them (checked in file order, in chunks);
    with no scorer, simply the first ``limit`` chains."""
    stream, _ = read_dataset(dataset)
    chains = chains_of(stream)
    if scorer is None:
        return chains[:limit], min(limit, len(chains))
    kept, checked = [], 0
    while len(kept) < limit and checked < len(chains):
        chunk = chains[checked : checked + 100]
        firsts = [next(e for e in c if e.chain.role == first_role) for c in chunk]
        if rule == "exact":  # greedy teacher-forced match of the true object
            ok = scorer.score([(e.rendered_prompt, e.target_true) for e in firsts]).exact
        else:  # "prefers": the true object's mean token NLL is below the new object's (ES at θ0)
            nll = scorer.score([(e.rendered_prompt, t) for e in firsts for t in (e.target_true, e.target_new)]).nll
            ok = nll[0::2] < nll[1::2]
        kept += [c for c, keep in zip(chunk, ok) if keep]
        checked += len(chunk)
    return kept[:limit], checked


def fillers(n: int) -> list:
    """Plain CounterFact edits to put between a chain's edits."""
    if n == 0:
        return []
    stream, _ = read_dataset("counterfact")
    return list(stream)[:n]


def run_stream(lm, base, editor: str, chains: list, gap: int, out: Path, name: str) -> tuple[pl.DataFrame, float]:
    """Replay ``chains`` from θ0 with the chain probe; (chain rows, seconds per edit)."""
    n_gaps = sum(len(c) - 1 for c in chains) * gap
    stream = layout(chains, fillers(n_gaps), gap=gap, name=name)
    path = out / f"{name}.jsonl"
    EditStream(stream).to_jsonl(path)
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            p.copy_(base[n])
    cfg = RunConfig(model="smollm2-135m", editor=editor, stream=str(path), probe_every=10**6, probes=["chains"])
    result = replay(cfg, out / f"{name}-{editor}", lm=lm, progress=False)
    seconds = result.run.progress()["seconds"]
    per_edit = float(np.mean([s["edit"] for k, s in seconds.items() if int(k) > 0]))
    rows = result.run.results().filter(pl.col("probe") == "chains")
    return rows, per_edit


def means(rows: pl.DataFrame, cols) -> list[str]:
    out = []
    for metric, _ in cols:
        sel = rows.filter(
            (pl.col("metric") == metric)
            & pl.col("protocol").str.starts_with("completion")
            & ~pl.col("protocol").str.ends_with(";ref=thetam")
        )  # TFD: the θ0 reference only
        if metric == "failure_rate":  # cumulative: the value after the last round chain
            sel = sel.sort("step").tail(1)
        out.append(f"{sel['value'].mean():.3f}" if sel.height else "n/a")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--editors", default="ft,rome,memit")
    ap.add_argument("--round", type=int, default=200, help="RoundEdit chains per editor (answered records)")
    ap.add_argument("--round-slow", type=int, default=30, help="RoundEdit chains for editors other than ft")
    ap.add_argument("--conflict", type=int, default=30, help="chains per ConflictEdit set and editor")
    ap.add_argument("--gap", type=int, default=0, help="plain CounterFact edits between a chain's edits")
    ap.add_argument(
        "--round-filter",
        choices=("exact", "prefers"),
        default="exact",
        help="RoundEdit records kept: the model answers o exactly, or prefers o to o* (ES at θ0)",
    )
    ap.add_argument(
        "--conflict-known",
        action="store_true",
        help="keep only ConflictEdit records whose e1 true object the model answers",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)

    lm = load_model("smollm2-135m")
    scorer = Scorer(lm.model, lm.tokenizer)
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    editors = args.editors.split(",")
    most = max(args.round, args.round_slow)
    rounds, n_round = known_chains(scorer, "pitfalls_round_easy", "round-out", most, args.round_filter)
    conflicts = {}
    for kind in ("reverse", "composite", "coverage"):
        conflicts[kind] = known_chains(
            scorer if args.conflict_known else None, f"pitfalls_{kind}", "conflict-e1", args.conflict
        )
    print(
        f"records kept, in file order: RoundEdit easy {len(rounds)} (of the first {n_round}, "
        f"filter {args.round_filter}); "
        + "; ".join(f"{k} {len(c)} (of the first {n})" for k, (c, n) in conflicts.items())
        + ("" if args.conflict_known else " (conflicts unfiltered)")
        + f"; gap {args.gap}",
        flush=True,
    )

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        print("\nRoundEdit (easy), at chain completion")
        print(f"{'editor':<8}{'n':>5}" + "".join(f"{h:>9}" for _, h in ROUND_COLS) + f"{'s/edit':>9}", flush=True)
        for editor in editors:
            chains = rounds[: args.round if editor == "ft" else args.round_slow]
            rows, sec = run_stream(lm, base, editor, chains, args.gap, out, "round")
            print(
                f"{editor:<8}{len(chains):>5}" + "".join(f"{v:>9}" for v in means(rows, ROUND_COLS)) + f"{sec:>9.2f}",
                flush=True,
            )
        print("\nConflictEdit, at chain completion")
        print(f"{'editor':<8}{'set':<11}{'n':>4}" + "".join(f"{h:>9}" for _, h in CONFLICT_COLS) + f"{'s/edit':>9}")
        for editor in editors:
            for kind, (chains, _) in conflicts.items():
                if not chains:
                    continue
                rows, sec = run_stream(lm, base, editor, chains, args.gap, out, kind)
                print(
                    f"{editor:<8}{kind:<11}{len(chains):>4}"
                    + "".join(f"{v:>9}" for v in means(rows, CONFLICT_COLS))
                    + f"{sec:>9.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
