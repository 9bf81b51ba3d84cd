"""``lifelong judge RUN``: an LLM judge grades the answers a run stored (docs/PROBES.md, "Judging generations").

The answers come from the run's ``generations`` parts (``--probe edit_quality:generation=...``); the judge
(:class:`probes.judge.ChatJudge`, R's prompt) sees each distinct (question, gold answer, generated text)
once. Its verdicts are kept in ``DIR/judged/verdicts/`` as they come, so a pass that stops (an error, a
Ctrl-C) resumes without asking again; when every answer has one, the rows of protocol
``gen_judge@SETTING`` are written to ``DIR/judged/results.parquet``, which ``RunDir.results`` (so
``show``, ``compare``, ``export``) reads beside the run's own rows. A run that goes on after it was judged
is judged again by the same command: only its new answers are sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from lifelong.core.bars import bar
from lifelong.run import RunDir
from probes.judge import Judge, Key, Verdict, judge_all, judged_rows, to_judge
from streams.errors import UserError

FLUSH_EVERY = 50  # verdicts per stored part: what an interruption can cost at most


@dataclass(frozen=True)
class JudgeReport:
    answers: int  # distinct answers the rows need
    sent: int  # asked in this pass
    earlier: int  # graded by an earlier pass of the same judge
    correct: int  # of all the answers
    unclear: int  # replies of this judge that were neither "A" nor "B" (counted incorrect, as R does)
    rows: int
    through: int  # the last step judged


def judge_run(run: RunDir, judge: Judge, *, workers: int = 1, progress: bool = True) -> JudgeReport:
    """Grade every stored answer of ``run`` that ``judge`` has not graded yet, then write the judge's rows."""
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    run.manifest()
    through = run.completed_step()
    answers = run.generations()
    keys = to_judge(answers)
    if not keys:
        raise UserError(
            f"{run.path}: no stored generated answers to judge (replay with e.g. "
            "--probe edit_quality:generation=question+qa)"
        )
    stored = run.verdicts().filter(pl.col("judge") == judge.name)
    known: dict[Key, tuple[bool, str | None]] = {
        (q, a, t): (c, r)
        for q, a, t, c, r in stored.select("question", "answer", "text", "correct", "reply").iter_rows()
    }
    pending = [k for k in keys if k not in known]
    buffer: list[dict] = []

    def keep(key: Key, verdict: Verdict) -> None:
        known[key] = (verdict.correct, verdict.reply)
        buffer.append(
            {
                "judge": judge.name,
                "question": key[0],
                "answer": key[1],
                "text": key[2],
                "correct": verdict.correct,
                "reply": verdict.reply,
            }
        )
        shown.update(1)
        if len(buffer) >= FLUSH_EVERY:
            run.write_verdicts(buffer)
            buffer.clear()

    shown = bar(total=len(pending), desc="judging", unit="answer", show=progress)
    try:
        judge_all(judge, pending, workers=workers, on_verdict=keep)
    finally:
        run.write_verdicts(buffer)  # what was graded before a failure is kept
        shown.close()
    verdicts = {k: known[k][0] for k in keys}
    own = run.own_results()
    rows = judged_rows(answers, verdicts, own)
    stamps = own.select("step", "run_id", "timestamp", "preset").unique("step", keep="first")  # the run's own
    rows = rows.join(stamps, on="step", how="left")
    run.write_judged_results(rows, through, judge.name)
    replies = [known[k][1] for k in keys]
    return JudgeReport(
        answers=len(keys),
        sent=len(pending),
        earlier=len(keys) - len(pending),
        correct=sum(verdicts.values()),
        unclear=sum(r is not None and r not in ("A", "B") for r in replies),
        rows=rows.height,
        through=through,
    )


def describe(run: RunDir, report: JudgeReport, name: str) -> str:
    unclear = (
        f"; {report.unclear} replies were neither 'A' nor 'B' and count as incorrect, as in the authors' code"
        if report.unclear
        else ""
    )
    return (
        f"{run.path}: {report.answers} distinct answers of steps 0..{report.through} judged by {name} "
        f"({report.sent} asked now, {report.earlier} from earlier passes), {report.correct} correct{unclear}; "
        f"{report.rows} rows of protocol gen_judge@SETTING written to {run.judged_results_path} "
        "(lifelong show prints them)"
    )
