"""Readers for the public knowledge-editing datasets (layouts in ``shared/data/README.md``).

Every reader returns ``(EditStream, ReadReport)``. The report counts the units
read, used and skipped, and names every skipped unit with its file, record
index (or id) and reason: no record is ever dropped silently. A *unit* is one
record of the file, except for DyKnow's ``grc_generated.json`` where it is one
dated value change. A record that yields a chain (round edit, conflict, MQuAKE
case) is used or skipped as a whole, so chains are never broken.

Timestamps are the dataset's own dates where it has them (DyKnow); otherwise
one edit per ``interval`` (default one day) from ``start`` (default
2024-01-01 UTC), in file order.

What the probes need and the :class:`~streams.edit.Edit` type has no field for
(MQuAKE's multi-hop questions, KnowEdit portability prompts, a Pitfalls round
edit's object set Obj, conflict metadata) goes to ``ReadReport.extras``.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .edit import UTC, ChainLink, Edit, EditError, Neighbor
from .errors import MissingFileError, UserError
from .stream import EditStream

DEFAULT_START = datetime.datetime(2024, 1, 1, tzinfo=UTC)
DAY = datetime.timedelta(days=1)


@dataclass
class ReadReport:
    """What a reader did: units read, used, skipped (with reasons), edits made, extras."""

    source: str
    read: int = 0
    used: int = 0
    edits: int = 0
    skipped: list[tuple[str, int | str, str]] = field(default_factory=list)
    extras: dict[str, dict] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def skip(self, file: str | os.PathLike, where: int | str, reason: str) -> None:
        self.skipped.append((os.fspath(file), where, reason))

    def summary(self) -> str:
        """One line: ``source: read N, used U, skipped S -> E edits``."""
        return f"{self.source}: read {self.read}, used {self.used}, skipped {self.n_skipped} -> {self.edits} edits"


class _Skip(Exception):
    """A unit that cannot become edits; the message is the reason."""


class _Builder:
    """Collects edits and the report; hands out regular timestamps in file order."""

    def __init__(self, source: str, start: datetime.datetime, interval: datetime.timedelta) -> None:
        self.report = ReadReport(source)
        self.edits: list[Edit] = []
        self.ids: set[str] = set()
        self.start = start if start.tzinfo else start.replace(tzinfo=UTC)
        self.interval = interval
        self.slot = 0

    def unit(self, file: Path, where: int | str, make: Callable[[], list[dict]]) -> bool:
        """Build one unit's edits (a list of Edit kwargs without timestamps/ids checks) or skip it."""
        self.report.read += 1
        try:
            specs = make()
            if not specs:
                raise _Skip("no edit in record")
            built: list[Edit] = []
            for spec in specs:
                if spec["id"] in self.ids or any(e.id == spec["id"] for e in built):
                    raise _Skip(f"duplicate edit id {spec['id']!r}")
                ts = spec.pop("timestamp", None)
                if ts is None:
                    ts = self.start + (self.slot + len(built)) * self.interval
                built.append(Edit(timestamp=ts, **spec))
        except _Skip as err:
            self.report.skip(file, where, str(err))
            return False
        except EditError as err:
            self.report.skip(file, where, f"invalid edit: {err}")
            return False
        except (KeyError, TypeError, AttributeError, IndexError) as err:
            self.report.skip(file, where, f"malformed record ({type(err).__name__}: {err})")
            return False
        self.slot += len(built)
        self.edits.extend(built)
        self.ids.update(e.id for e in built)
        self.report.used += 1
        self.report.edits += len(built)
        return True

    def result(self, name: str) -> tuple[EditStream, ReadReport]:
        return EditStream(self.edits, name=name), self.report


# -- small helpers -------------------------------------------------------------


def _load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None


def _load_list(path: Path) -> list:
    data = _load_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _text(value: Any, what: str) -> str:
    """A non-empty stripped string, or skip."""
    if not isinstance(value, str):
        raise _Skip(f"{what} is not a string ({type(value).__name__})")
    if not value.strip():
        raise _Skip(f"{what} is empty")
    return value.strip()


