"""Generation protocols of the edit-quality and retention probes (docs/METRICS.md §6, issue #38).

Teacher forcing shows the model the gold answer's tokens and asks only whether each is the argmax;
"The Mirage of Model Editing" (ACL 2025, WanliYoung/Revisit-Editing-Evaluation) judges an edit by
what the model *says*: a greedy answer under a natural stop, scored as a whole. Here each answer is
generated in a context (``question``, ``qa``, ``chat``) under a stop rule and scored by normalised
exact match (``gen_exact``) and by whether it contains the normalised answer (``gen_contains``);
a neighbourhood prompt also by the authors' WILD locality rule, ``gen_unchanged``: its generated
token ids are those θ0 generated. A protocol is named ``SCORE@SETTING``, the setting being the
context, followed by ``/STOP`` when the stop rule is not the authors' (natural stop, 50 tokens):
``gen_exact@qa``, ``gen_contains@question/tokens20``, ``gen_exact@chat/answer+2``.

Every answer is also kept, with its question, gold answer and token ids, in the run's
``generations`` parts (:class:`probes.base.GeneratedAnswer`), so a run can be re-scored (another
normalisation, a judge) without generating again.
"""

from __future__ import annotations

import re
import string
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from lifelong.core.model_access import AUTHORS_MAX_NEW_TOKENS, CONTEXTS
from lifelong.core.options import OptionError
from probes.base import GeneratedAnswer, ProbeContext, Row
from probes.metric_table import EFFICACY, GEN_CONTAINS, GEN_EXACT, GEN_UNCHANGED, GENERALIZATION, LOCALITY
from streams import Edit

