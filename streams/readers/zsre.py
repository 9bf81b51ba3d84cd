"""zsRE in the MEND/ROME schema, and the KnowEdit splits that share one schema: KnowEdit's ZsRE
test split and its RippleEdits-derived splits (WikiData_recent / WikiData_counterfact)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

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
    _template,
    _text,
)


def _portability(record: dict) -> list[tuple[str, str, str]]:
    """KnowEdit portability prompts as (kind, prompt, first answer)."""
    out = []
    port = record.get("portability") or {}
    if isinstance(port, dict):
        for kind, items in port.items():
            for item in items or []:
                if isinstance(item, dict):
                    answer = _first_text(item.get("ground_truth"))
                    if isinstance(item.get("prompt"), str) and answer:
                        out.append((kind, item["prompt"], answer))
    return out


def _locality_pairs(record: dict) -> list[tuple[Any, Any]]:
    loc = record.get("locality") or {}
    pairs = []
    if isinstance(loc, dict):
        for items in loc.values():
            for item in items or []:
                if isinstance(item, dict):
                    pairs.append((item.get("prompt"), item.get("ground_truth")))
    return pairs


def read_zsre_mend(
    path: str | os.PathLike, *, start: datetime.datetime = DEFAULT_START, interval: datetime.timedelta = DAY
) -> tuple[EditStream, ReadReport]:
    """zsRE in the MEND/ROME schema (``src``/``alt``/``answers``/``rephrase``/``loc``).

    ``target_true`` is ``answers[0]`` (the gold answer, not the model's ``pred``);
    the ``loc`` NQ question with ``loc_ans`` is the one neighbor.
    """
    path = Path(path)
    b = _Builder("zsre_mend", start, interval)
    for i, rec in enumerate(_load_list(path)):

        def make(rec=rec, i=i):
            subject = _text(rec["subject"], "subject")
            loc = rec.get("loc")
            if isinstance(loc, str) and loc.startswith("nq question: "):
                loc = loc[len("nq question: ") :]
            return [
                dict(
                    id=f"zsre-{i}",
                    subject=subject,
                    relation_id="zsre",
                    prompt=_template(_text(rec["src"], "src"), subject),
                    target_new=_text(rec["alt"], "alt"),
                    target_true=_first_text(rec.get("answers")),
                    paraphrases=_dedupe([rec.get("rephrase")]),
                    neighborhood=_neighbors([(loc, rec.get("loc_ans"))]),
                )
            ]

        b.unit(path, i, make)
    return b.result("zsre_mend")


def _read_knowedit(
    path: Path, source: str, id_prefix: str, relation_id: str, start: datetime.datetime, interval: datetime.timedelta
) -> tuple[EditStream, ReadReport]:
    b = _Builder(source, start, interval)
    portability: dict[str, list] = {}
    for i, rec in enumerate(_load_list(path)):

        def make(rec=rec, i=i):
            subject = _text(rec["subject"], "subject")
            return [
                dict(
                    id=f"{id_prefix}-{i}",
                    subject=subject,
                    relation_id=relation_id,
                    prompt=_template(_text(rec["prompt"], "prompt"), subject),
                    target_new=_text(_first_text(rec["target_new"]) or "", "target_new"),
                    target_true=_first_text(rec.get("ground_truth")),
                    paraphrases=_dedupe([rec.get("rephrase_prompt")]),
                    neighborhood=_neighbors(_locality_pairs(rec)),
                )
            ]

        if b.unit(path, i, make):
            port = _portability(rec)
            if port:
                portability[f"{id_prefix}-{i}"] = port
    b.report.extras["portability"] = portability
    return b.result(source)


def read_zsre_knowedit(
    path: str | os.PathLike, *, start: datetime.datetime = DEFAULT_START, interval: datetime.timedelta = DAY
) -> tuple[EditStream, ReadReport]:
    """KnowEdit's ZsRE test split. Portability prompts go to ``extras['portability'][edit_id]``
    as ``(kind, prompt, answer)``; ``Relation_Specificity`` locality prompts become neighbors."""
    return _read_knowedit(Path(path), "zsre_knowedit", "zsre-ke", "zsre", start, interval)


def read_ripple_knowedit(
    path: str | os.PathLike, *, start: datetime.datetime = DEFAULT_START, interval: datetime.timedelta = DAY
) -> tuple[EditStream, ReadReport]:
    """KnowEdit's RippleEdits-derived splits (WikiData_recent / WikiData_counterfact).

    ``wiki_recent`` has no ``ground_truth``: those edits have ``target_true=None``.
    Locality answers may be alias lists; the first alias is used. Portability
    prompts go to ``extras['portability']``.
    """
    path = Path(path)
    name = path.stem
    return _read_knowedit(path, f"ripple_{name}", f"ripple-{name}", "ripple", start, interval)
