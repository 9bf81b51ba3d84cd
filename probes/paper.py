"""Probes the paper presets need (lifelong/presets.py; docs/METRICS.md, "Paper presets").

- ``fluency``: ROME's generation fluency, the weighted 2-gram/3-gram entropy of generated text
  (rome experiments/py/eval_utils_counterfact.py ``n_gram_entropy``/``compute_n_gram_entropy``).
- ``final_quality``: every edit of the run scored once on the final model (AlphaEdit's
  experiments/evaluate.py, the toolkits' sequential evaluation): the edit-quality protocols, and with
  ``token_acc=true`` the toolkits' teacher-forced token accuracy (EasyEdit ``test_prediction_acc``,
  UltraEdit ``succ_ratios``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from probes.base import Probe, ProbeContext, Row
from probes.edit_quality import EditQualityOptions, EditQualityProbe
from probes.metric_table import EFFICACY, FINAL_QUALITY, FLUENCY, GENERALIZATION, LOCALITY, NGRAM_ENTROPY
from streams import Edit
from streams.errors import UserError

# ROME's weights of the 2-gram and 3-gram entropies (compute_n_gram_entropy's defaults).
NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)
# ROME's generate_fast(max_out_len=100): prompt and generated tokens together.
ROME_MAX_OUT_LEN = 100
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Word and punctuation tokens (ROME uses nltk.word_tokenize, which needs nltk's punkt data; this
    splits the same way on plain words and punctuation, but keeps contractions such as "don't" whole
    where nltk makes "do" + "n't")."""
    return _WORD.findall(text)


def ngram_entropy(text: str) -> float:
    """ROME's n-gram entropy of one text: for n = 2 and 3 the entropy in bits of the frequency
    distribution of its word n-grams, weighted by 2/3 and 4/3, and the arithmetic mean of the two.
    An order with no n-grams (a text of fewer than n words) contributes 0 (ROME's gives NaN)."""
    tokens = words(text)
    weighted = []
    for n, weight in zip(NGRAM_ORDERS, NGRAM_WEIGHTS):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return float(np.mean(weighted))


def mean_ngram_entropy(texts: Sequence[str]) -> float:
    """The arithmetic mean of :func:`ngram_entropy` over texts (ROME's ``n_gram_entropy``, agg="arith")."""
    return float(np.mean([ngram_entropy(t) for t in texts]))


@dataclass
class FluencyOptions:
    # step: the edits of this step; all: every edit so far (AlphaEdit: on the final model)
    edits: str = "step"
    # Prompt and generated tokens together, at most (ROME: 100).
    max_out_len: int = ROME_MAX_OUT_LEN

    def __post_init__(self):
        if self.edits not in ("step", "all"):
            raise UserError(f"probe 'fluency': edits must be step or all, got {self.edits!r}")
        if self.max_out_len < 2:
            raise UserError(f"probe 'fluency': max_out_len must be at least 2, got {self.max_out_len}")


class FluencyProbe(Probe):
    """ROME's fluency: greedy continuations of each edit's prompt and paraphrases (the stream has no
    CounterFact ``generation_prompts``), the text prompt + continuation, its n-gram entropy averaged
    over the edit's prompts; one row per edit (protocol ``rome``)."""

    name = FLUENCY
    description = "n-gram-entropy fluency of greedy generations from each edit's prompts (ROME)"
    Options = FluencyOptions

    def measure(self, ctx: ProbeContext) -> list[Row]:
        edits = ctx.batch if self.options.edits == "step" else tuple(e for _, e in ctx.edits_so_far())
        return fluency_rows(self.name, ctx, edits, self.options.max_out_len)


