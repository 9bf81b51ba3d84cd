"""The Pitfalls sets: RoundEdit (``easy.json``/``hard.json``) and ConflictEdit (reverse / composite /
coverage), with their prompt-template files (``round_prompts.json``, ``conflict_prompts.json``)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from ..edit import ChainLink
from ..errors import MissingFileError, UserError
from ..stream import EditStream
from .common import DAY, DEFAULT_START, ReadReport, _Builder, _dedupe, _first_text, _load_json, _load_list, _Skip, _text


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