STOPS = ("natural", "tokens", "answer")
# Left out of a probe's identity when generation is off (generation_sample: retention's).
GENERATION_KEYS = ("generation", "stop", "max_new_tokens", "answer_margin", "generation_sample")
_PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> str:
    """The authors' SQuAD normalisation (R evaluate_utils.py:18-35): lowercase, drop punctuation,
    drop the articles a/an/the, collapse whitespace; in that order."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def gen_exact(text: str, answer: str) -> float:
    """1.0 when the generated text equals the answer after normalisation (R evaluate_utils.py:148-151)."""
    return float(normalize(text) == normalize(answer))


def gen_contains(text: str, answer: str) -> float:
    """1.0 when the normalised answer occurs in the normalised text as whole words ("Paris" in "it is
    Paris", not in "Parisian"); an answer that normalises to nothing counts only by exact match."""
    want = normalize(answer)
    if not want:
        return gen_exact(text, answer)
    return float(f" {want} " in f" {normalize(text)} ")


@dataclass(frozen=True)
class Setting:
    """One generation setting: a context and a stop rule. ``name`` is what protocols and the
    generations table carry."""

    context: str
    stop: str = "natural"
    max_new_tokens: int = AUTHORS_MAX_NEW_TOKENS
    answer_margin: int = 0

    @property
    def name(self) -> str:
        if self.stop == "answer":
            return f"{self.context}/answer+{self.answer_margin}"
        if self.stop == "natural" and self.max_new_tokens == AUTHORS_MAX_NEW_TOKENS:
            return self.context
        return f"{self.context}/{self.stop}{self.max_new_tokens}"

    def protocol(self, score: str) -> str:
        return f"{score}@{self.name}"

    def budget(self, ctx: ProbeContext, answer: str) -> int:
        """New tokens allowed: the fixed budget, or (``answer``) the gold answer's tokens plus the margin."""
        return ctx.scorer.answer_length(answer) + self.answer_margin if self.stop == "answer" else self.max_new_tokens


@dataclass
class GenerationOptions:
    """The generation settings a probe takes (``--probe edit_quality:generation=question+qa,stop=natural``)."""

    # Contexts to generate answers in, joined by '+': question (the prompt as is), qa (the authors'
    # QA instruction), chat (the tokenizer's chat template; skipped when it has none). Empty: no
    # generation (the default: runs without it are as before, and as fast).
    generation: str = ""
    # natural: the authors' stop (".", newline, EOS) within max_new_tokens; tokens: max_new_tokens
    # only (EOS still ends it); answer: the gold answer's token count + answer_margin, no stop strings.
    stop: str = "natural"
    # New tokens an answer may take under natural and tokens (≥ 1; the authors: 50).
    max_new_tokens: int = AUTHORS_MAX_NEW_TOKENS
    # Under answer: tokens allowed beyond the gold answer's own count (≥ 0).
    answer_margin: int = 0

    def check_generation(self, owner: str) -> None:
        where = f"probe '{owner}'"
        contexts = self.contexts()
        unknown = [c for c in contexts if c not in CONTEXTS]
        if unknown or (self.generation.strip() and not contexts):
            raise OptionError(
                f"{where}: generation: unknown context '{unknown[0] if unknown else self.generation}': "
                f"expected {', '.join(CONTEXTS)}, several joined by '+'"
            )
        if len(set(contexts)) < len(contexts):
            raise OptionError(f"{where}: generation: a context is given twice in '{self.generation}'")
        if self.stop not in STOPS:
            raise OptionError(f"{where}: stop: unknown stop rule '{self.stop}': expected {', '.join(STOPS)}")
        if self.max_new_tokens < 1:
            raise OptionError(f"{where}: max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.answer_margin < 0:
            raise OptionError(f"{where}: answer_margin must not be negative, got {self.answer_margin}")

    def contexts(self) -> list[str]:
        return [c.strip() for c in self.generation.split("+") if c.strip()]

    def settings(self) -> list[Setting]:
        return [Setting(c, self.stop, self.max_new_tokens, self.answer_margin) for c in self.contexts()]


def identity_options(options: dict) -> dict:
    """A probe's options as its identity records them: the generation keys only when generation is
    on, so runs without it keep the identity (and run id) they had before these options existed."""
    if options.get("generation"):
        return options
    return {k: v for k, v in options.items() if k not in GENERATION_KEYS}


def usable(ctx: ProbeContext, settings: Sequence[Setting]) -> list[Setting]:
    """The settings this model can run: ``chat`` is skipped, with a warning, when the tokenizer has no template."""
    out = []
    for s in settings:
        if s.context == "chat" and not ctx.scorer.has_chat_template:
            warnings.warn("generation context 'chat' skipped: the tokenizer has no chat template", stacklevel=2)
            continue
        out.append(s)
    return out


@dataclass(frozen=True)
class Ask:
    """One question to answer: whose it is and what it is scored against."""

    metric: str
    edit_id: str
    item: int  # the paraphrase's or neighbour's index; 0 for the edit's own prompt
    question: str
    answer: str


def answer(ctx: ProbeContext, probe: str, setting: Setting, asks: Sequence[Ask]) -> list[GeneratedAnswer]:
    """Generate every ask's answer under ``setting`` (each distinct question and budget once), and keep
    them in ``ctx.generations``."""
    keys = [(a.question, setting.budget(ctx, a.answer)) for a in asks]
    unique = list(dict.fromkeys(keys))
    # natural: the authors' stop strings end an answer; tokens and answer: only EOS and the budget
    natural = setting.stop == "natural"
    got = ctx.scorer.generate_answers([q for q, _ in unique], setting.context, [b for _, b in unique], natural)
    by_key = dict(zip(unique, got))
    out = [
        GeneratedAnswer(probe, a.metric, setting.name, a.edit_id, a.item, a.question, a.answer, g.text, g.ids)
        for a, g in ((a, by_key[k]) for a, k in zip(asks, keys))
    ]
    ctx.generations.extend(out)
    return out


def efficacy_generation_rows(
    probe: str, metric: str, ctx: ProbeContext, edits: Sequence[Edit], settings: Sequence[Setting]
) -> list[Row]:
    """``gen_exact`` and ``gen_contains`` of each edit's own prompt against its new target, per setting."""
    rows: list[Row] = []
    for setting in usable(ctx, settings):
        asks = [Ask(metric, e.id, 0, e.rendered_prompt, e.target_new) for e in edits]
        for g in answer(ctx, probe, setting, asks):
            rows.append(Row(probe, metric, setting.protocol(GEN_EXACT), gen_exact(g.text, g.answer), g.edit_id))
            rows.append(Row(probe, metric, setting.protocol(GEN_CONTAINS), gen_contains(g.text, g.answer), g.edit_id))
    return rows


def neighbor_key(prompt: str, answer: str) -> str:
    return f"{prompt}\x1f{answer}"


def neighbor_reference(probe: str, ctx: ProbeContext, settings: Sequence[Setting]) -> dict[str, dict[str, list[int]]]:
    """θ0's generated ids for every neighbourhood prompt of the run, per setting name (computed once,
    at step 0, like the other θ0 references; the answers are kept at step 0 too)."""
    out: dict[str, dict[str, list[int]]] = {}
    edits = ctx.upcoming
    for setting in usable(ctx, settings):
        asks = [Ask(LOCALITY, e.id, i, n.prompt, n.answer) for e in edits for i, n in enumerate(e.neighborhood)]
        out[setting.name] = {neighbor_key(g.question, g.answer): list(g.ids) for g in answer(ctx, probe, setting, asks)}
    return out


def quality_generation_rows(
    probe: str, ctx: ProbeContext, edits: Sequence[Edit], settings: Sequence[Setting], reference: dict
) -> list[Row]:
    """Right after an edit's step, per setting: efficacy and generalisation (``gen_exact``,
    ``gen_contains`` against the new target; paraphrases averaged), and locality (``gen_unchanged``:
    the neighbour's generated ids are θ0's; ``gen_exact``/``gen_contains`` against the neighbour's
    own answer; neighbours averaged). All of a step's questions go through one batched call."""
    rows: list[Row] = []
    for setting in usable(ctx, settings):
        asks = [Ask(EFFICACY, e.id, 0, e.rendered_prompt, e.target_new) for e in edits]
        asks += [Ask(GENERALIZATION, e.id, i, p, e.target_new) for e in edits for i, p in enumerate(e.paraphrases)]
        asks += [Ask(LOCALITY, e.id, i, n.prompt, n.answer) for e in edits for i, n in enumerate(e.neighborhood)]
        got = answer(ctx, probe, setting, asks)
        theta0 = reference.get(setting.name, {})
        grouped: dict[tuple[str, str], list[GeneratedAnswer]] = {}
        for g in got:
            grouped.setdefault((g.edit_id, g.metric), []).append(g)
        for e in edits:
            for metric in (EFFICACY, GENERALIZATION, LOCALITY):
                mine = grouped.get((e.id, metric))
                if not mine:
                    continue
                scores = {
                    GEN_EXACT: [gen_exact(g.text, g.answer) for g in mine],
                    GEN_CONTAINS: [gen_contains(g.text, g.answer) for g in mine],
                }
                if metric == LOCALITY:
                    scores[GEN_UNCHANGED] = [
                        float(list(g.ids) == theta0.get(neighbor_key(g.question, g.answer))) for g in mine
                    ]
                for score, values in scores.items():
                    rows.append(Row(probe, metric, setting.protocol(score), float(np.mean(values)), e.id))
    return rows


def rescore(generations: pl.DataFrame, exact=gen_exact, contains=gen_contains) -> pl.DataFrame:
    """The per-edit generation rows (step, probe, metric, protocol, edit_id, value) recomputed from a
    run's stored answers alone (``RunDir.generations()``), with the given scoring functions: another
    normalisation or a judge re-scores a run without generating again. ``gen_unchanged`` compares
    each neighbour's ids with the ids stored for it at step 0 (θ0). Run-level rows (the retained
    fraction, sample sizes) are not recomputed."""
    theta0 = {
        (probe, setting, neighbor_key(q, a)): ids
        for probe, setting, q, a, ids in generations.filter((pl.col("step") == 0) & (pl.col("metric") == LOCALITY))
        .select("probe", "setting", "question", "answer", "ids")
        .iter_rows()
    }
    scored: dict[tuple, list[float]] = {}
    for step, probe, metric, setting, edit_id, question, answer_, text, ids in generations.select(
        "step", "probe", "metric", "setting", "edit_id", "question", "answer", "text", "ids"
    ).iter_rows():
        if metric == LOCALITY and step == 0:
            continue  # θ0's neighbour answers: the reference, not rows
        values = {GEN_EXACT: exact(text, answer_), GEN_CONTAINS: contains(text, answer_)}
        if metric == LOCALITY:
            values[GEN_UNCHANGED] = float(
                list(ids) == list(theta0.get((probe, setting, neighbor_key(question, answer_)), []))
            )
        for score, value in values.items():
            scored.setdefault((step, probe, metric, f"{score}@{setting}", edit_id), []).append(value)
    return pl.DataFrame(
        [(*key, float(np.mean(v))) for key, v in scored.items()],
        schema={
            "step": pl.Int64,
            "probe": pl.String,
            "metric": pl.String,
            "protocol": pl.String,
            "edit_id": pl.String,
            "value": pl.Float64,
        },
        orient="row",
    )
