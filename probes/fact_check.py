"""Does a model know a fact set? The curation criterion of the built-in facts.

A fact is known when, on its relation's main prompt, (a) the true object is the
teacher-forced greedy answer (exact match) and (b) it has the lowest mean token NLL
among the relation's candidates. A neighborhood prompt is known when (a) holds.
Paraphrases are reported, not required.
"""

from __future__ import annotations

from dataclasses import dataclass

from lifelong.core.scorer import Scorer
from streams import FactSet


@dataclass
class FactCheck:
    failed_facts: list[str]  # fact ids failing (a) or (b)
    failed_neighbors: list[tuple[str, str]]  # (prompt, answer) failing (a)
    paraphrases_known: int
    paraphrases_total: int
    margins: dict[str, float]  # per fact: best other candidate's NLL minus the true object's


def check_fact_set(scorer: Scorer, facts: FactSet) -> FactCheck:
    pairs = []
    for fact in facts.facts:
        prompt = fact.relation.template.replace("{}", fact.subject)
        pairs += [(prompt, cand) for cand in fact.relation.candidates]
    neighbors = sorted({(n.prompt, n.answer) for f in facts.facts for n in f.neighborhood})
    paraphrases = [(p.replace("{}", f.subject), f.target_true) for f in facts.facts for p in f.relation.paraphrases]
    scores = scorer.score(pairs + neighbors + paraphrases)
    table = {pair: (nll, exact) for pair, nll, exact in zip(pairs + neighbors + paraphrases, scores.nll, scores.exact)}

    failed, margins = [], {}
    for fact in facts.facts:
        prompt = fact.relation.template.replace("{}", fact.subject)
        nll_true, exact_true = table[(prompt, fact.target_true)]
        best_other = min(table[(prompt, c)][0] for c in fact.relation.candidates if c != fact.target_true)
        margins[fact.id] = float(best_other - nll_true)
        if not exact_true or margins[fact.id] <= 0:
            failed.append(fact.id)
    return FactCheck(
        failed_facts=failed,
        failed_neighbors=[pair for pair in neighbors if not table[pair][1]],
        paraphrases_known=sum(bool(table[pair][1]) for pair in paraphrases),
        paraphrases_total=len(paraphrases),
        margins=margins,
    )
