"""Perplexity on a fixed reference corpus, its ratio to θ0 and the collapse step (docs/METRICS.md §5).

Two named variants (protocols):
- ``corpus``: exp of the mean token NLL over the corpus cut into fixed chunks of
  ``chunk_tokens`` tokens (each chunk read from a BOS token), the same chunks every step. Its
  ratio to θ0 carries a 95% interval over the chunks (``ratio_low``, ``ratio_high``: a t interval
  of the mean token-NLL change, chunks as clusters): how much the figure depends on which text
  was read, for the edits this run made (it says nothing about other seeds' edits). Each chunk's
  summed NLL is a row (``chunk_nll``, edit_id ``chunk:I``; its token count ``chunk_tokens`` at θ0),
  so two runs over the same corpus can be compared chunk by chunk (a paired interval);
- ``sentence_mean``: the mean over sentences of each sentence's own perplexity, every
  sentence read alone from a BOS token (the per-sentence variant of Yang et al. 2024).

The model is read through the run's scorer (``Scorer.rolling_nll``); an in-context editor's
prompt rewriter does not apply to a corpus (the reason is in that method's docstring).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import cast

import numpy as np
import polars as pl

from lifelong.core.scorer import Scorer
from lifelong.core.stats import ratio_interval
from probes.base import Probe, ProbeContext, Row
from probes.metric_table import (
    CHUNK_NLL,
    CHUNK_TOKENS,
    OVER_THRESHOLD,
    PERPLEXITY,
    PERPLEXITY_PROBE,
    RATIO,
    RATIO_HIGH,
    RATIO_LOW,
)
from streams.errors import MissingFileError, UserError

BUILTIN_CORPUS = Path(__file__).resolve().parent / "data" / "reference_corpus.txt"
WIKITEXT = "wikitext/wikitext-2-raw_test.txt"
PROTOCOLS = ("corpus", "sentence_mean")


def corpus_path(spec: str) -> Path:
    """``builtin``, ``wikitext`` (WikiText-2 test split in the shared data) or a text file."""
    if spec == "builtin":
        return BUILTIN_CORPUS
    if spec == "wikitext":
        from streams.readers import default_data_dir

        path = default_data_dir() / WIKITEXT
        if not path.is_file():
            raise MissingFileError(
                f"perplexity corpus 'wikitext': {path} not found (set $LIFELONG_DATA to the "
                "shared data directory, or give corpus=PATH to a text file)"
            )
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise MissingFileError(f"perplexity corpus '{spec}': no such file")
    return path


def split_sentences(text: str, min_words: int = 3) -> list[str]:
    """Sentences of ``text``: split after . ! ? before whitespace; headings and fragments dropped."""
    parts = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text).strip())
    return [p for p in parts if len(p.split()) >= min_words]


class PerplexityProbe(Probe["PerplexityProbe.Options"]):
    """Reference-corpus perplexity (corpus-level and per-sentence mean), ratio to θ0, collapse flag."""

    name = PERPLEXITY_PROBE
    description = (
        "perplexity of a reference corpus (corpus, sentence_mean), ratio to θ0, over_threshold "
        "(collapse step = first step with ratio >= threshold)"
    )
    default_schedule = "every:5"

    @dataclass
    class Options:
        corpus: str = "builtin"  # builtin, wikitext (shared data) or the path of a UTF-8 text file
        chunk_tokens: int = 128  # tokens per chunk of the corpus variant, plus BOS (≥ 2)
        max_tokens: int = 8192  # cut the corpus to its first N tokens (0: all of it)
        max_sentences: int = 256  # first N sentences for the sentence_mean variant (0: all)
        threshold: float = 2.0  # collapse: perplexity ratio to θ0 at or above this (> 1)

    def __init__(self, schedule=None, options=None):
        super().__init__(schedule, options)
        o = self.options
        if o.chunk_tokens < 2:
            raise UserError(f"chunk_tokens must be at least 2 (got {o.chunk_tokens})")
        if o.threshold <= 1:
            raise UserError(f"threshold must be above 1 (got {o.threshold})")
        self.path = corpus_path(o.corpus)  # fail at construction: before the run starts
        self._encoded: dict[int, tuple[list[list[int]], list[list[int]]]] = {}

    @cached_property
    def text(self) -> str:
        text = self.path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        if not text.strip():
            raise UserError(f"perplexity corpus {self.path}: the file is empty")
        return text

    def rows_for(self, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
        """(corpus chunks, sentences) as token-id rows, each starting with the BOS token; cached."""
        key = id(tokenizer)
        if key not in self._encoded:
            o = self.options
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            ids = tokenizer(self.text, add_special_tokens=False).input_ids
            if o.max_tokens:
                ids = ids[: o.max_tokens]
            chunks = [[bos, *ids[i : i + o.chunk_tokens]] for i in range(0, len(ids), o.chunk_tokens)]
            chunks = [c for c in chunks if len(c) > 1]
            sentences = split_sentences(self.text)
            if o.max_sentences:
                sentences = sentences[: o.max_sentences]
            encoded = tokenizer(sentences, add_special_tokens=False).input_ids if sentences else []
            sent_rows = [[bos, *s[: o.chunk_tokens]] for s in encoded if s]
            self._encoded[key] = (chunks, sent_rows)
        return self._encoded[key]

    def chunk_tokens(self, tokenizer) -> list[int]:
        """Each corpus chunk's scored tokens (its BOS is context, not scored)."""
        return [len(c) - 1 for c in self.rows_for(tokenizer)[0]]

    def perplexities(self, scorer: Scorer) -> dict[str, float]:
        """Both variants on the model behind ``scorer`` (its rolling NLL: no prompt rewriting)."""
        return self.score(scorer)[0]

    def score(self, scorer: Scorer) -> tuple[dict[str, float], list[float]]:
        """:meth:`perplexities` and each corpus chunk's summed token NLL (for the ratio's interval)."""
        chunks, sentences = self.rows_for(scorer.codec.tokenizer)
        total, count = scorer.rolling_nll(chunks + sentences)
        n = len(chunks)
        out = {"corpus": float(np.exp(total[:n].sum() / count[:n].sum()))}
        if len(sentences):
            out["sentence_mean"] = float(np.mean(np.exp(total[n:] / np.maximum(count[n:], 1))))
        return out, [float(x) for x in total[:n]]

    def _rows(self, values: dict[str, float], base: dict[str, float]) -> list[Row]:
        rows = []
        for protocol, ppl in values.items():
            ratio = ppl / base[protocol]
            rows += [
                Row(self.name, PERPLEXITY, protocol, ppl),
                Row(self.name, RATIO, protocol, ratio),
                Row(self.name, OVER_THRESHOLD, protocol, float(ratio >= self.options.threshold)),
            ]
        return rows

    def _interval_rows(self, chunk_nll: list[float], base_nll: list[float] | None, tokenizer) -> list[Row]:
        """The corpus ratio's interval over chunks: the change in each chunk's summed NLL against θ0's,
        over its token count. No rows for a run begun before θ0's chunks were recorded."""
        if not base_nll or len(base_nll) != len(chunk_nll):
            return []
        _, low, high = ratio_interval(np.subtract(chunk_nll, base_nll), self.chunk_tokens(tokenizer))
        if np.isnan(low):
            return []
        return [
            Row(self.name, RATIO_LOW, "corpus", float(np.exp(low))),
            Row(self.name, RATIO_HIGH, "corpus", float(np.exp(high))),
        ]

    def _chunk_rows(self, chunk_nll: list[float], tokenizer, with_tokens: bool = False) -> list[Row]:
        rows = [Row(self.name, CHUNK_NLL, "corpus", v, chunk_id(i)) for i, v in enumerate(chunk_nll)]
        if with_tokens:
            counts = self.chunk_tokens(tokenizer)
            rows += [Row(self.name, CHUNK_TOKENS, "corpus", float(n), chunk_id(i)) for i, n in enumerate(counts)]
        return rows

    def prepare(self, ctx: ProbeContext):
        values, chunk_nll = self.score(ctx.scorer)
        chunks, sentences = self.rows_for(ctx.scorer.codec.tokenizer)
        reference = {
            **values,
            "threshold": self.options.threshold,
            "chunks": len(chunks),
            "sentences": len(sentences),
            "tokens": int(sum(self.chunk_tokens(ctx.scorer.codec.tokenizer))),
            "corpus_sha256": hashlib.sha256(self.text.encode()).hexdigest()[:16],
            "chunk_nll": chunk_nll,  # θ0's summed NLL per chunk: the ratio's interval pairs each step's with these
        }
        tokenizer = ctx.scorer.codec.tokenizer
        rows = self._rows(values, values) + self._interval_rows(chunk_nll, chunk_nll, tokenizer)
        return reference, rows + self._chunk_rows(chunk_nll, tokenizer, with_tokens=True)

    def measure(self, ctx: ProbeContext) -> list[Row]:
        values, chunk_nll = self.score(ctx.scorer)
        tokenizer = ctx.scorer.codec.tokenizer
        rows = self._rows(values, ctx.reference) + self._interval_rows(
            chunk_nll, ctx.reference.get("chunk_nll"), tokenizer
        )
        return rows + self._chunk_rows(chunk_nll, tokenizer)


def chunk_id(i: int) -> str:
    """A corpus chunk's key in the results' edit_id column (the item a row is about)."""
    return f"chunk:{i}"


def collapse_step(results: pl.DataFrame, protocol: str = "corpus") -> int | None:
    """The first step at which the perplexity ratio was at or above the run's threshold (None: never)."""
    hit = results.filter(
        (pl.col("probe") == PERPLEXITY_PROBE)
        & (pl.col("metric") == OVER_THRESHOLD)
        & (pl.col("protocol") == protocol)
        & (pl.col("value") > 0.5)
    )
    return int(cast(int, hit["step"].min())) if hit.height else None
