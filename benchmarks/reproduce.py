"""Reproduce the seed papers' findings on one model, with intervals: writes docs/REPRODUCTION.md.

One row per claim of benchmarks/claims.toml (KN/MEND and general abilities, ROME and MEMIT under
sequential editing, round edits, conflicts, AlphaEdit against MEMIT, GRACE, WISE, the key-statistics
corpus; a new claim is a table there, no code): the paper's figure, ours as the mean over seeds with a
95% t interval (each seed draws its own sample of edits from the data set and is its own run), the
items behind each seed's figure, and a verdict by a rule stated in the row. Runs are ordinary run
directories under ``--work`` and resume: an interrupted reproduction carries on where it stopped, and
``--report-only`` rewrites the document from the runs already made (missing ones are reported as such,
never guessed). Finished runs are archived in ``benchmarks/results/reproduction/`` (``--archive``) and read
from there where ``--work`` has none, while their identity is the one their arm plans now. The chain
claims run each chain as its own run from θ0 (``units = "chains"``) against a control made from the
same chains (``transform``), paired by chain.

    python benchmarks/reproduce.py                      # standard scale (hours on a 2-core CPU)
    python benchmarks/reproduce.py --scale quick        # fewer edits per seed (about an hour)
    python benchmarks/reproduce.py --claims round,conflicts --seeds 5
    python benchmarks/reproduce.py --report-only        # the document from the finished runs
    python benchmarks/reproduce.py --claims-file my.toml --claims mine --out mine.md   # claims of your own

The result table of ``docs/FINDINGS.md`` (the page the README links for the findings), between
``<!-- reproduce:begin -->`` and ``<!-- reproduce:end -->``, is rewritten from the same figures when
the document written is ``docs/REPRODUCTION.md`` (``--page ''`` leaves it alone; ``--out`` elsewhere,
or ``--compare-to``, leaves it alone unless ``--page`` names it; ``--readme`` is the option's former
name).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

# The package's parts, re-exported: the command's own names for them (tests and older notebooks read them here).
from benchmarks.reproduction import measures  # noqa: E402, F401
from benchmarks.reproduction.claims import Arm, Claim, ClaimsError, load_claims  # noqa: E402, F401
from benchmarks.reproduction.measures import (  # noqa: E402, F401
    PPL_CHUNKS,
    above,
    below,
    combine,
    paired_difference,
    paired_ratio,
    ppl_ratio,
    ratio_per_seed,
    retained_difference,
    retained_estimate,
)
from benchmarks.reproduction.report import (  # noqa: E402, F401
    claim_rows,
    compare_with,
    documented_intervals,
    render,
    seed_range,
    update_page,
)
from benchmarks.reproduction.runner import BaseModel, run_arm, run_dir, stored_results  # noqa: E402, F401

DATA = ROOT.parent / "shared" / "data"
CLAIMS_FILE = ROOT / "benchmarks" / "claims.toml"
DEFAULT_SEEDS = {"standard": 20, "quick": 3}  # seeds per claim by scale (items=N: the quick scale's)
ARCHIVE = ROOT / "benchmarks" / "results" / "reproduction"  # finished runs, kept in the repository
FINDINGS = ROOT / "docs" / "FINDINGS.md"  # the page whose reproduce block is rewritten with docs/REPRODUCTION.md
CLAIMS = load_claims(CLAIMS_FILE, DATA)


def claim_runs(
    claim, args, model: BaseModel, archive: Path | None, only_arms: set[str]
) -> dict[str, list[pl.DataFrame]]:
    """Each arm's results per seed: read when finished (under --work or in the archive), else run (unless
    --report-only, or the arm is not among --arms). An arm that cannot run is reported and left out."""
    runs: dict[str, list[pl.DataFrame]] = {}
    for arm in claim.arms:
        for seed in seed_range(args, claim):
            stored = stored_results(args.work, args.scale, arm, seed, model, archive)
            runnable = not only_arms or arm.key in only_arms
            if stored is None and runnable and not args.report_only:
                print(f"[{claim.key}] {arm.key} seed {seed}", flush=True)
                try:
                    stored = run_arm(model.lm, model.base, arm, args.scale, seed, args.work, args.model, args.threads)
                    if archive is not None:  # archived as soon as made, and read back as a later reader would
                        stored = stored_results(args.work, args.scale, arm, seed, model, archive)
                except Exception as err:  # one arm that cannot run (e.g. MEND untrained) is reported, not fatal
                    print(f"[{claim.key}] {arm.key} seed {seed}: not run: {err}", file=sys.stderr, flush=True)
                    break
            if stored is not None:
                runs.setdefault(arm.key, []).append(stored)
    return runs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--scale", default="standard", help="quick, standard, or items=N (N items per seed in every arm: a smoke test)"
    )
    ap.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds per claim (each its own sample and run): default 20 at the standard scale (the independent "
        "units of a verdict: at least 20), 3 at the quick one and at items=N; a claim's max_seeds caps it",
    )
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run from here (a rerun on new seeds: e.g. 3)")
    ap.add_argument(
        "--compare-to",
        type=Path,
        default=None,
        help="a REPRODUCTION.md: say which of this invocation's figures fall inside its intervals "
        "(use with --out elsewhere; docs/FINDINGS.md is then left alone unless --page names it)",
    )
    ap.add_argument("--claims", default="all", help="comma-separated claim ids: " + ",".join(c.key for c in CLAIMS))
    ap.add_argument(
        "--claims-file",
        type=Path,
        default=CLAIMS_FILE,
        help="the claims, as data (default benchmarks/claims.toml; its header says how a claim is written)",
    )
    ap.add_argument(
        "--arms",
        default="",
        help="comma-separated arm keys to run (the claims' other arms are only read, never run): "
        "one claim's arms split across processes or machines sharing --work",
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "reproduce", help="where the runs live (resumed)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "REPRODUCTION.md")
    ap.add_argument(
        "--page",
        "--readme",
        dest="readme",
        default=None,
        help="page whose reproduce block is rewritten (default: docs/FINDINGS.md when --out is "
        "docs/REPRODUCTION.md and there is no --compare-to; '' for none)",
    )
    ap.add_argument("--report-only", action="store_true", help="write the document from finished runs; run nothing")
    ap.add_argument("--threads", default=None)
    ap.add_argument(
        "--archive",
        type=Path,
        default=ARCHIVE,
        help="where finished runs are kept (in the repository) and read from when --work lacks them, "
        "each only while its identity is the one its arm plans now",
    )
    ap.add_argument("--no-archive", action="store_true", help="neither write nor read the archive")
    args = ap.parse_args(argv)
    if args.readme is None:  # only the project's own document rewrites the findings page's table (not a
        # rerun compared with it, nor a partial run written elsewhere)
        writes_project_doc = args.out.resolve() == (ROOT / "docs" / "REPRODUCTION.md").resolve()
        args.readme = str(FINDINGS) if writes_project_doc and args.compare_to is None else ""
    if args.scale not in ("quick", "standard") and not (
        args.scale.startswith("items=") and args.scale[6:].isdigit() and int(args.scale[6:]) > 0
    ):
        ap.error(f"--scale {args.scale!r}: expected quick, standard or items=N with N ≥ 1")
    if args.seeds is None:
        args.seeds = DEFAULT_SEEDS.get(args.scale, DEFAULT_SEEDS["quick"])
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    if args.first_seed < 0:
        ap.error("--first-seed must be at least 0")
    if args.compare_to is not None and not args.compare_to.is_file():
        ap.error(f"--compare-to {args.compare_to}: no such file")
    if args.compare_to is not None and args.out.resolve() == args.compare_to.resolve():
        ap.error("--compare-to and --out name the same file: write this invocation's document elsewhere")
    try:
        loaded = CLAIMS if args.claims_file.resolve() == CLAIMS_FILE.resolve() else load_claims(args.claims_file, DATA)
    except ClaimsError as err:
        raise SystemExit(str(err)) from None
    known = {c.key: c for c in loaded}
    wanted = list(known) if args.claims == "all" else [k.strip() for k in args.claims.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in known]
    if unknown:
        ap.error(f"unknown claim(s) {', '.join(unknown)}: expected {', '.join(known)}")
    if not DATA.is_dir() and not args.report_only:
        ap.error(f"the data sets are not at {DATA}: the reproduction reads CounterFact, zsRE and Pitfalls from there")
    claims = [known[k] for k in wanted]
    only_arms = {k.strip() for k in args.arms.split(",") if k.strip()}
    unknown_arms = only_arms - {arm.key for claim in claims for arm in claim.arms}
    if unknown_arms:
        ap.error(f"--arms {', '.join(sorted(unknown_arms))}: no such arm in the chosen claims")

    from lifelong.core.machine import runtime_header

    t0 = time.perf_counter()
    archive = None if args.no_archive else args.archive
    model = BaseModel(args.model)  # loaded on first use: to check a stored run's identity, or to run
    results = {}
    for claim in claims:
        runs = claim_runs(claim, args, model, archive, only_arms)
        results[claim.key] = claim_rows(claim, runs, len(seed_range(args, claim)))
    device = model.lm.device if model.loaded else "cpu"
    doc, table = render(claims, results, args, time.perf_counter() - t0, runtime_header(device))
    if args.compare_to is not None:
        comparison = compare_with(documented_intervals(args.compare_to.read_text()), results, claims)
        print("\n".join(comparison))
        doc += f"\n## Against {args.compare_to}\n\n" + "\n".join(comparison) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(doc)
    print(f"wrote {args.out}")
    if args.readme:
        update_page(Path(args.readme), table, args.out)


if __name__ == "__main__":
    main()