def _first_text(value: Any) -> str | None:
    """The first non-empty string in a string / (nested) list of aliases, else None."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list):
        for item in value:
            found = _first_text(item)
            if found:
                return found
    return None


def _template(prompt: str, subject: str) -> str:
    """A full prompt turned into a template: the first occurrence of subject -> ``{}``."""
    if "{}" in prompt:
        raise _Skip(f"prompt {prompt!r} already contains '{{}}'")
    if subject not in prompt:
        raise _Skip(f"subject {subject!r} not found in prompt {prompt!r}")
    return prompt.replace(subject, "{}", 1)


def _neighbors(items: Iterable[tuple[Any, Any]]) -> tuple[Neighbor, ...]:
    """Neighbors from (prompt, answer) pairs, leaving out pairs with no usable text."""
    out = []
    for prompt, answer in items:
        answer = _first_text(answer)
        if isinstance(prompt, str) and prompt.strip() and answer:
            out.append(Neighbor(prompt.strip(), answer))
    return tuple(out)


def _dedupe(items: Iterable[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for item in items:
        if isinstance(item, str) and item.strip():
            seen.setdefault(item.strip(), None)
    return tuple(seen)


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


# -- CounterFact -------------------------------------------------------------------


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


# -- zsRE ---------------------------------------------------------------------------


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


# -- MQuAKE -------------------------------------------------------------------------


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


# -- Pitfalls (RoundEdit, ConflictEdit) ---------------------------------------------


def _prompt_file(path: Path, given: str | os.PathLike | None, default_name: str) -> dict[str, list[str]]:
    p = Path(given) if given is not None else path.parent / default_name
    if not p.exists():
        if given is not None:
            raise MissingFileError(f"prompt-template file {p} not found")
        return {}
    data = _load_json(p)
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected an object of relation id -> templates")
    return data


def _label(node: Any, what: str) -> str:
    if not isinstance(node, dict):
        raise _Skip(f"{what} is missing")
    return _text(node.get("label"), f"{what} label")


def _pitfalls_edit(item: dict, what: str, templates: dict, **extra) -> dict:
    """Edit kwargs from a Pitfalls ``{relation, subject, object, new_object}`` item."""
    rel = item["relation"]
    prompt = _text(rel.get("prompt"), f"{what} relation prompt")
    if "{}" not in prompt:
        raise _Skip(f"{what}: relation prompt {prompt!r} has no '{{}}'")
    subject = _label(item["subject"], f"{what} subject")
    paraphrases = [
        t.replace("{}", subject) for t in templates.get(rel.get("id"), []) if isinstance(t, str) and "{}" in t
    ]
    spec = dict(
        subject=subject,
        relation_id=_text(rel.get("id"), f"{what} relation id"),
        prompt=prompt,
        paraphrases=_dedupe(p for p in paraphrases if p != prompt.replace("{}", subject)),
    )
    spec.update(extra)
    return spec


def read_pitfalls_round(
    path: str | os.PathLike,
    prompts: str | os.PathLike | None = None,
    *,
    start: datetime.datetime = DEFAULT_START,
    interval: datetime.timedelta = DAY,
) -> tuple[EditStream, ReadReport]:
    """Pitfalls RoundEdit (``easy.json``/``hard.json``): each record -> o->o* (``round-out``)
    then o*->o (``round-back``), one chain ``round-<file>-<index>``.

    ``prompts`` defaults to ``round_prompts.json`` beside the file (paraphrase
    templates by relation). Both edits carry ``candidates`` = Obj (the true
    objects, o first) followed by o*; ``extras['objects'][chain_id]`` is Obj alone.
    """
    path = Path(path)
    templates = _prompt_file(path, prompts, "round_prompts.json")
    b = _Builder(f"pitfalls_round_{path.stem}", start, interval)
    objects: dict[str, tuple[str, ...]] = {}
    for i, rec in enumerate(_load_list(path)):
        chain_id = f"round-{path.stem}-{i}"
        holder: dict[str, tuple] = {}

        def make(rec=rec, chain_id=chain_id, holder=holder):
            e = rec["edit"]
            o = _label(e.get("object"), "object")
            o_new = _label(e.get("new_object"), "new_object")
            if o == o_new:
                raise _Skip(f"new_object equals object ({o!r})")
            trues = [_first_text(t.get("label")) for t in rec.get("true_objects") or [] if isinstance(t, dict)]
            obj = _dedupe([o] + [t for t in trues if t and t != o_new])
            holder["obj"] = obj
            cands = obj + (o_new,)
            out = _pitfalls_edit(
                e,
                "edit",
                templates,
                id=f"{chain_id}-out",
                target_new=o_new,
                target_true=o,
                candidates=cands,
                chain=ChainLink(chain_id, "round-out"),
            )
            back = dict(
                out, id=f"{chain_id}-back", target_new=o, target_true=o_new, chain=ChainLink(chain_id, "round-back")
            )
            return [out, back]

        if b.unit(path, i, make):
            objects[chain_id] = holder["obj"]
    b.report.extras["objects"] = objects
    return b.result(f"pitfalls_round_{path.stem}")


def read_pitfalls_conflict(
    path: str | os.PathLike,
    prompts: str | os.PathLike | None = None,
    *,
    include_tied_fact: bool = True,
    start: datetime.datetime = DEFAULT_START,
    interval: datetime.timedelta = DAY,
) -> tuple[EditStream, ReadReport]:
    """Pitfalls ConflictEdit (reverse / composite / coverage): ``edits[0]`` -> ``conflict-e1``,
    ``edits[1]`` -> ``conflict-e2``, one chain ``<type>-<index>`` per record.

    Composite records name their tied fact k_f in ``triples[prerequisites[0]]``;
    with ``include_tied_fact`` it comes first in the chain as a ``tied-fact``
    edit (target_new = its true object, target_true None) — a replay should
    *probe* it, not apply it. e2's ``target_true`` is the record's ``true_object``
    when present (the object e1 implies) else its ``object``.
    ``extras['conflicts'][chain_id]`` keeps type, rule and the edit ids by role.
    """
    path = Path(path)
    templates = _prompt_file(path, prompts, "conflict_prompts.json")
    source = f"pitfalls_conflict_{path.stem}"
    b = _Builder(source, start, interval)
    conflicts: dict[str, dict] = {}
    for i, rec in enumerate(_load_list(path)):
        kind = rec.get("type", path.stem) if isinstance(rec, dict) else path.stem
        chain_id = f"{kind}-{i}"
        holder: dict[str, Any] = {}

        def make(rec=rec, chain_id=chain_id, holder=holder):
            edits = rec["edits"]
            if not isinstance(edits, list) or len(edits) != 2:
                raise _Skip(f"expected 2 edits, got {len(edits) if isinstance(edits, list) else type(edits).__name__}")
            specs = []
            roles: dict[str, str] = {}
            prereq = rec.get("prerequisites") or []
            if include_tied_fact and prereq:
                t = rec["triples"][prereq[0]]
                specs.append(
                    _pitfalls_edit(
                        t,
                        "tied fact",
                        templates,
                        id=f"{chain_id}-tied",
                        target_new=_label(t.get("object"), "tied fact object"),
                        chain=ChainLink(chain_id, "tied-fact"),
                    )
                )
                roles["tied-fact"] = f"{chain_id}-tied"
            for j, (e, role) in enumerate(zip(edits, ("conflict-e1", "conflict-e2"))):
                true = e.get("true_object") or e.get("object")
                specs.append(
                    _pitfalls_edit(
                        e,
                        f"edits[{j}]",
                        templates,
                        id=f"{chain_id}-e{j + 1}",
                        target_new=_label(e.get("new_object"), f"edits[{j}] new_object"),
                        target_true=_label(true, f"edits[{j}] object"),
                        chain=ChainLink(chain_id, role),
                    )
                )
                roles[role] = f"{chain_id}-e{j + 1}"
            holder["roles"] = roles
            return specs

        if b.unit(path, i, make):
            conflicts[chain_id] = {"type": kind, "rule": rec.get("rule"), "edits": holder["roles"]}
    b.report.extras["conflicts"] = conflicts
    return b.result(source)


# -- DyKnow -------------------------------------------------------------------------


def _wikidata_date(text: str) -> datetime.datetime:
    """A Wikidata date like ``+2021-07-06T00:00:00Z`` (month/day may be ``00``) -> aware UTC."""
    m = re.match(r"^\+?(\d{1,4})-(\d{2})-(\d{2})", text.strip())
    if not m:
        raise _Skip(f"unreadable date {text!r}")
    year, month, day = (int(g) for g in m.groups())
    try:
        return datetime.datetime(year, max(month, 1), max(day, 1), tzinfo=UTC)
    except ValueError:
        raise _Skip(f"invalid date {text!r}") from None


def _dated_values(answers: Any) -> tuple[list[tuple[datetime.datetime, str]], list[tuple[str, str]]]:
    """``"value |S: date |E: date"`` strings -> (start, value) sorted by start (stable),
    and the (answer, reason) of those that have no usable start date ``|S:``."""
    out, bad = [], []
    for a in answers or []:
        if not isinstance(a, str):
            bad.append((repr(a), "answer is not a string"))
            continue
        parts = [x.strip() for x in a.split("|")]
        value, quals = parts[0], dict(q.split(":", 1) for q in parts[1:] if ":" in q)
        if not value:
            bad.append((a, "empty value"))
        elif "S" not in quals:
            bad.append((a, "no '|S:' start date"))
        else:
            try:
                out.append((_wikidata_date(quals["S"]), value))
            except _Skip as err:
                bad.append((a, str(err)))
    return sorted(out, key=lambda x: x[0]), bad


def read_dyknow_edits(path: str | os.PathLike) -> tuple[EditStream, ReadReport]:
    """DyKnow's edit requests (``editing_dataset_<model>.json``), timestamped at the start
    date of ``target``; ``target_true`` is the value just before it in time; the
    other ``questions`` that contain no ``{}`` are paraphrases."""
    path = Path(path)
    b = _Builder(f"dyknow_{path.stem}", DEFAULT_START, DAY)
    for i, rec in enumerate(_load_list(path)):

        def make(rec=rec, i=i):
            subject = _text(rec["subject"], "subject")
            prompt = _text(rec["prompt"], "prompt")
            target = _text(rec["target"], "target")
            values, _ = _dated_values(rec.get("answers"))  # undated values cannot order the change
            idx = [k for k, (_, v) in enumerate(values) if v == target]
            if not idx:
                raise _Skip(f"target {target!r} has no dated answer")
            k = idx[-1]
            earlier = [v for _, v in values[:k] if v != target]
            questions = rec.get("questions") or {}
            return [
                dict(
                    id=f"dyknow-{i}",
                    timestamp=values[k][0],
                    subject=subject,
                    relation_id=_text(rec.get("attribute") or rec.get("domain") or "dyknow", "relation"),
                    prompt=_template(prompt, subject),
                    target_new=target,
                    target_true=earlier[-1] if earlier else None,
                    paraphrases=_dedupe(q for q in questions.values() if isinstance(q, str) and q.strip() != prompt),
                )
            ]

        b.unit(path, i, make)
    return b.result(f"dyknow_{path.stem}")


def _grc_facts(data: dict) -> Iterable[tuple[str, str, str, dict]]:
    """(domain, element, attribute, {questions, answers}) for both nesting depths."""
    for domain, elements in data.items():
        if not isinstance(elements, dict):
            continue
        for element, node in elements.items():
            if isinstance(node, dict) and "answers" in node:
                yield domain, element, domain, node
            elif isinstance(node, dict):
                for attribute, leaf in node.items():
                    yield domain, element, attribute, leaf


def read_dyknow_facts(path: str | os.PathLike) -> tuple[EditStream, ReadReport]:
    """DyKnow's dated facts (``grc_generated.json``): every change of a fact's value,
    in start-date order, is one edit (value k -> value k+1 at value k+1's start date).

    A unit is one value change; a change to the same value (a renewed term) is
    skipped with that reason. The subject is the element (country, athlete,
    company, organisation); the prompt is the first question that contains it.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected an object of domains")
    b = _Builder(f"dyknow_{path.stem}", DEFAULT_START, DAY)
    for domain, element, attribute, node in _grc_facts(data):
        key = f"{domain}/{element}" + (f"/{attribute}" if attribute != domain else "")
        try:
            if not isinstance(node, dict):
                raise _Skip("fact is not an object")
            values, bad = _dated_values(node.get("answers"))
            questions = [q for q in (node.get("questions") or {}).values() if isinstance(q, str)]
            prompt = next((q for q in questions if element in q), None)
            if prompt is None:
                raise _Skip(f"subject {element!r} not found in any question")
        except _Skip as err:
            b.report.read += 1
            b.report.skip(path, key, str(err))
            continue
        for raw, reason in bad:  # an undated value is a unit of its own, skipped
            b.report.read += 1
            b.report.skip(path, f"{key}:{raw}", reason)
        others = _dedupe(q for q in questions if q != prompt)
        for k in range(1, len(values)):
            (_, old), (ts, new) = values[k - 1], values[k]

            def make(old=old, new=new, ts=ts, k=k):
                if old == new:
                    raise _Skip(f"value {new!r} unchanged (renewed term)")
                return [
                    dict(
                        id=f"dyknow-{key}#{k}",
                        timestamp=ts,
                        subject=element,
                        relation_id=attribute,
                        prompt=_template(prompt, element),
                        target_new=new,
                        target_true=old,
                        paraphrases=others,
                    )
                ]

            b.unit(path, f"{key}#{k}", make)
    return b.result(f"dyknow_{path.stem}")


# -- named datasets -------------------------------------------------------------------

DATASETS: dict[str, tuple[str, Callable[[Path], tuple[EditStream, ReadReport]]]] = {
    "counterfact": ("counterfact/counterfact_rome_500.json", read_counterfact_rome),
    "counterfact_easyedit": ("counterfact/counterfact_easyedit_edit.json", read_counterfact_easyedit),
    "zsre_mend": ("zsre/zsre_mend_train_1k.json", read_zsre_mend),
    "zsre": ("zsre/ZsRE-test-all.json", read_zsre_knowedit),
    "mquake": ("mquake/MQuAKE-CF_AKEW_subset.json", read_mquake),
    "pitfalls_round_easy": ("pitfalls/gpt2-xl/easy.json", read_pitfalls_round),
    "pitfalls_round_hard": ("pitfalls/gpt2-xl/hard.json", read_pitfalls_round),
    "pitfalls_reverse": ("pitfalls/gpt2-xl/reverse_edit.json", read_pitfalls_conflict),
    "pitfalls_composite": ("pitfalls/gpt2-xl/composite_edit.json", read_pitfalls_conflict),
    "pitfalls_coverage": ("pitfalls/gpt2-xl/coverage_edit.json", read_pitfalls_conflict),
    "ripple_recent": ("ripple_knowedit/wiki_recent_train.json", read_ripple_knowedit),
    "ripple_counterfact": ("ripple_knowedit/wiki_counterfact_train.json", read_ripple_knowedit),
    "dyknow": ("dyknow/editing_dataset_gpt2-xl.json", read_dyknow_edits),
    "dyknow_facts": ("dyknow/grc_generated.json", read_dyknow_facts),
}
"""Dataset name -> (path relative to the data directory, reader)."""


def default_data_dir() -> Path:
    """``$LIFELONG_DATA`` if set, else ``shared/data`` beside the repository checkout."""
    env = os.environ.get("LIFELONG_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def dataset_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The file dataset ``name`` is read from; refused in one line when unknown or absent."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: expected one of {', '.join(sorted(DATASETS))}")
    path = (Path(data_dir) if data_dir is not None else default_data_dir()) / DATASETS[name][0]
    if not path.exists():
        raise MissingFileError(
            f"dataset {name!r} needs {path}, which does not exist (set LIFELONG_DATA or pass data_dir)"
        )
    return path


def read_dataset(name: str, data_dir: str | os.PathLike | None = None) -> tuple[EditStream, ReadReport]:
    """Read a dataset by name (see :data:`DATASETS`) from ``data_dir`` (default :func:`default_data_dir`)."""
    path = dataset_path(name, data_dir)
    return DATASETS[name][1](path)


__all__: Sequence[str] = [
    "ReadReport",
    "MultiHopCase",
    "read_counterfact_rome",
    "read_counterfact_easyedit",
    "read_zsre_mend",
    "read_zsre_knowedit",
    "read_mquake",
    "read_pitfalls_round",
    "read_pitfalls_conflict",
    "read_ripple_knowedit",
    "read_dyknow_edits",
    "read_dyknow_facts",
    "DATASETS",
    "default_data_dir",
    "read_dataset",
]
