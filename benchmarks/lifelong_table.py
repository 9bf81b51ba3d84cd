"""Editors built for long streams, side by side over 1,000 CounterFact edits (issue #39): one command,
one page (docs/LIFELONG.md).

Each arm replays the first ``--edits`` records of the toolkit's CounterFact file (10,000 records) in batches of
``--batch`` (default 1,000 in batches of 100: ten steps) on the default model, with after every
step: the step's edit quality (ES/PS/NS), the retention of every edit so far (the forgetting
curve), the perplexity ratio on the first 16,384 WikiText-2 tokens (t interval over its 128-token
chunks) and the edited weights' norm growth. WISE, at about a minute per edit here, runs over the
first ``--wise-edits`` (200). The page gives, per arm, those figures with n and 95% intervals,
seconds per edit as a ratio to a 1,024-token forward measured in this command's process, and one
verdict per claim of the authors, each by the rule in :data:`CLAIMS`, fixed before any run.

Runs are ordinary run directories under ``--work`` and resume: stop the command and start it again
to carry on; ``--arms`` picks arms (two commands with disjoint arms can run side by side, each at one
thread); ``--report-only`` writes the page from what is finished. θ0's references are computed once
and copied by the other arms' runs (``--references-from``).

    python benchmarks/lifelong_table.py [--arms memit,alphaedit,...] [--work runs/lifelong-table]
    python benchmarks/lifelong_table.py --report-only --page docs/LIFELONG.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import run_archive  # noqa: E402
from generation_table import references_source, replay_argv, table_options, write_page  # noqa: E402

from lifelong.core.stats import Estimate, format_estimate, over_seeds, rate  # noqa: E402


@dataclass(frozen=True)
class Arm:
    name: str
    editor: str
    overrides: dict[str, str] = field(default_factory=dict)
    wise: bool = False  # over --wise-edits only


ARMS = (
    Arm("memit", "memit"),
    Arm("alphaedit", "alphaedit"),
    Arm("emmet", "emmet"),
    Arm("ultraedit", "ultraedit"),
    # a variant, not the authors': their lr (for 7-8B models) barely edits this model (docs/EDITORS.md)
    Arm("ultraedit@lr1e-4", "ultraedit", {"lr": "1e-4"}),
    # trained on a split without these edits' subjects: `lifelong train-rledit --training cpu-capped
    # --data split:counterfact-long` first (the default split holds the first 1,000 records)
    Arm("rledit", "rledit", {"training": "cpu-capped", "train_data": "split:counterfact-long"}),
    Arm("memoir", "memoir"),
    Arm("grace", "grace"),
    Arm("memit+nas", "memit", {"stabilise": "nas"}),
    Arm("memit+prune", "memit", {"stabilise": "prune"}),
    Arm("alphaedit+nas", "alphaedit", {"stabilise": "nas"}),
    Arm("alphaedit+prune", "alphaedit", {"stabilise": "prune"}),
    Arm("wise", "wise", wise=True),
)
# CounterFact as the editing toolkit ships it (10,000 records; ROME's file has 500)
STREAM = "dataset:counterfact_easyedit"
PPL_TOKENS = 16384
PROBES = (
    "edit_quality",
    "retention:schedule=every:1,sample=none",  # every edit so far, not a sample: 1,000 teacher-forced scores
    f"perplexity:corpus=wikitext,max_tokens={PPL_TOKENS},schedule=every:1",
    "weight_drift",
)
BEGIN, END = "<!-- lifelong-table:begin -->", "<!-- lifelong-table:end -->"

# The authors' claims and the rules that decide them, fixed before the runs (docs/LIFELONG.md repeats
# them). Each compares an arm with its measured control on the same edits, never with 0.
NON_INFERIORITY = 0.05  # retained-ES margin: "≥" holds when the difference's interval stays above −0.05
CHEAPER = 0.5  # "a fraction of its cost": seconds per edit at most half the control's
CLAIMS = (
    (
        "UltraEdit ≥ AlphaEdit on retention, at a fraction of its cost (UltraEdit paper)",
        "ultraedit",
        "alphaedit",
        "retained ES at the end, UltraEdit − AlphaEdit, paired over the same edits (bootstrap): supported "
        f"when its 95% interval lies above −{NON_INFERIORITY} and UltraEdit's seconds per edit are at most "
        f"{CHEAPER} × AlphaEdit's (each in forwards of the machine that ran it); contradicted when the "
        f"interval lies below −{NON_INFERIORITY} or UltraEdit costs more per edit; otherwise inconclusive",
    ),
    (
        "NAS lengthens MEMIT's horizon (the NAS paper)",
        "memit+nas",
        "memit",
        "retained ES at the end, MEMIT+NAS − MEMIT, paired (bootstrap): supported when the interval lies "
        "above 0, contradicted below 0, otherwise inconclusive; not testable when MEMIT itself retains "
        "≥ 0.95 of its edits (no horizon reached)",
    ),
    (
        "PRUNE keeps perplexity (the PRUNE paper), on MEMIT",
        "memit+prune",
        "memit",
        "log perplexity ratio at the end, MEMIT+PRUNE − MEMIT, paired over the corpus's chunks (t): "
        "supported when the interval lies below 0, contradicted above 0, otherwise inconclusive; not "
        "testable when MEMIT's own ratio is ≤ 1.05",
    ),
    (
        "PRUNE keeps perplexity (the PRUNE paper), on AlphaEdit",
        "alphaedit+prune",
        "alphaedit",
        "as for MEMIT, AlphaEdit+PRUNE − AlphaEdit",
    ),
)


def replay_command(
    arm: Arm, edits: int, batch: int, out: Path, model: str, references: Path | None, device: str = "cpu"
) -> list[str]:
    sets = [x for k, v in arm.overrides.items() for x in ("--set", f"{k}={v}")]
    probes = [x for p in PROBES for x in ("--probe", p)]
    borrow = ["--references-from", str(references)] if references else []
    steps = ["--batch-size", str(batch), "--steps", str(math.ceil(edits / batch)), "--probe-every", "1"]
    return replay_argv(model, arm.editor, STREAM, out, [*sets, *steps, *probes, "--quiet", *borrow], device)


def measure_forward(work: Path, model: str, device: str = "cpu") -> float:
    """Seconds of a 1,024-token forward in this process (one thread) on ``device``, appended to
    ``forward.jsonl``."""
    import torch
    from bench_scale import forward_seconds

    from lifelong.core.models import load_model

    torch.set_num_threads(1)
    seconds = forward_seconds(load_model(model, device=device), repeats=5)
    with (work / "forward.jsonl").open("a") as f:
        f.write(json.dumps({"model": model, "threads": 1, "device": device, "seconds": seconds}) + "\n")
    return seconds


def forward_yardstick(work: Path, device: str = "cpu") -> float:
    """The median of the forwards measured under ``work`` on ``device`` (records without one: the CPU's),
    so that an arm run on a GPU is set against a GPU's forward, and a CPU arm against the CPU's."""
    path = work / "forward.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    values = [r["seconds"] for r in records if r.get("device", "cpu") == device]
    return float(np.median(values)) if values else math.nan


# ------------------------------------------------------------------------------------------------ reading runs


def _rows(results: pl.DataFrame, probe: str, metric: str, protocol: str | None = None) -> pl.DataFrame:
    rows = results.filter((pl.col("probe") == probe) & (pl.col("metric") == metric))
    return rows.filter(pl.col("protocol") == protocol) if protocol is not None else rows


def own_step(results: pl.DataFrame, metric: str, protocol: str) -> dict[str, float]:
    rows = _rows(results, "edit_quality", metric, protocol).filter(pl.col("step") > 0)
    rows = rows.sort("step").unique("edit_id", keep="first").sort("edit_id")  # fixed order: reproducible bootstrap
    return dict(zip(rows["edit_id"].to_list(), rows["value"].to_list(), strict=True))


def at_theta0(results: pl.DataFrame) -> dict[str, float]:
    """edit id -> ES on the unedited model (what "took hold" is measured against)."""
    rows = _rows(results, "edit_quality", "efficacy", "es").filter(pl.col("step") == 0)
    return dict(zip(rows["edit_id"].to_list(), rows["value"].to_list(), strict=True))


def retained(results: pl.DataFrame, protocol: str, step: int | None = None) -> dict[str, float]:
    """edit id -> retained (0/1) at ``step`` (default: the last)."""
    rows = _rows(results, "retention", "retention", protocol)
    step = max(rows["step"].to_list()) if step is None else step
    rows = rows.filter(pl.col("step") == step)
    return dict(zip(rows["edit_id"].to_list(), rows["value"].to_list(), strict=True))


def chunk_log_ppl(results: pl.DataFrame, step: int) -> dict[str, float]:
    """corpus chunk -> mean token NLL at ``step`` (its log perplexity)."""
    tokens = _rows(results, "perplexity", "chunk_tokens").filter(pl.col("step") == 0)
    count = dict(zip(tokens["edit_id"].to_list(), tokens["value"].to_list(), strict=True))
    nll = _rows(results, "perplexity", "chunk_nll").filter(pl.col("step") == step)
    return {k: v / count[k] for k, v in zip(nll["edit_id"].to_list(), nll["value"].to_list(), strict=True)}


def scalar(results: pl.DataFrame, probe: str, metric: str, step: int, protocol: str | None = None) -> float:
    rows = _rows(results, probe, metric, protocol).filter(pl.col("step") == step)
    return float(rows["value"][0]) if rows.height else math.nan


@dataclass
class ArmResult:
    arm: Arm
    results: pl.DataFrame
    last: int
    edits: int
    seconds_per_edit: float
    forward: float = math.nan  # a 1,024-token forward's seconds on the machine that ran it
    commit: str = "unknown"  # the commit that measured it
    device: str = "cpu"  # where it ran (the run's identity)


def kept_rows(results: pl.DataFrame) -> pl.DataFrame:
    """The rows this table reads (what an archived arm keeps): θ0's ES and each step's edit quality, the
    ES and exact retention of every step, θ0's chunk sizes and the last step's chunk NLLs, and every
    step's perplexity ratio and weight drift."""
    last = results["step"].max()
    probe, metric, protocol, step = pl.col("probe"), pl.col("metric"), pl.col("protocol"), pl.col("step")
    quality = (probe == "edit_quality") & ((step > 0) | ((metric == "efficacy") & (protocol == "es")))
    retention = (probe == "retention") & (metric == "retention") & protocol.is_in(["es", "exact"])
    chunks = (probe == "perplexity") & (
        ((metric == "chunk_tokens") & (step == 0)) | ((metric == "chunk_nll") & (step == last))
    )
    summary = (probe == "perplexity") & metric.is_in(["ratio", "ratio_low", "ratio_high"])
    drift = (probe == "weight_drift") & (metric == "norm_ratio")
    return results.filter(quality | retention | chunks | summary | drift)


def arm_result(
    arm: Arm, results: pl.DataFrame, progress: dict, forward: float, commit: str, device: str = "cpu"
) -> ArmResult:
    edits = len(own_step(results, "efficacy", "es"))
    # the median step's editing seconds per edit: wall time, so a step during which the process was
    # paused or starved by other work (it happens on a shared machine) does not set the figure
    per_step = [float(t["edit"]) for t in progress["seconds"].values() if "edit" in t]
    batch = edits / max(len(per_step), 1)
    seconds = float(np.median(per_step)) / batch if per_step else math.nan
    return ArmResult(arm, results, progress["completed_step"], edits, seconds, forward, commit, device)


def load_arm(work: Path, arm: Arm, store: Path | None = None) -> ArmResult | str:
    """The finished arm's results, or why it is not in the table. A finished run under ``work`` is read
    (and archived under ``store`` with the forward yardstick measured beside it); without one, the arm's
    archive under ``store`` is."""
    from lifelong.run import RunDir

    run = RunDir(work / arm.name)
    refusal = work / f"{arm.name}.refused"
    if refusal.is_file():
        return f"{arm.name} (refused: {refusal.read_text().strip().removeprefix('lifelong: error: ')})"
    device = run.manifest().get("identity", {}).get("device", "cpu") if run.exists() else "cpu"
    forward = f"1,024-token forward, one thread, median, on {device}"
    extra = {"forward_seconds": forward_yardstick(work, device), "forward": forward}
    stored = run_archive.finished(run, store / arm.name if store is not None else None, kept_rows, extra)
    if stored is not None:
        forward = float(stored.extra.get("forward_seconds", math.nan))
        device = stored.manifest.get("identity", {}).get("device", "cpu")
        return arm_result(arm, stored.results, stored.progress, forward, stored.commit, device)
    progress = run.progress() if run.exists() else None
    if progress is None:
        return f"{arm.name} (not started)"
    if progress["total_steps"] is None:
        return f"{arm.name} (stopped before its first step)"
    return f"{arm.name} ({max(progress['completed_step'], 0)}/{progress['total_steps']} steps)"


def _paired(a: dict[str, float], b: dict[str, float]) -> list[float]:
    shared = sorted(set(a) & set(b))
    return [a[k] - b[k] for k in shared]


def curve(result: ArmResult, points: int = 5) -> str:
    steps = sorted({int(s) for s in _rows(result.results, "retention", "retention", "es")["step"]} - {0})
    picks = [steps[int(i)] for i in np.unique(np.linspace(0, len(steps) - 1, min(points, len(steps))).round())]
    batch = result.edits / max(result.last, 1)
    shares = [np.mean(list(retained(result.results, "es", s).values())) for s in picks]
    return " → ".join(f"{share:.2f}@{round(s * batch)}" for share, s in zip(shares, picks))


def arm_row(result: ArmResult) -> list[str]:
    r = result.results
    ratio = scalar(r, "perplexity", "ratio", result.last, "corpus")
    low = scalar(r, "perplexity", "ratio_low", result.last, "corpus")
    high = scalar(r, "perplexity", "ratio_high", result.last, "corpus")
    chunks = len(chunk_log_ppl(r, result.last))
    norm = scalar(r, "weight_drift", "norm_ratio", result.last, protocol="max")
    return [
        result.arm.name,
        str(result.edits),
        format_estimate(rate(list(at_theta0(r).values()))),
        format_estimate(rate(list(own_step(r, "efficacy", "es").values()))),
        format_estimate(rate(list(own_step(r, "generalization", "ps").values()))),
        format_estimate(rate(list(own_step(r, "locality", "ns").values()))),
        format_estimate(rate(list(retained(r, "es").values()))),
        format_estimate(rate(list(retained(r, "exact").values()))),
        curve(result),
        format_estimate(Estimate(ratio, chunks, low, high, "t")),
        f"{norm:.4f}" if not math.isnan(norm) else "n/a",
        _cost(result),
        result.commit if result.device == "cpu" else f"{result.commit} on {result.device}",
    ]


def _cost(result: ArmResult) -> str:
    if math.isnan(result.seconds_per_edit):
        return "n/a"
    if math.isnan(result.forward):
        return f"{result.seconds_per_edit:.3g} s"
    seconds, forward = result.seconds_per_edit, result.forward
    return f"{seconds:.3g} s ({seconds / forward:.3g}× of {forward:.3g} s)"


def cost_ratio(a: ArmResult, b: ArmResult) -> float:
    """``a``'s seconds per edit over ``b``'s, each in forwards of the machine that ran it (arms run on
    different machines); in plain seconds unless both forwards were measured, never mixing the two."""
    if a.forward > 0 and b.forward > 0:  # NaN fails the comparison
        return (a.seconds_per_edit / a.forward) / (b.seconds_per_edit / b.forward)
    return a.seconds_per_edit / b.seconds_per_edit


def verdict(claim, arms: dict[str, ArmResult]) -> tuple[str, str]:
    """(figure, verdict) of one claim by its rule."""
    title, test, control = claim[0], claim[1], claim[2]
    if test not in arms or control not in arms:
        return "not run", "no verdict: an arm is not finished"
    a, b = arms[test], arms[control]
    if "PRUNE" in title:
        base = scalar(b.results, "perplexity", "ratio", b.last, "corpus")
        diff = over_seeds(_paired(chunk_log_ppl(a.results, a.last), chunk_log_ppl(b.results, b.last)))
        figure = f"Δ log ppl ratio {format_estimate(diff)}; {control} ratio {base:.3g}"
        if base <= 1.05:
            return figure, f"not testable: {control}'s perplexity ratio is {base:.3g} (≤ 1.05)"
        return figure, _sided(diff, "below")
    diff = rate(_paired(retained(a.results, "es"), retained(b.results, "es")))
    figure = f"Δ retained ES {format_estimate(diff)}"
    if "NAS" in title:
        kept = float(np.mean(list(retained(b.results, "es").values())))
        if kept >= 0.95:
            return figure, f"not testable: {control} retains {kept:.2f} of its edits"
        return figure, _sided(diff, "above")
    cost = cost_ratio(a, b)
    figure += f"; cost ratio {cost:.2f}"
    assert diff.low is not None and diff.high is not None
    if diff.low > -NON_INFERIORITY and cost <= CHEAPER:
        return figure, "supported"
    if diff.high < -NON_INFERIORITY or cost > 1:
        return figure, "contradicted"
    return figure, "inconclusive"


def _sided(diff: Estimate, claimed: str) -> str:
    """Supported when the difference's interval lies wholly on the ``claimed`` side of 0 ("above" or
    "below"), contradicted when it lies wholly on the other, otherwise inconclusive."""
    if diff.low is None or diff.high is None:
        return "inconclusive (no interval)"
    above, below = diff.low > 0, diff.high < 0
    if (above and claimed == "above") or (below and claimed == "below"):
        return "supported"
    return "contradicted" if above or below else "inconclusive"


def report(work: Path, model: str, edits: int, batch: int, wise_edits: int, store: Path | None = None) -> str:
    loaded = {arm.name: load_arm(work, arm, store) for arm in ARMS}
    arms = {k: v for k, v in loaded.items() if isinstance(v, ArmResult)}
    missing = [v for v in loaded.values() if isinstance(v, str)]
    columns = (
        "arm",
        "edits",
        "ES at θ0",
        "ES own step",
        "PS own step",
        "NS own step",
        "retained ES at end",
        "retained exact at end",
        "forgetting curve (retained ES @ edits)",
        f"perplexity ratio at end ({PPL_TOKENS:,} WikiText-2 tokens)",
        "max ‖W_t‖/‖W_0‖ at end",
        "s / edit (× a 1,024-token forward)",
        "measured at commit",
    )
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(arm_row(a)) + " |" for a in arms.values()]
    claims = ["| claim | figure | verdict |", "|---|---|---|"]
    for claim in CLAIMS:
        figure, said = verdict(claim, arms)
        claims.append(f"| {claim[0]} | {figure} | {said} |")
    note = (
        f"{edits:,} CounterFact edits in batches of {batch} on {model} (WISE: the first {wise_edits}); "
        f"n = edits (own step, retained) or corpus chunks (perplexity); intervals: Wilson for shares, t over "
        "chunks for the perplexity ratio. Seconds per edit are given as a ratio to a 1,024-token forward "
        "measured at one thread on the machine and device that ran the arm (the median of that machine's "
        "measurements), since arms may run on different machines; cost ratios compare these ratios. One run "
        "per arm, one seed."
    )
    if missing:
        note += " Not finished (not in the table): " + ", ".join(missing) + "."
    return "\n".join([note, "", *lines, "", *claims])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--wise-edits", type=int, default=200)
    parser.add_argument("--arms", default=",".join(a.name for a in ARMS))
    table_options(parser, "lifelong-table", "docs/LIFELONG.md")
    args = parser.parse_args()
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(names) - {a.name for a in ARMS})
    if unknown:
        raise SystemExit(f"unknown arms: {', '.join(unknown)} (known: {', '.join(a.name for a in ARMS)})")
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        measure_forward(args.work, args.model, args.device)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        runs = [args.work / a.name for a in ARMS]
        by_name = {a.name: a for a in ARMS}
        for arm in (by_name[n] for n in names):  # in the order given
            out = args.work / arm.name
            print(f"== {arm.name}: {out}", flush=True)
            edits = args.wise_edits if arm.wise else args.edits
            source = references_source(runs, out)
            command = replay_command(arm, edits, args.batch, out, args.model, source, args.device)
            done = subprocess.run(command, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
            sys.stderr.write(done.stderr)  # --quiet: notes and errors only
            refusal = args.work / f"{arm.name}.refused"
            refusal.unlink(missing_ok=True)
            if not done.returncode and not args.no_archive:
                load_arm(args.work, arm, args.archive)  # archived as soon as it is finished
            if done.returncode:
                print(f"{arm.name}: replay exited with {done.returncode}; its run resumes when this is run again")
                errors = [line for line in done.stderr.splitlines() if line.startswith("lifelong: error:")]
                if errors:  # a refusal (e.g. RLEdit's hypernetwork trained on these edits): the table says why
                    refusal.write_text(errors[-1] + "\n")
    store = None if args.no_archive else args.archive
    text = report(args.work, args.model, args.edits, args.batch, args.wise_edits, store)
    print(text)
    if args.page:
        write_page(args.page, text, BEGIN, END, "# Editors over long streams")


if __name__ == "__main__":
    main()
