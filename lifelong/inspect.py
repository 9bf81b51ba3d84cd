"""Before and after: what the model says about a few of a run's edits, at θ0, right after each edit,
and at the run's last completed step (``lifelong inspect``, ROME's demo view).

For each chosen edit: its prompt, one paraphrase and one neighbourhood prompt, each with the greedy
continuation at the three steps. The model at a step is :func:`lifelong.replay.checkout`'s (weights,
and an adaptor editor's state and prompt rewriting), so the view shows what the probes scored.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lifelong.run import RunConfig, RunDir
from streams import Edit
from streams.errors import UserError


@dataclass
class Continuation:
    edit_id: str
    kind: str  # prompt | paraphrase | neighbour
    text: str  # the prompt as the stream gives it (before any memory rewriting)
    by_step: dict[int, str]  # step -> greedy continuation


def run_config(run: RunDir, stream: str | None = None) -> RunConfig:
    """The run's configuration from its manifest; its stream file must be where the run read it,
    or be given as ``stream`` (checked against the run's stream hash by the caller)."""
    from lifelong.config import read_config

    if stream is not None:
        manifest = run.manifest()
        options = read_config_with_stream(run, manifest, stream)
    else:
        options = read_config(run.manifest_path)
    sets = dict(item.split("=", 1) for item in options.pop("set", []))
    probes = options.pop("probe", [])
    return RunConfig(
        **{k: v for k, v in options.items() if k in RunConfig.__dataclass_fields__},
        editor_overrides=sets,
        probes=probes,
    )


def read_config_with_stream(run: RunDir, manifest: dict, stream: str) -> dict:
    """The manifest's options with its stream replaced (the manifest's own file may be elsewhere)."""
    from lifelong.config import options_from_manifest

    moved = {
        **manifest,
        "identity": {**manifest["identity"], "stream": stream},
        "sessions": [{**s, "stream": stream} for s in manifest.get("sessions") or []],
    }
    return options_from_manifest(run.manifest_path, moved)


def choose_edits(steps: Sequence[Sequence[Edit]], edit_ids: list[str] | None, count: int) -> list[tuple[int, Edit]]:
    """(step, edit) pairs: the named edits, or ``count`` spread evenly over the run's edits."""
    placed = [(k, e) for k, batch in enumerate(steps, start=1) for e in batch]
    if edit_ids:
        by_id = {e.id: (k, e) for k, e in placed}
        missing = [i for i in edit_ids if i not in by_id]
        if missing:
            raise UserError(f"inspect: no edit {missing[0]!r} in the run's completed steps")
        return [by_id[i] for i in edit_ids]
    if count < 1:
        raise UserError(f"inspect: --edits must be at least 1, got {count}")
    if len(placed) <= count:
        return placed
    return [placed[round(i * (len(placed) - 1) / (count - 1))] for i in range(count)] if count > 1 else placed[:1]


def before_after(
    run_path: Path | str,
    edit_ids: list[str] | None = None,
    count: int = 3,
    tokens: int = 12,
    device: str = "cpu",
    stream: str | None = None,
) -> tuple[list[tuple[int, Edit]], list[Continuation], list[int]]:
    """The chosen (step, edit) pairs, their continuations at θ0, their own step and the last
    completed step, and those steps in order."""
    from lifelong.replay import checkout, prepare_stream_and_facts, scorer_for

    run = RunDir(run_path)
    done = run.completed_step()
    if done < 1:
        raise UserError(f"{run.path}: no completed edit step to inspect yet")
    stream_now, steps, facts, full_hash = prepare_stream_and_facts(run_config(run, stream))
    recorded = run.manifest()["identity"].get("stream_hash")
    if recorded not in (None, full_hash if facts else stream_now.content_hash()):
        raise UserError(f"{run.path}: the stream read now is not the one this run replayed (its hash differs)")
    chosen = choose_edits(steps[:done], edit_ids, count)
    rows = []
    for _, edit in chosen:
        rows.append(Continuation(edit.id, "prompt", edit.rendered_prompt, {}))
        if edit.paraphrases:
            rows.append(Continuation(edit.id, "paraphrase", edit.paraphrases[0], {}))
        if edit.neighborhood:
            rows.append(Continuation(edit.id, "neighbour", edit.neighborhood[0].prompt, {}))
    wanted = sorted({0, done, *(k for k, _ in chosen)})
    for step in wanted:
        lm = checkout(run.path, step, device)
        # As the editor shows prompts to the model (an in-context memory rewrites them).
        for row, text in zip(rows, scorer_for(lm).generate([r.text for r in rows], tokens)):
            row.by_step[step] = text
        if lm.editor is not None:
            lm.editor.release()
    return chosen, rows, wanted


def _shown(text: str, width: int) -> str:
    """A continuation on one line of at most ``width`` characters, unprintable ones replaced."""
    text = "".join(c if c.isprintable() else "\ufffd" for c in text)
    return textwrap.shorten(text, width, placeholder="…") if text.strip() else "(nothing)"


def format_before_after(chosen, rows: list[Continuation], width: int = 28) -> str:
    """One block per edit: its request, then prompt / paraphrase / neighbour × θ0, own step, last step."""
    last = max(max(r.by_step) for r in rows)
    out = []
    for step, edit in chosen:
        columns = [0, step] if step == last else [0, step, last]
        names = {0: "θ0", step: f"after its step {step}", last: f"last step {last}"}
        out.append(
            f"{edit.id} (step {step}): {edit.rendered_prompt!r} -> {edit.target_new!r}"
            + (f" (was {edit.target_true!r})" if edit.target_true else "")
        )
        out.append(" " * 13 + "".join(f"{names[c]:<{width + 2}}" for c in columns))
        for row in (r for r in rows if r.edit_id == edit.id):
            out.append(f"  {row.kind:<11}{textwrap.shorten(row.text, 70)!r}")
            out.append(" " * 13 + "".join(f"{_shown(row.by_step[c], width):<{width + 2}}" for c in columns))
        out.append("")
    return "\n".join(out).rstrip()