def fluency_rows(probe: str, ctx: ProbeContext, edits: Sequence[Edit], max_out_len: int) -> list[Row]:
    prompts = [(e.id, p) for e in edits for p in (e.rendered_prompt, *e.paraphrases)]
    if not prompts:
        return []
    budgets = [max(1, max_out_len - len(ctx.scorer.codec.prompt_ids(p))) for _, p in prompts]
    got = ctx.scorer.generate_answers([p for _, p in prompts], "question", budgets, natural_stop=False)
    by_edit: dict[str, list[str]] = {}
    for (edit_id, prompt), g in zip(prompts, got):
        by_edit.setdefault(edit_id, []).append(prompt + g.text)  # ROME scores the decoded prompt + continuation
    return [Row(probe, NGRAM_ENTROPY, "rome", mean_ngram_entropy(texts), edit_id) for edit_id, texts in by_edit.items()]


@dataclass
class FinalQualityOptions(EditQualityOptions):
    # Also the toolkits' teacher-forced token accuracy (protocol token_acc; locality also token_acc_gold).
    token_acc: bool = False


class FinalQualityProbe(EditQualityProbe):
    """Every edit made so far, scored once (by default at the last step: the final model), with the
    edit-quality protocols; ``token_acc=true`` adds the toolkits' token accuracy: of the new target on
    the prompt (efficacy) and the paraphrases (generalization), and on each neighbourhood prompt the share
    of answer positions whose argmax is θ0's (locality ``token_acc``, EasyEdit) or is the neighbour's own
    answer token (``token_acc_gold``, UltraEdit)."""

    name = FINAL_QUALITY
    description = "every edit scored once on the final model (ES/PS/NS, exact; token_acc with token_acc=true)"
    Options = FinalQualityOptions
    options: FinalQualityOptions  # EditQualityProbe's options, narrowed
    default_schedule = "end"

    def measure(self, ctx: ProbeContext) -> list[Row]:
        edits = tuple(e for _, e in ctx.edits_so_far())
        everything = dataclasses.replace(ctx, batch=edits)
        rows = super().measure(everything)
        if self.options.token_acc:
            rows += token_accuracy_rows(self.name, everything, edits)
        return rows


def token_accuracy_rows(probe: str, ctx: ProbeContext, edits: Sequence[Edit]) -> list[Row]:
    """Teacher-forced token accuracy per edit: efficacy, generalization (mean over paraphrases),
    locality against θ0's argmax (``token_acc``) and against the neighbour's answer (``token_acc_gold``)."""
    own = [(e.rendered_prompt, e.target_new) for e in edits]
    para = [(p, e.target_new) for e in edits for p in e.paraphrases]
    neigh = [(n.prompt, n.answer) for e in edits for n in e.neighborhood]
    pairs = list(dict.fromkeys(own + para + neigh))
    scores = ctx.scorer.score(pairs)
    acc = dict(zip(pairs, scores.token_acc))
    argmax = dict(zip(pairs, scores.argmax))
    theta0 = ctx.reference.get("neighbor_argmax", {})
    rows = []
    for e in edits:
        rows.append(Row(probe, EFFICACY, "token_acc", float(acc[(e.rendered_prompt, e.target_new)]), e.id))
        if e.paraphrases:
            values = [acc[(p, e.target_new)] for p in e.paraphrases]
            rows.append(Row(probe, GENERALIZATION, "token_acc", float(np.mean(values)), e.id))
        if e.neighborhood:
            same = []
            for n in e.neighborhood:
                now, before = argmax[(n.prompt, n.answer)], theta0.get(f"{n.prompt}\x1f{n.answer}")
                if before is None:
                    raise RuntimeError(f"probe '{probe}': no θ0 reference for neighbour {n.prompt!r} of {e.id!r}")
                same.append(float(np.mean(np.equal(now, before))))
            rows.append(Row(probe, LOCALITY, "token_acc", float(np.mean(same)), e.id))
            gold = [acc[(n.prompt, n.answer)] for n in e.neighborhood]
            rows.append(Row(probe, LOCALITY, "token_acc_gold", float(np.mean(gold)), e.id))
    return rows
