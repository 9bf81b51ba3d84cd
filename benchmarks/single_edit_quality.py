"""Single-edit quality per editor on the default model, each edit applied to a fresh base.

Efficacy (ES), paraphrase generalization (PS) and neighborhood locality (NS) as in
docs/METRICS.md §2, on the built-in facts and on the CounterFact records (../shared/data)
that the default model answers correctly (teacher-forced greedy exact match of the true
object on the edit prompt: the ROME sample's records first, then the EasyEdit split's, for
``--counterfact`` in all; a line per source and one pooled), with seconds per edit.

    python benchmarks/single_edit_quality.py --editors rome,r-rome,ft --builtin 20 --counterfact 20

ES carries its 95% Wilson interval; for ROME, r-ROME, MEMIT and AlphaEdit, "stop" is the share of
v*/z* fits that met the stop loss (the rest ran to the step cap), which shows whether a compute
precision (``--set v_dtype=float32`` against ``bfloat16``) changes how the fits end.

Adaptor editors (GRACE, WISE, the in-context memory) get a fresh editor per edit and
are scored through their prompt rewriter; their probe-time overhead is printed as the
ratio of scoring time with the edit in place to scoring the same pairs on the base model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from lifelong.core.machine import runtime_header
from lifelong.core.models import load_model
from lifelong.core.scorer import Scorer
from lifelong.core.stats import wilson
from lifelong.editors import make_editor
from streams import load_stream

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def known_counterfact(scorer: Scorer, limit: int) -> dict[str, list]:
    """Up to ``limit`` CounterFact records that the model answers correctly: those of the ROME
    sample first, then the EasyEdit split's (scanned 500 at a time), skipping any (subject,
    prompt) already taken. Keyed by the source's label in the printed table."""
    from streams.readers import read_counterfact_easyedit, read_counterfact_rome

    found: dict[str, list] = {}
    seen: set[tuple[str, str]] = set()
    total = 0
    for label, name, reader in (
        ("cf-rome", "counterfact_rome_500", read_counterfact_rome),
        ("cf-easyedit", "counterfact_easyedit_edit", read_counterfact_easyedit),
    ):
        path = DATA / "counterfact" / f"{name}.json"
        if not path.is_file() or total >= limit:
            continue
        stream, _ = reader(path)
        edits = [e for e in stream if (e.subject, e.prompt) not in seen]
        for start in range(0, len(edits), 500):
            if total >= limit:
                break
            chunk = edits[start : start + 500]
            scores = scorer.score([(e.rendered_prompt, e.target_true) for e in chunk])
            known = [e for e, ok in zip(chunk, scores.exact) if ok][: limit - total]
            found.setdefault(label, []).extend(known)
            seen.update((e.subject, e.prompt) for e in known)
            total += len(known)
    return found


