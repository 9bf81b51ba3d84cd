"""CounterFact, in the ROME/MEMIT schema (``requested_rewrite``) and in EasyEdit's flat schema."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from ..stream import EditStream
from .common import (
    DAY,
    DEFAULT_START,
    ReadReport,
    _Builder,
    _dedupe,
    _first_text,
    _load_list,
    _neighbors,
    _Skip,
    _template,
    _text,
)


def read_counterfact_rome(
    path: str | os.PathLike, *, start: datetime.datetime = DEFAULT_START, interval: datetime.timedelta = DAY
) -> tuple[EditStream, ReadReport]:
    """CounterFact in the ROME/MEMIT schema (``requested_rewrite`` with a ``{}`` prompt).

    Neighborhood prompts get ``target_true`` as their answer (they share the true object).
    """
    path = Path(path)
    b = _Builder("counterfact_rome", start, interval)
    for i, rec in enumerate(_load_list(path)):

        def make(rec=rec, i=i):
            rw = rec["requested_rewrite"]
            subject = _text(rw["subject"], "subject")
            prompt = _text(rw["prompt"], "prompt")
            if "{}" not in prompt:
                raise _Skip(f"prompt {prompt!r} has no '{{}}' for the subject")
            target_new = _text(rw["target_new"]["str"], "target_new")
            target_true = _text(rw["target_true"]["str"], "target_true")
            case = rec.get("case_id", i)
            return [
                dict(
                    id=f"cf-{case}",
                    subject=subject,
                    relation_id=_text(rw.get("relation_id") or "counterfact", "relation_id"),
                    prompt=prompt,
                    target_new=target_new,
                    target_true=target_true,
                    paraphrases=_dedupe(rec.get("paraphrase_prompts") or []),
                    neighborhood=_neighbors((p, target_true) for p in rec.get("neighborhood_prompts") or []),
                )
            ]

        b.unit(path, rec.get("case_id", i) if isinstance(rec, dict) else i, make)
    return b.result("counterfact_rome")


def read_counterfact_easyedit(
    path: str | os.PathLike, *, start: datetime.datetime = DEFAULT_START, interval: datetime.timedelta = DAY
) -> tuple[EditStream, ReadReport]:
    """CounterFact in EasyEdit's flat schema (full prompt; the subject becomes ``{}``)."""
    path = Path(path)
    b = _Builder("counterfact_easyedit", start, interval)
    for i, rec in enumerate(_load_list(path)):

        def make(rec=rec, i=i):
            subject = _text(rec["subject"], "subject")
            prompt = _template(_text(rec["prompt"], "prompt"), subject)
            return [
                dict(
                    id=f"cfe-{rec.get('case_id', i)}",
                    subject=subject,
                    relation_id="counterfact",
                    prompt=prompt,
                    target_new=_text(rec["target_new"], "target_new"),
                    target_true=_first_text(rec.get("ground_truth")),
                    paraphrases=_dedupe([rec.get("rephrase_prompt")]),
                    neighborhood=_neighbors([(rec.get("locality_prompt"), rec.get("locality_ground_truth"))]),
                )
            ]

        b.unit(path, rec.get("case_id", i) if isinstance(rec, dict) else i, make)
    return b.result("counterfact_easyedit")
