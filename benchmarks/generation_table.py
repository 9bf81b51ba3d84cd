"""Teacher forcing against generation, editor by editor (issue #38): one command, one table.

Each editor replays the first ``--edits`` CounterFact records of the shared data, one edit per step,
on the default model, with edit quality and end-of-run retention scored both ways: teacher-forced
(ES/PS, ``exact``) and by the model's own greedy answers in each context (question, QA instruction,
chat template), as "The Mirage of Model Editing" does. Per editor and measure it prints the figures
with n and 95% intervals, and the gap between teacher-forced ES/PS and the strictest generated
score on the same edits (a paired bootstrap over edits).

Runs are ordinary run directories under ``--work`` and resume: stop the command and start it again
to carry on; ``--report-only`` prints (and with ``--page``, writes) the table from what is finished.
Each run is a ``lifelong replay`` subprocess at one compute thread, one at a time; θ0's references
(minutes of generation) are computed once and copied by the other editors' runs (``--references-from``).

    python benchmarks/generation_table.py [--edits 100] [--editors rome,memit,alphaedit,grace,wise,memory]
    python benchmarks/generation_table.py --report-only --page docs/GENERATION.md
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import run_archive  # noqa: E402

from lifelong.core.stats import Estimate, format_estimate, rate  # noqa: E402

EDITORS = ("rome", "memit", "alphaedit", "grace", "wise", "memory")
CONTEXTS = ("question", "qa", "chat")
GENERATION = "+".join(CONTEXTS)
BEGIN, END = "<!-- generation-table:begin -->", "<!-- generation-table:end -->"
# (row label, probe, metric, teacher-forced protocol, step: "own" = the edit's own step, "last")
MEASURES = (
    ("efficacy, own step", "edit_quality", "efficacy", "es", "own"),
    ("paraphrase, own step", "edit_quality", "generalization", "ps", "own"),
    ("retained at end", "retention", "retention", "es", "last"),
)


def replay_argv(model: str, editor: str, stream: str, out: Path, options: list[str], device: str = "cpu") -> list[str]:
    """A ``lifelong replay`` subprocess's command line (also benchmarks/lifelong_table.py's)."""
    cli = [sys.executable, "-m", "lifelong.cli", "replay"]
    run = ["--model", model, "--editor", editor, "--stream", stream, "--out", str(out), "--device", device]
    return [*cli, *run, *options]


def replay_command(
    editor: str, edits: int, out: Path, model: str, references: Path | None = None, device: str = "cpu"
) -> list[str]:
    borrow = ["--references-from", str(references)] if references else []
    probes = [
        "--probe",
        f"edit_quality:generation={GENERATION}",
        "--probe",
        f"retention:schedule=end,generation={GENERATION}",
    ]
    return replay_argv(model, editor, "dataset:counterfact", out, ["--steps", str(edits), *probes, *borrow], device)


def references_source(runs: list[Path], out: Path, kit: Path | None = None) -> Path | None:
    """One of ``runs`` other than ``out`` whose step 0 is complete, else the archived θ0 ``kit`` when there
    is one: θ0's references are the same for every editor, and the replay copies them from it (refusing,
    with a note, when they differ)."""
    from lifelong.run import RunDir

    for path in runs:
        run = RunDir(path)
        if path != out and run.exists() and run.completed_step() >= 0:
            return run.path
    return kit if kit is not None and RunDir(kit).exists() else None


def keep_theta0(run, store: Path) -> None:
    """Archive ``run``'s step 0 as the table's θ0 kit (once: θ0 is every editor's)."""
    from lifelong.run import RunDir

    if not RunDir(store / run_archive.THETA0).exists() and run.exists() and run.completed_step() >= 0:
        run_archive.theta0_kit(run, store / run_archive.THETA0)


def per_edit(results: pl.DataFrame, probe: str, metric: str, protocol: str, step: str) -> dict[str, float]:
    """edit id -> value of one measure: at each edit's own step (the first step after θ0 that scored
    it) or at the run's last step."""
    rows = results.filter(
        (pl.col("probe") == probe) & (pl.col("metric") == metric) & (pl.col("protocol") == protocol)
    ).filter(pl.col("step") > 0)
    if not rows.height:
        return {}
    if step == "last":
        rows = rows.filter(pl.col("step") == rows["step"].max())
    else:
        rows = rows.sort("step").unique("edit_id", keep="first")
    rows = rows.sort("edit_id")  # a fixed order: the seeded bootstrap then gives the same interval on every render
    return dict(zip(rows["edit_id"].to_list(), rows["value"].to_list(), strict=True))


def kept_rows(results: pl.DataFrame) -> pl.DataFrame:
    """The rows this table reads (what an archived run keeps): edit quality and retention."""
    return results.filter(pl.col("probe").is_in(["edit_quality", "retention"]))


def table_rows(results: pl.DataFrame, editor: str) -> list[list[str]]:
    out = []
    for label, probe, metric, forced, step in MEASURES:
        forced_values = per_edit(results, probe, metric, forced, step)
        cells = [editor, label, format_estimate(rate(list(forced_values.values())))]
        exact = per_edit(results, probe, metric, "exact", step)
        cells.append(format_estimate(rate(list(exact.values()))))
        generated = {c: per_edit(results, probe, metric, f"gen_exact@{c}", step) for c in CONTEXTS}
        cells += [format_estimate(rate(list(generated[c].values()))) if generated[c] else "n/a" for c in CONTEXTS]
        cells.append(format_estimate(strictest_gap(forced_values, generated)))
        # the lenient score beside the strict one: an answer that holds the new object among other words
        contains = {c: per_edit(results, probe, metric, f"gen_contains@{c}", step) for c in CONTEXTS}
        cells += [format_estimate(rate(list(contains[c].values()))) if contains[c] else "n/a" for c in CONTEXTS]
        out.append(cells)
    return out


def strictest_gap(forced: dict[str, float], generated: dict[str, dict[str, float]]) -> Estimate:
    """Teacher-forced minus generated on the same edits, for the context that scores lowest (paired
    bootstrap over edits; the difference of two shares stays in [-1, 1])."""
    best: Estimate | None = None
    for values in generated.values():
        shared = sorted(set(forced) & set(values))
        if not shared:
            continue
        diff = np.array([forced[k] - values[k] for k in shared], dtype=float)
        estimate = rate(diff)
        if best is None or estimate.value > best.value:
            best = estimate
    return best or Estimate(math.nan, 0)


def report(work: Path, editors: list[str], edits: int, model: str, store: Path | None = None) -> str:
    """The table from the finished runs under ``work`` (archived under ``store``), or from ``store``'s
    archive where ``work`` has none."""
    from lifelong.run import RunDir

    columns = ("editor", "measure", "teacher-forced (ES/PS)", "exact", *(f"gen@{c}" for c in CONTEXTS))
    contains = [f"contains@{c}" for c in CONTEXTS]
    header = "| " + " | ".join([*columns, "gap: forced − strictest gen", *contains]) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1 + len(contains))]
    missing, commits = [], {}
    for editor in editors:
        run = RunDir(work / f"{editor}-{edits}")
        stored = run_archive.finished(run, store / f"{editor}-{edits}" if store is not None else None, kept_rows)
        if stored is not None and store is not None:
            keep_theta0(run, store)
        if stored is None:
            done = max(run.completed_step(), 0) if run.exists() else 0
            missing.append(f"{editor} ({done}/{edits} steps)")
            continue
        commits.setdefault(stored.commit, []).append(editor)
        lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(stored.results, editor)]
    note = (
        f"{edits} CounterFact edits in sequence, one per step, on {model}; generation greedy, the "
        "authors' stop; gen@: normalised exact match of the answer, contains@: the normalised answer holds "
        "the new object; n = edits; intervals: Wilson for shares, paired bootstrap over edits for the gap."
    )
    if commits:
        note += " Measured at commit " + "; ".join(f"{c}: {', '.join(e)}" for c, e in commits.items()) + "."
    if missing:
        note += " Not finished (not in the table): " + ", ".join(missing) + "."
    return "\n".join([note, "", *lines])