def quality(scorer: Scorer, edit) -> tuple[float, float, float]:
    pairs = [(edit.rendered_prompt, edit.target_new), (edit.rendered_prompt, edit.target_true)]
    pairs += [(p, edit.target_new) for p in edit.paraphrases] + [(p, edit.target_true) for p in edit.paraphrases]
    pairs += [(n.prompt, n.answer) for n in edit.neighborhood] + [
        (n.prompt, edit.target_new) for n in edit.neighborhood
    ]
    nll = scorer.score(pairs).nll
    k, m = len(edit.paraphrases), len(edit.neighborhood)
    es = float(nll[0] < nll[1])
    ps = float(np.mean(nll[2 : 2 + k] < nll[2 + k : 2 + 2 * k])) if k else float("nan")
    ns = float(np.mean(nll[2 + 2 * k : 2 + 2 * k + m] < nll[2 + 2 * k + m :])) if m else float("nan")
    return es, ps, ns


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--editors", default="rome,r-rome")
    ap.add_argument("--builtin", type=int, default=20)
    ap.add_argument("--counterfact", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], help="key=value for every editor")
    args = ap.parse_args()
    torch.set_num_threads(1)
    overrides = dict(kv.split("=", 1) for kv in args.set)

    lm = load_model("smollm2-135m")
    print(runtime_header(lm.device))
    scorer = Scorer(lm.model, lm.tokenizer)
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    counterfact = known_counterfact(scorer, args.counterfact)
    sets = {"builtin": list(load_stream("builtin"))[: args.builtin], **counterfact}
    print(
        f"{'editor':<11}{'set':<13}{'n':>4}{'ES':>7}{'ES 95% CI':>16}{'PS':>7}{'NS':>7}{'stop':>6}"
        f"{'s/edit':>8}{'probe x':>9}"
    )
    for name in args.editors.split(","):
        editor = make_editor(name, overrides).bind(lm)
        pooled, pooled_stops = [], []  # CounterFact rows of every source, for one line over all of them
        for set_name, edits in sets.items():
            if not edits:
                continue
            rows, times, overhead, stops = [], [], [], []
            for edit in edits:
                with torch.no_grad():
                    for n, p in lm.model.named_parameters():
                        p.copy_(base[n])
                if editor.adaptor:  # a fresh codebook / side memory / memory per edit
                    editor.release()
                    editor = make_editor(name, overrides).bind(lm)
                t0 = time.perf_counter()
                editor.apply(lm, [edit])
                times.append(time.perf_counter() - t0)
                report = editor.step_report()
                if report.get("v_fits"):
                    stops.append(report["v_stopped"] / report["v_fits"])
                edited = Scorer(lm.model, lm.tokenizer, rewrite=editor.prompt_rewriter(lm))
                rows.append(quality(edited, edit))
                if editor.adaptor:
                    overhead.append(probe_overhead(lm, editor, edited, edit))
            ratio = f"{np.mean(overhead):>9.2f}" if overhead else f"{'':>9}"
            print(row_line(name, set_name, rows, stops, f"{np.mean(times):>8.2f}{ratio}"), flush=True)
            if set_name.startswith("cf-"):
                pooled += rows
                pooled_stops += stops
        if len(counterfact) > 1:
            print(row_line(name, "cf-all", pooled, pooled_stops, ""), flush=True)
        editor.release()


def row_line(editor: str, set_name: str, rows: list, stops: list, extra: str) -> str:
    """One table line: mean ES (with its Wilson interval) / PS / NS over ``rows`` (NaN-skipping: a
    record may lack paraphrases), and the share of v* fits that met the stop loss ('-': no fits)."""
    es, ps, ns = np.nanmean(np.array(rows), axis=0)
    low, high = wilson(float(np.nansum(np.array(rows)[:, 0])), len(rows))
    stop = f"{np.mean(stops):>6.2f}" if stops else f"{'-':>6}"
    interval = f"[{low:.2f}, {high:.2f}]"
    return f"{editor:<11}{set_name:<13}{len(rows):>4}{es:>7.2f}{interval:>16}{ps:>7.2f}{ns:>7.2f}{stop}{extra}"


def probe_overhead(lm, editor, edited: Scorer, edit, repeats: int = 3) -> float:
    """Scoring time of the edit's probe pairs with the adaptor/memory over the base model's, best of ``repeats``."""
    pairs = [(edit.rendered_prompt, edit.target_new)] + [(p, edit.target_new) for p in edit.paraphrases]
    pairs += [(n.prompt, n.answer) for n in edit.neighborhood]
    times = {}
    for label, scorer in (("edited", edited), ("base", None)):
        best = float("inf")
        for _ in range(repeats):
            if scorer is None:  # the plain forward: hooks detached, no rewriting
                editor.release()
                scorer = Scorer(lm.model, lm.tokenizer)
            fresh = Scorer(scorer.model, scorer.tokenizer, rewrite=scorer.rewrite)  # no tokenization cache
            t0 = time.perf_counter()
            fresh.score(pairs)
            best = min(best, time.perf_counter() - t0)
        times[label] = best
    editor.bind(lm)
    return times["edited"] / times["base"]


if __name__ == "__main__":
    main()
