"""Check a fact set against a model and print a pass/fail report (exit 1 if anything fails).

    python tools/curate_facts.py [FACTS.json] [--model smollm2-135m]

The criterion is probes.fact_check's: every fact's true object is the model's greedy
teacher-forced answer and beats every other candidate of its relation; every
neighborhood prompt is answered exactly. Paraphrases are reported for information.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from lifelong.core.models import load_model
from lifelong.core.scorer import Scorer
from probes.fact_check import check_fact_set
from streams import load_fact_set


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("facts", nargs="?", default=None, help="fact-set JSON (default: the built-in one)")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    facts = load_fact_set(args.facts)
    lm = load_model(args.model)
    report = check_fact_set(Scorer(lm.model, lm.tokenizer), facts)
    per_relation = Counter(f.relation.id for f in facts.facts)
    print(
        f"{len(facts.facts)} facts over {len(per_relation)} relations: "
        + ", ".join(f"{r} {n}" for r, n in per_relation.items())
    )
    print(f"paraphrases answered exactly: {report.paraphrases_known}/{report.paraphrases_total}")
    weakest = sorted(report.margins.items(), key=lambda kv: kv[1])[:5]
    print("smallest margins (NLL of best other candidate minus true): " + ", ".join(f"{k} {v:.2f}" for k, v in weakest))
    for fact_id in report.failed_facts:
        print(f"FAIL fact {fact_id}")
    for prompt, answer in report.failed_neighbors:
        print(f"FAIL neighbor {prompt!r} -> {answer!r}")
    ok = not report.failed_facts and not report.failed_neighbors
    print("all facts and neighborhood prompts pass" if ok else "some prompts fail")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
