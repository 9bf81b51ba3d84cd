"""Every metric the built-in probes emit: its name, valid range and meaning, in one table.

The probes write their rows under these names, the summary and plots read them, and the
testing kit (``lifelong.testing``'s ``metric_bounds``) checks every score against its range,
so a renamed metric cannot leave a bound that never fires. Keyed by (probe, metric): the
same metric name (``ratio``) means different things in different probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INF = math.inf
LN2 = math.log(2.0)

# Probe names, as each probe class's ``name``.
EDIT_QUALITY, RETENTION_PROBE, CHAINS, PERPLEXITY_PROBE, WEIGHT_DRIFT, DOWNSTREAM = (
    "edit_quality",
    "retention",
    "chains",
    "perplexity",
    "weight_drift",
    "downstream",
)
FINAL_QUALITY, FLUENCY = "final_quality", "fluency"  # the paper presets' probes (probes/paper.py)

# edit_quality and retention (docs/METRICS.md §2, §3)
EFFICACY, GENERALIZATION, LOCALITY = "efficacy", "generalization", "locality"
RETENTION, SUPERSEDED, RETAINED_FRACTION = "retention", "superseded", "retained_fraction"
SAMPLE_SIZE, SAMPLE_POPULATION = "sample_size", "sample_population"
# Generation protocols of those metrics (docs/METRICS.md §6), each written SCORE@SETTING (probes.generation).
GEN_EXACT, GEN_CONTAINS, GEN_UNCHANGED = "gen_exact", "gen_contains", "gen_unchanged"
GEN_JUDGE = "gen_judge"  # written after the run, by `lifelong judge` (probes.judge)
# chains (§4)
ROUND_SUCCESS, DISTORTION_JS, DISTORTION_JS_PITFALLS = "round_success", "distortion_js", "distortion_js_pitfalls"
IGNORE_RATE, FAILURE_RATE = "ignore_rate", "failure_rate"
CONFLICT_SCORE_EXPLICIT, CONFLICT_SCORE_IMPLICIT = "conflict_score_explicit", "conflict_score_implicit"
CONFLICT_MAGNITUDE, TIED_FACT_DAMAGE = "conflict_magnitude", "tied_fact_damage"
# perplexity, weight_drift, downstream (§5)
PERPLEXITY, RATIO, OVER_THRESHOLD = "perplexity", "ratio", "over_threshold"
RATIO_LOW, RATIO_HIGH = "ratio_low", "ratio_high"
CHUNK_NLL, CHUNK_TOKENS = "chunk_nll", "chunk_tokens"
FROBENIUS, RELATIVE, TOUCHED = "frobenius", "relative", "touched"
NORM_RATIO, DRIFT_WARNING = "norm_ratio", "drift_warning"
SCORE, DIFF, GOLD_LOGPROB, GOLD_LOGPROB_DIFF, VALID = "score", "diff", "gold_logprob", "gold_logprob_diff", "valid"
ROUGE1, ROUGE2, ROUGE_L = "rouge1", "rouge2", "rougeL"
NGRAM_ENTROPY = "ngram_entropy"


@dataclass(frozen=True)
class Metric:
    """One metric of one probe: the closed range [low, high] its values lie in, and what it is.

    ``nan``: the metric may be NaN where it is undefined (a ratio to a θ0 value of 0, a rate over
    no items); a NaN value of any other metric is out of range.
    """

    probe: str
    name: str
    low: float
    high: float
    description: str
    nan: bool = False

    def admits(self, value: float | None, tol: float = 1e-12) -> bool:
        if value is None:
            return False
        if math.isnan(value):
            return self.nan
        return self.low - tol <= value <= self.high + tol

    @property
    def range(self) -> str:
        show = {LN2: "ln 2", 50 * LN2: "50 ln 2", INF: "inf", -INF: "-inf"}
        return f"[{show.get(self.low, f'{self.low:g}')}, {show.get(self.high, f'{self.high:g}')}]"


def _table(*metrics: Metric) -> dict[tuple[str, str], Metric]:
    return {(m.probe, m.name): m for m in metrics}


METRICS: dict[tuple[str, str], Metric] = _table(
    Metric(
        EDIT_QUALITY,
        EFFICACY,
        0,
        1,
        "new target beats the old one (es) / is the greedy answer (exact) / is what the model generates "
        "(gen_exact@…) or is in it (gen_contains@…), 0 or 1",
    ),
    Metric(EDIT_QUALITY, GENERALIZATION, 0, 1, "share of paraphrases where the edit holds (ps, exact, gen_*@…)"),
    Metric(
        EDIT_QUALITY,
        LOCALITY,
        0,
        1,
        "share of neighborhood prompts left as they were (ns, unchanged; gen_unchanged@…: the generated "
        "ids are θ0's) or still answered right (gen_exact@…, gen_contains@…)",
    ),
    Metric(
        RETENTION_PROBE, RETENTION, 0, 1, "an earlier edit's efficacy after a later step (es, exact, gen_*@…), 0 or 1"
    ),
    Metric(FINAL_QUALITY, EFFICACY, 0, 1, "on the final model: es, exact (0 or 1), token_acc (share of tokens)"),
    Metric(FINAL_QUALITY, GENERALIZATION, 0, 1, "on the final model: share of paraphrases (ps, exact) / tokens"),
    Metric(
        FINAL_QUALITY,
        LOCALITY,
        0,
        1,
        "on the final model: share of neighbours left as they were (ns, unchanged), of answer tokens equal to "
        "θ0's argmax (token_acc) or to the neighbour's answer (token_acc_gold)",
    ),
    # ROME's weights 2/3 and 4/3 average to at most (2/3 + 4/3)/2 · log2(#n-grams): no finite bound.
    Metric(FLUENCY, NGRAM_ENTROPY, 0, INF, "ROME's weighted 2-/3-gram entropy of generated text, bits"),
    Metric(RETENTION_PROBE, SUPERSEDED, 0, 1, "efficacy of an edit a later edit of its subject and relation replaced"),
    Metric(RETENTION_PROBE, RETAINED_FRACTION, 0, 1, "mean retention over the edits made so far, per protocol"),
    Metric(RETENTION_PROBE, SAMPLE_SIZE, 1, math.inf, "edits scored when the retained fraction is a sample's"),
    Metric(RETENTION_PROBE, SAMPLE_POPULATION, 1, math.inf, "edits that sample is drawn from"),
    Metric(CHAINS, ROUND_SUCCESS, 0, 1, "round edit: ½·(o* took at a) + ½·(o is back at b); 0, ½ or 1"),
    Metric(CHAINS, DISTORTION_JS, 0, LN2, "D: Jensen-Shannon divergence of Obj's distribution from θ0's, nats"),
    # JS / |Obj| × 100, and the probe measures only |Obj| >= 2.
    Metric(CHAINS, DISTORTION_JS_PITFALLS, 0, 50 * LN2, "the Pitfalls code's variant of D: JS / |Obj| × 100"),
    Metric(CHAINS, IGNORE_RATE, 0, 1, "IR: share of the other true objects whose P dropped below θ0's"),
    Metric(CHAINS, FAILURE_RATE, 0, 1, "FR: share of completed round chains with IR above the threshold", nan=True),
    Metric(CHAINS, CONFLICT_SCORE_EXPLICIT, 0, 1, "CS: the later edit's object beats e1's, 0 or 1"),
    Metric(CHAINS, CONFLICT_SCORE_IMPLICIT, 0, 1, "CS: the implied fact beats e1's object, 0 or 1"),
    Metric(CHAINS, CONFLICT_MAGNITUDE, -1, 1, "CM: relative drop of P(o1*) from θm to θb, clipped at −1"),
    Metric(CHAINS, TIED_FACT_DAMAGE, -INF, 1, "TFD: relative drop of the tied fact's P from the reference model"),
    # exp of a mean token NLL, which is >= 0
    Metric(PERPLEXITY_PROBE, PERPLEXITY, 1, INF, "reference-corpus perplexity (corpus, sentence_mean)"),
    Metric(PERPLEXITY_PROBE, RATIO, 0, INF, "perplexity / perplexity at θ0"),
    Metric(PERPLEXITY_PROBE, RATIO_LOW, 0, INF, "corpus: the ratio's 95% interval over the corpus's chunks, low end"),
    Metric(PERPLEXITY_PROBE, RATIO_HIGH, 0, INF, "corpus: the ratio's 95% interval over the corpus's chunks, high end"),
    Metric(PERPLEXITY_PROBE, CHUNK_NLL, 0, INF, "corpus: one chunk's summed token NLL (edit_id chunk:I), nats"),
    Metric(
        PERPLEXITY_PROBE, CHUNK_TOKENS, 1, INF, "corpus: one chunk's scored tokens (edit_id chunk:I; θ0's rows only)"
    ),
    Metric(PERPLEXITY_PROBE, OVER_THRESHOLD, 0, 1, "ratio at or above the collapse threshold, 0 or 1"),
    Metric(WEIGHT_DRIFT, FROBENIUS, 0, INF, "‖W_t − W_0‖_F per scope parameter and in total"),
    Metric(
        WEIGHT_DRIFT,
        RELATIVE,
        0,
        INF,
        "‖W_t − W_0‖_F / ‖W_0‖_F per scope parameter, the largest (max) and their sum (sum)",
        nan=True,
    ),
    Metric(WEIGHT_DRIFT, NORM_RATIO, 0, INF, "‖W_t‖_F / ‖W_0‖_F per scope parameter, and the largest (max)", nan=True),
    Metric(WEIGHT_DRIFT, DRIFT_WARNING, 0, 1, "collapse warning: the relative updates' sum ≥ warn_relative, 0 or 1"),
    Metric(WEIGHT_DRIFT, TOUCHED, 0, INF, "entries that differ from θ0 (a count)"),
    Metric(DOWNSTREAM, SCORE, 0, 1, "task score: accuracy, exact match, ROUGE-L or entity F1"),
    Metric(DOWNSTREAM, DIFF, -1, 1, "score − score at θ0", nan=True),
    Metric(DOWNSTREAM, RATIO, 0, INF, "score / score at θ0 (NaN when θ0 scored 0)", nan=True),
    Metric(DOWNSTREAM, GOLD_LOGPROB, -INF, 0, "mean token log-probability of the right choice"),
    Metric(DOWNSTREAM, GOLD_LOGPROB_DIFF, -INF, INF, "gold_logprob − gold_logprob at θ0", nan=True),
    Metric(DOWNSTREAM, VALID, 0, 1, "seed protocol: share of generated answers that name an option"),
    Metric(DOWNSTREAM, ROUGE1, 0, 1, "ROUGE-1 F1 of generated summaries"),
    Metric(DOWNSTREAM, ROUGE2, 0, 1, "ROUGE-2 F1 of generated summaries"),
    Metric(DOWNSTREAM, ROUGE_L, 0, 1, "ROUGE-L F1 of generated summaries"),
)
"""(probe, metric) -> :class:`Metric`, for every metric the built-in probes emit."""


GENERATION_PROTOCOLS: dict[str, str] = {
    GEN_EXACT: "normalised generated answer equals the gold answer (the authors' exact match), 0 or 1 per prompt",
    GEN_CONTAINS: "the normalised gold answer occurs, as whole words, in the normalised generated answer",
    GEN_UNCHANGED: "locality only: the generated token ids equal θ0's (the authors' WILD locality rule)",
    GEN_JUDGE: "an LLM judge (`lifelong judge`, the authors' prompt) calls the generated answer correct",
}
"""Score -> meaning, for the generation protocols ``SCORE@SETTING`` of efficacy, generalization, locality,
retention, superseded and retained_fraction (all in [0, 1]; averaged over paraphrases or neighbours)."""


def out_of_range(rows) -> list[str]:
    """One line per row whose value its table entry does not admit; rows of metrics not in the table pass.

    ``rows``: (probe, metric, protocol, edit_id, step, value) tuples.
    """
    bad = []
    for probe, metric, protocol, edit_id, step, value in rows:
        entry = METRICS.get((probe, metric))
        if entry is not None and not entry.admits(value):
            bad.append(f"{probe}/{metric}/{protocol} edit {edit_id} step {step} = {value} not in {entry.range}")
    return bad


__all__ = ["GENERATION_PROTOCOLS", "METRICS", "Metric", "out_of_range"]
