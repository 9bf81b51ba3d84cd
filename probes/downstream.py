"""Downstream drift (docs/METRICS.md §5): task scores after each step against θ0, as difference and ratio.

Rows (protocol = task name, plus ``mean`` over the tasks): ``score`` (accuracy, exact match,
ROUGE-L or entity F1), ``diff`` = score(θt) − score(θ0), ``ratio`` = score(θt) / score(θ0)
(NaN when θ0 scored 0); likelihood tasks add ``gold_logprob`` (mean token log-probability of the
right choice: moves before accuracy does) and its ``gold_logprob_diff``; ROUGE tasks add
``rouge1``/``rouge2``/``rougeL``.

Two named protocols (option ``protocol``):

* ``likelihood`` (default; rows' protocol = the task name, as before): choices by answer
  log-likelihood, open QA by exact match, summaries by ROUGE-L F1 (stemmed);
* ``seed`` (rows' protocol = ``<task>;seed``, ``mean;seed``): the seed study's (Gu et al., "Model
  Editing Harms General Abilities …", code JasonForJoy/Model-Editing-Hurt) — every task answered by
  greedy generation; a choice answer that gives no valid option is wrong (``score`` over all items,
  so it can reach 0; extra row ``valid``); open QA hits when a run of words of the normalised answer
  equals a normalised reference; summaries score the mean of ROUGE-1/2/L F1 (0 when empty).

Both paths ask the model through the run's scorer (``score`` and ``generate``), so an in-context
editor's prompt rewriter sees every task prompt, scored or generated from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probes.base import Probe, ProbeContext, Row
from probes.metric_table import DIFF, DOWNSTREAM, GOLD_LOGPROB, GOLD_LOGPROB_DIFF, RATIO, SCORE
from probes.tasks import (
    ALL_TASKS,
    BUILTIN_TASKS,
    Choice,
    choice_predictions,
    load_task,
    score_choice_generations,
    score_generations,
)
from streams.errors import UserError

# Generation length per metric: short answers, a worked solution, a one-sentence summary, an entity list.
MAX_NEW_TOKENS = {"em": 16, "number": 96, "rouge": 48, "entity_f1": 48, "choice": 4}
PROTOCOLS = ("likelihood", "seed")


def split_list(value: str) -> list[str]:
    """'a+b;c' -> ['a', 'b', 'c']: ',' already separates probe options, so lists use '+' or ';'."""
    return [v.strip() for v in value.replace(";", "+").split("+") if v.strip()]


class DownstreamProbe(Probe["DownstreamProbe.Options"]):
    """Task scores and their drift from θ0 on a built-in suite or the shared-data task readers."""

    name = DOWNSTREAM
    description = (
        "downstream task scores (likelihood choice accuracy, EM, GSM8K number, ROUGE, entity F1) "
        "and drift vs θ0 (diff, ratio); tasks=a+b+c, items=N"
    )
    default_schedule = "every:10"

    @dataclass
    class Options:
        tasks: str = "+".join(BUILTIN_TASKS)  # task names joined by '+' or ';' (see probes/tasks.py; at least one)
        items: int = 40  # first N items of each task (0: all)
        choice_score: str = "mean"  # how a choice is picked: mean or sum of its token log-probabilities
        max_new_tokens: int = 0  # new tokens a generated answer may take (≥ 0; 0: the metric's default for each task)
        protocol: str = "likelihood"  # likelihood (default) or seed (generation with validity; see the module doc)

    def __init__(self, schedule=None, options=None):
        super().__init__(schedule, options)
        o = self.options
        self.task_names = split_list(o.tasks)
        unknown = [t for t in self.task_names if t not in ALL_TASKS]
        if unknown or not self.task_names:
            raise UserError(
                f"unknown downstream task '{unknown[0] if unknown else o.tasks}': expected names "
                f"joined by '+' from {', '.join(ALL_TASKS)}"
            )
        if o.choice_score not in ("mean", "sum"):
            raise UserError(f"choice_score must be mean or sum (got '{o.choice_score}')")
        if o.protocol not in PROTOCOLS:
            raise UserError(f"protocol must be likelihood or seed (got '{o.protocol}')")
        if o.items < 0:
            raise UserError(f"items must be 0 (all) or more (got {o.items})")
        if o.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be 0 (each metric's default) or more (got {o.max_new_tokens})")
        # Read now: a missing file fails before the run starts.
        self.tasks = {}
        for name in self.task_names:
            items = load_task(name)
            self.tasks[name] = items[: o.items] if o.items else items

    def scores(self, ctx: ProbeContext) -> dict[str, dict[str, float]]:
        """Per task: score and extras. Every likelihood task goes through one scorer call."""
        out: dict[str, dict[str, float]] = {}
        choice_tasks = [n for n, items in self.tasks.items() if items and isinstance(items[0], Choice)]
        seed = self.options.protocol == "seed"
        if choice_tasks and seed:
            for n in choice_tasks:
                items = self.tasks[n]
                limit = self.options.max_new_tokens or MAX_NEW_TOKENS["choice"]
                predictions = ctx.scorer.generate([it.prompt for it in items], limit)
                out[n] = score_choice_generations(items, predictions)
        elif choice_tasks:
            all_items = [it for n in choice_tasks for it in self.tasks[n]]
            predicted, gold_lp = choice_predictions(ctx.scorer, all_items, self.options.choice_score)
            start = 0
            for n in choice_tasks:
                items = self.tasks[n]
                sl = slice(start, start + len(items))
                start += len(items)
                right = predicted[sl] == np.array([it.answer for it in items])
                out[n] = {"score": float(right.mean()), "gold_logprob": float(gold_lp[sl].mean())}
        for n, items in self.tasks.items():
            if n in out or not items:
                continue
            limit = self.options.max_new_tokens or MAX_NEW_TOKENS[items[0].metric]
            predictions = ctx.scorer.generate([it.prompt for it in items], limit)
            out[n] = score_generations(items, predictions, self.options.protocol)
        return out

    def _rows(self, scores: dict[str, dict[str, float]], base: dict[str, dict[str, float]]) -> list[Row]:
        rows = []
        tag = "" if self.options.protocol == "likelihood" else f";{self.options.protocol}"
        for task, values in [*scores.items(), ("mean", _mean(scores))]:
            ref = base.get(task, {})
            s, s0 = values["score"], ref.get("score", float("nan"))
            protocol = task + tag
            rows += [
                Row(self.name, SCORE, protocol, s),
                Row(self.name, DIFF, protocol, s - s0),
                Row(self.name, RATIO, protocol, s / s0 if s0 else float("nan")),
            ]
            for key, value in values.items():
                if key == SCORE:
                    continue
                rows.append(Row(self.name, key, protocol, value))
                if key == GOLD_LOGPROB:
                    rows.append(Row(self.name, GOLD_LOGPROB_DIFF, protocol, value - ref.get(key, float("nan"))))
        return rows

    def prepare(self, ctx: ProbeContext):
        scores = self.scores(ctx)
        reference: dict[str, dict[str, float]] = {
            **scores,
            "mean": _mean(scores),
            "items": {n: len(v) for n, v in self.tasks.items()},
        }
        return reference, self._rows(scores, reference)

    def measure(self, ctx: ProbeContext) -> list[Row]:
        return self._rows(self.scores(ctx), ctx.reference)


def _mean(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    return {"score": float(np.mean([v["score"] for v in scores.values()]))} if scores else {"score": float("nan")}
