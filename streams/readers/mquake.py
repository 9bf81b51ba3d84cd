"""MQuAKE-CF: each case's requested rewrites become one chain; its multi-hop questions go to extras."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from ..edit import ChainLink
from ..stream import EditStream
from .common import DAY, DEFAULT_START, ReadReport, _Builder, _dedupe, _first_text, _load_list, _Skip, _text


@dataclass(frozen=True)
class MultiHopCase:
    """An MQuAKE case's multi-hop questions and answers (before and after its edits)."""

    chain_id: str
    edit_ids: tuple[str, ...]
    questions: tuple[str, ...]
    answer: str
    answer_aliases: tuple[str, ...]
    new_answer: str
    new_answer_aliases: tuple[str, ...]


def read_mquake(
    path: str | os.PathLike, *, start: datetime.datetime = DEFAULT_START, interval: datetime.timedelta = DAY
) -> tuple[EditStream, ReadReport]:
    """MQuAKE-CF: each case's requested rewrites become edits of one chain (role ``multi-hop``).

    The multi-hop questions are probes, not edits, so they are not in the stream:
    ``extras['multi_hop'][chain_id]`` holds a :class:`MultiHopCase`. A case is
    skipped whole if any of its rewrites is unusable.
    """
    path = Path(path)
    b = _Builder("mquake", start, interval)
    cases: dict[str, MultiHopCase] = {}
    for i, rec in enumerate(_load_list(path)):
        case = rec.get("case_id", i) if isinstance(rec, dict) else i
        chain_id = f"mquake-{case}"

        def make(rec=rec):
            rewrites = rec["requested_rewrite"]
            if not isinstance(rewrites, list) or not rewrites:
                raise _Skip("no requested_rewrite")
            specs = []
            for j, rw in enumerate(rewrites):
                prompt = _text(rw["prompt"], f"requested_rewrite[{j}].prompt")
                if "{}" not in prompt:
                    raise _Skip(f"requested_rewrite[{j}]: prompt {prompt!r} has no '{{}}'")
                specs.append(
                    dict(
                        id=f"{chain_id}-{j}",
                        subject=_text(rw["subject"], f"requested_rewrite[{j}].subject"),
                        relation_id=_text(rw.get("relation_id") or "mquake", "relation_id"),
                        prompt=prompt,
                        target_new=_text(rw["target_new"]["str"], f"requested_rewrite[{j}].target_new"),
                        target_true=_first_text(rw.get("target_true", {}).get("str")),
                        paraphrases=_dedupe([rw.get("question")]),
                        chain=ChainLink(chain_id, "multi-hop"),
                    )
                )
            return specs

        if b.unit(path, case, make):
            n = len(rec["requested_rewrite"])
            cases[chain_id] = MultiHopCase(
                chain_id=chain_id,
                edit_ids=tuple(f"{chain_id}-{j}" for j in range(n)),
                questions=_dedupe(rec.get("questions") or []),
                answer=str(rec.get("answer", "")),
                answer_aliases=_dedupe(rec.get("answer_alias") or []),
                new_answer=str(rec.get("new_answer", "")),
                new_answer_aliases=_dedupe(rec.get("new_answer_alias") or []),
            )
    b.report.extras["multi_hop"] = cases
    return b.result("mquake")