def write_page(
    page: Path, text: str, begin: str = BEGIN, end: str = END, title: str = "# Teacher forcing against generation"
) -> None:
    """Rewrite the block between ``begin`` and ``end`` of ``page`` (made with ``title`` when absent)."""
    body = page.read_text() if page.exists() else f"{title}\n\n{begin}\n{end}\n"
    if begin not in body or end not in body:
        raise SystemExit(f"{page}: no {begin} ... {end} block to rewrite")
    head, rest = body.split(begin, 1)
    page.write_text(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])


def table_options(parser: argparse.ArgumentParser, work: str, page: str) -> None:
    """The options every table benchmark takes (this one's and lifelong_table.py's)."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / work, help="where the runs go (they resume)")
    parser.add_argument("--report-only", action="store_true", help="the table from the finished runs, no replay")
    parser.add_argument(
        "--page",
        type=lambda text: Path(text) if text else None,  # '' = no page, as in reproduce.py
        help=f"rewrite the table block of this page (e.g. {page}); '' or absent: print only",
    )
    parser.add_argument(
        "--archive",
        type=Path,
        default=run_archive.RESULTS / work,
        help="where finished runs' figures are kept (in the repository) and read from when --work lacks them",
    )
    parser.add_argument("--no-archive", action="store_true", help="neither write nor read the archive")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the replays run (cpu, cuda, cuda:N; a run's identity and manifest record it): e.g. a lent "
        "GPU for the arms that take hours on a CPU",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--editors", default=",".join(EDITORS))
    table_options(parser, "generation-table", "docs/GENERATION.md")
    args = parser.parse_args()
    editors = [e.strip() for e in args.editors.split(",") if e.strip()]
    if not args.report_only:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        for editor in editors:
            out = args.work / f"{editor}-{args.edits}"
            print(f"== {editor}: {out}", flush=True)
            kit = None if args.no_archive else args.archive / run_archive.THETA0
            source = references_source([args.work / f"{e}-{args.edits}" for e in editors], out, kit)
            command = replay_command(editor, args.edits, out, args.model, source, args.device)
            done = subprocess.run(command, env=env, cwd=ROOT)
            if not done.returncode and not args.no_archive:  # archived as soon as it is finished
                from lifelong.run import RunDir

                run_archive.finished(RunDir(out), args.archive / out.name, kept_rows)
                keep_theta0(RunDir(out), args.archive)
            if done.returncode:
                print(f"{editor}: replay exited with {done.returncode}; its run resumes when this is run again")
    text = report(args.work, editors, args.edits, args.model, None if args.no_archive else args.archive)
    print(text)
    if args.page:
        write_page(args.page, text)


if __name__ == "__main__":
    main()
