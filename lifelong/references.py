"""θ0's references borrowed from another run of the same stream, model and probes (``replay
--references-from RUN``).

Step 0 scores every probe on the unedited model θ0; with generation protocols on 100 CounterFact
edits that is minutes per run on a CPU, and it is the same for every editor: a comparison of six
editors computes it six times. A run may instead copy step 0 (the probes' references, its result
rows and generated answers) from a finished run whose identity differs only in the editor.

The copy is refused, and step 0 computed as usual, unless the two runs saw the same θ0 through
their editors: each run records, beside its references, the log-probabilities its scorer gives a
few of the stream's answers at step 0 (:func:`theta0_check`); an editor that changes what the
model says before its first edit (a prompt rewriter, a hook that is not the identity) changes them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import polars as pl

from streams import Edit

CHECK_KEY = "__theta0_check__"  # beside the probes' names in the reference file
# identity fields that may differ between the runs (the editor and its settings)
EDITOR_FIELDS = ("editor", "editor_overrides", "hyperparameters")
CHECK_EDITS = 3
CHECK_TOLERANCE = 1e-3  # nats per answer: rounding across machines, far below any edit's effect


def theta0_check(scorer, stream: Sequence[Edit]) -> list[float]:
    """Log-probabilities of the first edits' new and true answers after their prompts, as this
    run's scorer (editor's rewriter and hooks included) gives them on θ0."""
    pairs = []
    for edit in list(stream)[:CHECK_EDITS]:
        pairs.append((edit.rendered_prompt, edit.target_new))
        if edit.target_true:
            pairs.append((edit.rendered_prompt, edit.target_true))
    return [float(x) for x in scorer.score(pairs).logprob] if pairs else []


@dataclass
class Borrowed:
    references: dict
    rows: list[dict]  # step 0's result rows, relabelled to this run
    generations: list  # probes.base.GeneratedAnswer of step 0
    source_run_id: str


def _refused(source: Path, why: str) -> None:
    print(f"note: θ0 references not taken from {source}: {why}; computing them", file=sys.stderr)


def borrow(source: Path | str, identity: dict, check: list[float], run_id: str) -> Borrowed | None:
    """Step 0 of the run at ``source`` for a run of ``identity`` whose θ0 check is ``check``, or None
    (with a one-line note saying why) when it cannot stand for this run's step 0."""
    from lifelong.run import RunDir
    from probes.base import GeneratedAnswer

    source = Path(source)
    run = RunDir(source)
    if not run.exists():
        _refused(source, "no run there")
        return None
    manifest = run.manifest()
    differs = [k for k in run.identity_differences(identity) if k not in EDITOR_FIELDS]
    if differs:
        _refused(source, f"its run differs in {', '.join(differs)}")
        return None
    reference = run.load_reference() if run.completed_step() >= 0 else None
    if reference is None:
        _refused(source, "its step 0 is not complete")
        return None
    stored = reference.pop(CHECK_KEY, None)
    if stored is None:
        _refused(source, "it records no θ0 check (made before checks were recorded)")
        return None
    if len(stored) != len(check) or any(abs(a - b) > CHECK_TOLERANCE for a, b in zip(stored, check)):
        worst = max((abs(a - b) for a, b in zip(stored, check)), default=float("nan"))
        _refused(source, f"its editor saw another θ0 (answer log-probabilities differ by up to {worst:.3g})")
        return None
    rows = pl.read_parquet(run.part_path(0)).with_columns(pl.lit(run_id).alias("run_id")).to_dicts()
    names = [f.name for f in fields(GeneratedAnswer)]
    part = run.generation_path(0)
    answers = pl.read_parquet(part).to_dicts() if part.is_file() else []
    generations = [GeneratedAnswer(**{**{n: a[n] for n in names}, "ids": tuple(a["ids"])}) for a in answers]
    return Borrowed(reference, rows, generations, manifest["run_id"])
