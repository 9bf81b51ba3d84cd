"""benchmarks/reproduce.py: verdict rules by hand, and one small reproduction end to end on a tiny model."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from lifelong.core.stats import Estimate
from streams.readers import default_data_dir

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module


R = load_reproduce()


@pytest.fixture(autouse=True)
def archive_outside_the_repository(tmp_path, monkeypatch):
    """The command's default archive is the repository's benchmarks/results/reproduction: tests keep theirs
    in their own folder."""
    monkeypatch.setattr(R, "ARCHIVE", tmp_path / "archive")


def test_above_and_below_read_the_whole_interval():
    assert R.above(Estimate(0.3, 3, 0.1, 0.5), 0.0) == "yes"
    assert R.above(Estimate(0.3, 3, -0.1, 0.5), 0.0) == "?"
    assert R.above(Estimate(-0.3, 3, -0.5, -0.1), 0.0) == "no"
    assert R.above(Estimate(0.3, 1), 0.0) == "?"  # one seed: no interval, no verdict
    assert R.above(Estimate(math.nan, 0), 0.0) == "n/a"
    assert R.below(Estimate(0.2, 3, 0.1, 0.3), 0.5) == "yes"
    assert R.below(Estimate(0.6, 3, 0.55, 0.7), 0.5) == "no"


def test_combine_and_paired_difference():
    assert R.combine(["yes", "yes"]) == "holds"
    assert R.combine(["yes", "no", "?"]) == "does not hold"
    assert R.combine(["yes", "?"]) == "inconclusive"
    assert R.combine(["yes", "n/a"]) == "not run"
    d = R.paired_difference([0.5, 1.0, 0.6], [0.0, 0.0, 0.1])  # retained shares: differences 0.5, 1.0, 0.5
    assert d.n == 3 and d.value == pytest.approx(2 / 3)
    half = 4.302652729911275 * math.sqrt(1 / 12) / math.sqrt(3)  # t(0.975, 2) · s / √n, s² = 1/12
    assert d.low == pytest.approx(2 / 3 - half) and d.high == 1.0  # 2/3 + half > 1: cut to the range


def test_alphaedit_claim_runs_the_papers_batches_at_standard_scale_with_one_seed(monkeypatch, tmp_path):
    """Standard scale: batches of 100 (the AlphaEdit paper's), one seed (a run takes over an hour),
    and the retained-fraction figures then carry intervals over the edits instead of over seeds."""
    import argparse

    import numpy as np

    from lifelong.core.stats import newcombe_difference, wilson

    claim = next(c for c in R.CLAIMS if c.key == "alphaedit")
    assert [a.batch_at("standard") for a in claim.arms] == [100, 100]
    assert [a.batch_at("quick") for a in claim.arms] == [10, 10]
    assert claim.arms[0].batch_at("items=4") == 10  # smoke tests run the quick scale's batches
    args = argparse.Namespace(seeds=3, first_seed=5, scale="standard")
    assert list(R.seed_range(args, claim)) == [5]
    assert list(R.seed_range(argparse.Namespace(seeds=3, first_seed=5, scale="quick"), claim)) == [5, 6, 7]
    assert R.run_dir(tmp_path, "standard", claim.arms[1], 0).name == (
        "alphaedit-alphaedit-counterfact-easyedit1000-batch100-seed0"  # more edits than the ROME sample's 500
    )
    assert R.run_dir(tmp_path, "quick", claim.arms[1], 0).name == "alphaedit-alphaedit-counterfact30-batch10-seed0"
    assert claim.arms[0].source_at("items=4") == "counterfact"  # smoke tests draw from the quick scale's set

    held = {"a": np.array([1.0] * 280 + [0.0] * 20), "m": np.array([1.0] * 240 + [0.0] * 58 + [np.nan] * 2)}
    monkeypatch.setattr(R.measures, "retained_items", lambda frame, protocol="es": held[frame])
    one = R.retained_estimate(["m"])
    assert (one.value, one.n) == (pytest.approx(240 / 298), 298)
    assert (one.low, one.high) == pytest.approx(wilson(240, 298))
    d = R.retained_difference(["a"], ["m"])
    assert d.value == pytest.approx(280 / 300 - 240 / 298)
    assert (d.low, d.high) == pytest.approx(newcombe_difference(280, 300, 240, 298))
    assert d.low > 0  # 0.93 against 0.81: the interval clears 0


def test_documented_intervals_are_read_back_and_compared():
    doc = "\n".join(
        [
            "| claim | the paper's figure | ours | verdict |",
            "| GRACE | x | grace: ES 1 [1.000, 1.000] n=3 | **holds** |",  # the summary table: not read
            "## GRACE keeps locality (`--claims grace`)",
            "| figure | mean [95% CI] n=seeds | items |",
            "|---|---|---|",
            "| grace: ES at own step | 0.9889 [0.941, 1.037] n=3 | 30 prompts per seed |",
            "| grace: PS exact at own step | 0.1667 [-0.165, 0.498] n=3 | 30 prompts per seed |",
            "## KN hurts (`--claims kn`)",
            "| kn: perplexity ratio at step 5 | 1.129e+15 [7508, 1.699e+26] n=3 | ratio |",
            "| kn: not a figure | n/a n=0 | |",
        ]
    )
    got = R.documented_intervals(doc)
    assert got == {
        ("grace", "grace: ES at own step"): (0.9889, 0.941, 1.037),
        ("grace", "grace: PS exact at own step"): (0.1667, -0.165, 0.498),
        ("kn", "kn: perplexity ratio at step 5"): (1.129e15, 7508.0, 1.699e26),
    }
    claims = [c for c in R.CLAIMS if c.key in ("grace", "kn")]
    results = {
        "grace": (
            [
                ("grace: ES at own step", Estimate(0.95, 3, 0.9, 1.0), ""),
                ("grace: PS exact at own step", Estimate(0.6, 3, 0.5, 0.7), ""),
            ],
            "holds",
            "",
        ),
        "kn": ([("kn: perplexity ratio at step 5", Estimate(2e10, 3, 1.0, 1e20), "")], "holds", ""),
    }
    lines = R.compare_with(got, results, claims)
    assert lines[-1] == "2 of 3 figures of this run fall inside the documented 95% intervals."
    assert sum("**no**" in line for line in lines) == 1 and "PS exact" in next(row for row in lines if "**no**" in row)


def test_scale_items_and_bad_arguments(capsys):
    arm = R.CLAIMS[0].arms[0]
    assert arm.count("items=4") == 4 and arm.count("quick") == arm.items["quick"]
    for argv in (
        ["--scale", "huge"],
        ["--claims", "nope"],
        ["--seeds", "0"],
        ["--first-seed", "-1"],
        ["--compare-to", "no/such.md"],
        ["--claims", "alphaedit", "--arms", "rome"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            R.main(argv + ["--report-only"])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown claim" in err and "--arms rome: no such arm" in err


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
def test_one_seed_perplexity_ratios_carry_the_interval_over_chunks():
    """One seed: an arm's ratio with the probe's interval over the corpus's chunks, and a ratio of two
    arms paired chunk by chunk, by hand."""
    import polars as pl

    base = [100.0, 120.0, 90.0, 110.0]  # θ0's summed NLL per chunk, 50 tokens each

    def run(nll, low, high):
        ratio = math.exp((sum(nll) - sum(base)) / 200)
        rows = [(0, "ratio", None, 1.0), (0, "ratio_low", None, 1.0), (0, "ratio_high", None, 1.0)]
        rows += [(0, "chunk_nll", f"chunk:{i}", v) for i, v in enumerate(base)]
        rows += [(0, "chunk_tokens", f"chunk:{i}", 50.0) for i in range(4)]
        rows += [(10, "ratio", None, ratio), (10, "ratio_low", None, low), (10, "ratio_high", None, high)]
        rows += [(10, "chunk_nll", f"chunk:{i}", v) for i, v in enumerate(nll)]
        return pl.DataFrame(
            [
                {"probe": "perplexity", "protocol": "corpus", "step": s, "metric": m, "edit_id": e, "value": v}
                for s, m, e, v in rows
            ]
        )

    memit, alpha = run([130.0, 150.0, 100.0, 140.0], 1.05, 1.5), run([110.0, 125.0, 95.0, 118.0], 1.0, 1.1)
    e = R.ratio_per_seed([memit])
    assert (e.low, e.high, e.n) == (1.05, 1.5, R.PPL_CHUNKS)
    # Paired: per chunk memit − alphaedit = 20, 25, 5, 22 nats over 50 tokens: means 0.4, 0.5, 0.1, 0.44,
    # mean 0.36, sd 0.17814 (equal chunks: the t interval of the means), t(0.975, 3) = 3.18245.
    d = R.paired_ratio([memit], [alpha])
    half = 3.182446305284263 * 0.1781385228784985 / 2
    assert d.n == 4 and d.value == pytest.approx(math.exp(0.36))
    assert (d.low, d.high) == (pytest.approx(math.exp(0.36 - half)), pytest.approx(math.exp(0.36 + half)))
    assert d.value == pytest.approx(R.ppl_ratio()(memit) / R.ppl_ratio()(alpha))
    # A run from before the probe recorded chunks: the ratios alone, no interval.
    old = memit.filter(pl.col("metric") == "ratio")
    assert R.ratio_per_seed([old]).low is None and R.paired_ratio([old], [alpha]).low is None
    # Several seeds: the geometric mean over seeds as before.
    assert R.ratio_per_seed([memit, alpha]).value == pytest.approx(
        math.sqrt(R.ppl_ratio()(memit) * R.ppl_ratio()(alpha))
    )


@pytest.mark.data
@pytest.mark.skipif(not default_data_dir().is_dir(), reason="the reproduction reads ../shared/data (or $LIFELONG_DATA)")
def test_small_reproduction_end_to_end(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- reproduce:begin -->\nSTALE TABLE\n<!-- reproduce:end -->\nrest\n")
    out = tmp_path / "R.md"
    args = [
        "--model",
        "tiny-llama",
        "--scale",
        "items=2",
        "--seeds",
        "2",
        "--claims",
        "grace,round",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(out),
        "--readme",
        str(readme),
        "--threads",
        "1",
    ]
    R.main(args)
    doc = out.read_text()
    assert doc.count("n=2") >= 6
    archived = tmp_path / "archive" / "tiny-llama" / "items=2"  # every run archived as soon as it was made
    assert {p.name for p in archived.iterdir()} >= {"grace-grace-zsre2-seed0.parquet", "rome-rome-round2-seed0"}
    for title in ("GRACE keeps locality", "Round edits"):
        row = next(line for line in doc.splitlines() if line.startswith(f"| {title}"))
        assert any(v in row for v in ("**holds**", "**does not hold**", "**inconclusive**")), row
    text = readme.read_text()
    assert text.startswith("intro\n<!-- reproduce:begin -->") and "STALE TABLE" not in text and text.endswith("rest\n")
    assert "GRACE keeps locality" in text

    # The runs are kept: the document is rewritten from them without running anything, to the same figures.
    def figures(s):
        return [line for line in s.splitlines() if line.startswith("| ") and "n=2" in line]

    R.main(args + ["--report-only"])
    assert figures(out.read_text()) == figures(doc)

    # A rerun on new seeds, set against the first document's intervals.
    again = tmp_path / "again.md"
    swap = {str(out): str(again), "grace,round": "grace"}  # GRACE alone: quick
    rerun = [swap.get(a, a) for a in args]
    i = rerun.index("--readme")
    del rerun[i : i + 2]  # with --compare-to, no page is rewritten unless one is named
    project_page = R.FINDINGS
    before = project_page.read_text()
    R.main(rerun + ["--first-seed", "2", "--compare-to", str(out)])
    assert project_page.read_text() == before
    text = again.read_text()
    assert "--first-seed 2" in text and f"## Against {out}" in text
    R.main(rerun + ["--first-seed", "2", "--report-only"])  # --out elsewhere: the page is not the target
    assert project_page.read_text() == before
    assert (tmp_path / "work" / "items=2").is_dir() and any(
        p.name.endswith("seed3") for p in (tmp_path / "work" / "items=2").iterdir()
    )
    summary = next(line for line in text.splitlines() if "fall inside the documented 95% intervals" in line)
    inside, total = (int(w) for w in summary.split()[0:3:2])
    assert total >= 3 and 0 <= inside <= total


def test_arms_runs_only_the_named_arms(monkeypatch, tmp_path, capsys):
    """--arms: the other arms of the claim are read if finished, never run (two processes can share
    one claim's --work)."""
    import types

    import lifelong.core.models

    ran = []

    def fake_run_arm(lm, base, arm, scale, seed, work, model, threads):
        ran.append(arm.key)
        raise RuntimeError("not in this test")

    fake_lm = types.SimpleNamespace(model=types.SimpleNamespace(named_parameters=lambda: []), device="cpu")
    monkeypatch.setattr(lifelong.core.models, "load_model", lambda name: fake_lm)
    monkeypatch.setattr(R, "run_arm", fake_run_arm)
    monkeypatch.setattr(R, "DATA", tmp_path)
    out = tmp_path / "doc.md"
    R.main(
        ["--claims", "alphaedit", "--arms", "alphaedit", "--scale", "quick", "--seeds", "1"]
        + ["--work", str(tmp_path / "work"), "--out", str(out)]
    )
    assert ran == ["alphaedit"]
    assert out.is_file() and "alphaedit seed 0: not run" in capsys.readouterr().err
    # the document names the command that regenerates it, its claims and its file included
    assert f"--scale quick --seeds 1 --claims alphaedit --out {out.resolve()}`" in out.read_text()


def test_findings_page_holds_the_reproduce_block():
    """The page the reproduction rewrites by default has its markers, and its link reaches the document."""
    text = R.FINDINGS.read_text()
    assert text.count("<!-- reproduce:begin -->") == 1 and text.count("<!-- reproduce:end -->") == 1
    assert "(REPRODUCTION.md)" in text.split("<!-- reproduce:begin -->", 1)[1]
    assert (R.FINDINGS.parent / "REPRODUCTION.md").is_file()
    assert "<!-- reproduce:begin -->" not in (R.ROOT / "README.md").read_text()


def test_update_page_links_the_document_from_the_page(tmp_path):
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text("intro\n<!-- reproduce:begin -->\nold\n<!-- reproduce:end -->\nrest\n")
    R.update_page(page, "| t |", tmp_path / "out" / "R.md")
    text = page.read_text()
    assert "](../out/R.md)" in text and "| t |" in text and "old" not in text
    assert text.startswith("intro\n") and text.endswith("rest\n")
    bare = tmp_path / "bare.md"
    bare.write_text("no block\n")
    with pytest.raises(SystemExit, match="no <!-- reproduce:begin -->"):
        R.update_page(bare, "| t |", tmp_path / "R.md")


NEW_CLAIM = """
[[claim]]
id = "grace-paraphrase"
title = "A claim written in the file alone"
paper = "{wise_table}: GRACE Gen. 0.16 at T=10"
# figures as tables (the project's file writes them inline, one a line): the same list either way
[[claim.figures]]
label = "g: PS at own step"
kind = "own_step"
arm = "g"
probe = "edit_quality"
metric = "generalization"
protocol = "ps"
unit = "prompts"
[[claim.figures]]
label = "g: retained fraction at last step"
kind = "retained"
arm = "g"
[[claim.arm]]
key = "g"
editor = "grace"
source = "zsre"
items = { quick = 3, standard = 5 }
overrides = { eps_init = "2.0" }
[claim.rule]
text = "rule: paraphrases held below 0.99"
all_of = [{ figure = "g: PS at own step", below = 0.99 }]
"""


def claims_copy(tmp_path, extra: str = NEW_CLAIM):
    path = tmp_path / "claims.toml"
    path.write_text(R.CLAIMS_FILE.read_text() + extra)
    return path


@pytest.mark.data
@pytest.mark.skipif(not default_data_dir().is_dir(), reason="the reproduction reads ../shared/data (or $LIFELONG_DATA)")
def test_a_claim_added_in_the_file_alone_is_run_and_judged(tmp_path):
    path, out = claims_copy(tmp_path), tmp_path / "R.md"
    R.main(
        ["--claims-file", str(path), "--claims", "grace-paraphrase", "--model", "tiny-llama", "--scale", "items=2"]
        + ["--seeds", "2", "--work", str(tmp_path / "work"), "--out", str(out), "--page", "", "--threads", "1"]
    )
    doc = out.read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| A claim written in the file alone"))
    assert any(v in row for v in ("**holds**", "**does not hold**", "**inconclusive**")), row
    assert "Wang et al., NeurIPS 2024" in doc  # {wise_table} filled from the file's [text]
    assert "- arm `g`: editor `grace` (eps_init=2.0), 2 edits of zsre per seed" in doc
    assert "| g: PS at own step | " in doc and "2 prompts per seed" in doc
    assert "rule: paraphrases held below 0.99" in doc and f"--claims-file {path}" in doc
    assert (tmp_path / "work" / "items=2" / "grace-g-zsre2-seed1").is_dir()


@pytest.mark.parametrize(
    "change, problem",
    [
        (('kind = "retained"', 'kind = "retention"'), "kind 'retention': expected one of"),
        (("below = 0.99", "under = 0.99"), "rule.all_of"),
        (("below = 0.99", 'below = "low"'), "below must be a number"),
        (('figure = "g: PS at own step"', 'figure = "g: PS"'), "no figure labelled 'g: PS'"),
        (('editor = "grace"', 'editor = "grase"'), "editor 'grase': expected one of"),
        (('eps_init = "2.0"', 'eps = "2.0"'), "editor 'grace' has no hyperparameter 'eps'"),
        (('source = "zsre"', 'source = "zsrex"'), "source 'zsrex'"),
        (("items = { quick = 3, standard = 5 }", 'items = "lots"'), "items = 'lots': no such entry in [sizes]"),
        (("{wise_table}", "{wise}"), "no text named {wise}"),
        (('kind = "retained"\narm = "g"', 'kind = "retained"\narm = "h"'), "arm 'h' is not an arm"),
        (('protocol = "ps"', 'protocol = "ps"\nstep = 3'), "own_step figure takes no step"),
        (('title = "A claim', 'titel = "A claim'), "unknown key(s) titel"),
    ],
)
def test_a_malformed_claim_is_refused_in_one_line_naming_the_file_and_the_claim(tmp_path, change, problem):
    path = claims_copy(tmp_path, NEW_CLAIM.replace(*change))
    assert NEW_CLAIM.replace(*change) != NEW_CLAIM
    with pytest.raises(R.ClaimsError) as err:
        R.load_claims(path, R.DATA)
    message = str(err.value)
    assert message.startswith(f"{path}: claim 'grace-paraphrase': ") and problem in message and "\n" not in message
    with pytest.raises(SystemExit, match="claim 'grace-paraphrase'"):  # the command: that line, no traceback
        R.main(["--claims-file", str(path), "--report-only", "--out", str(tmp_path / "R.md")])


def test_claims_file_errors_without_a_claim(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[claim]\n")
    with pytest.raises(R.ClaimsError, match=r"bad.toml: not valid TOML"):
        R.load_claims(bad, R.DATA)
    with pytest.raises(R.ClaimsError, match=r"missing.toml: cannot be read"):
        R.load_claims(tmp_path / "missing.toml", R.DATA)
    with pytest.raises(R.ClaimsError, match=r"claim 'grace': a claim with this id comes earlier"):
        R.load_claims(claims_copy(tmp_path, NEW_CLAIM.replace('"grace-paraphrase"', '"grace"')), R.DATA)


def test_a_rule_with_a_condition_is_judged_only_once_the_condition_holds():
    """AlphaEdit's rule from the file: not tested while MEMIT is at ceiling, judged once it has degraded."""
    claim = next(c for c in R.CLAIMS if c.key == "alphaedit")
    ceiling = {
        "memit: retained fraction at last step": Estimate(1.0, 3, 0.95, 1.0),
        "memit: perplexity ratio at last step": Estimate(1.0, 3, 0.99, 1.01),
        "alphaedit − memit: retained fraction": Estimate(0.0, 3, -0.01, 0.01),
        "memit / alphaedit: perplexity ratio": Estimate(1.0, 3, 0.99, 1.01),
    }
    assert claim.judge(ceiling)[0] == "not tested at this scale (MEMIT has not degraded yet)"
    degraded = {**ceiling, "memit: perplexity ratio at last step": Estimate(3.0, 3, 2.0, 4.0)}
    assert claim.judge(degraded)[0] == "inconclusive"
    won = {
        **degraded,
        "alphaedit − memit: retained fraction": Estimate(0.3, 3, 0.2, 0.4),
        "memit / alphaedit: perplexity ratio": Estimate(2.0, 3, 1.5, 2.5),
    }
    assert claim.judge(won)[0] == "holds"
    assert claim.judge({**won, "memit: retained fraction at last step": Estimate(math.nan, 0)})[0] == "not run"


def test_a_stale_stored_run_is_moved_aside_and_not_reported(tmp_path, capsys):
    """A finished run is reused only while its identity is the one the arm plans now: changed settings,
    or changed editor defaults (another version of the code), move it aside to be made again."""
    from benchmarks.reproduction.claims import Arm
    from benchmarks.reproduction.runner import BaseModel, run_arm, run_dir, stored_results
    from lifelong.editors.ft import FTEditor
    from streams import EditStream
    from tests.conftest import make_edits

    work, scale, seed = tmp_path / "work", "quick", 0
    arm = Arm(key="a", editor="ft", source="counterfact", items={"quick": 2}, overrides={"max_steps": "2"})
    (work / "streams").mkdir(parents=True)
    EditStream(make_edits(2)).to_jsonl(work / "streams" / "counterfact-2-seed0.jsonl")
    model = BaseModel("tiny-llama")
    made = run_arm(model.lm, model.base, arm, scale, seed, work, "tiny-llama", 1)
    stored = stored_results(work, scale, arm, seed, model)  # the model now holds the run's edits
    assert stored is not None and stored.equals(made)

    changed = Arm(key="a", editor="ft", source="counterfact", items={"quick": 2}, overrides={"max_steps": "3"})
    assert run_dir(work, scale, changed, seed) == run_dir(work, scale, arm, seed)  # same directory name
    assert stored_results(work, scale, changed, seed, model) is None
    assert "a stale run (differs in: editor_overrides, hyperparameters)" in capsys.readouterr().out
    assert not run_dir(work, scale, arm, seed).exists()
    aside = run_dir(work, scale, arm, seed).with_name(run_dir(work, scale, arm, seed).name + ".stale-1")
    assert aside.is_dir()

    aside.rename(run_dir(work, scale, arm, seed))
    original = FTEditor.hyperparameters
    try:  # the same settings under other editor defaults: another version of the code made it
        FTEditor.hyperparameters = lambda self: {**original(self), "objective": "changed"}
        assert stored_results(work, scale, arm, seed, model) is None
    finally:
        FTEditor.hyperparameters = original
    assert "differs in: hyperparameters)" in capsys.readouterr().out


def test_downstream_change_figures_the_score_change_at_its_step_within_its_range():
    """The KN and MEND claims' downstream figure: the generated (seed protocol) mean score change to θ0 at
    step 5, or the last probed step before it, a t interval over seeds cut to [-1, 1]."""
    import polars as pl

    from benchmarks.reproduction.claims import KINDS, Figure
    from probes import make_probe

    def run(at5: float, at10: float) -> pl.DataFrame:
        rows = [(0, "downstream", "diff", "mean;seed", 0.0), (5, "downstream", "diff", "mean;seed", at5)]
        rows += [(10, "downstream", "diff", "mean;seed", at10), (5, "downstream", "diff", "mean", 0.3)]
        return pl.DataFrame(rows, schema=["step", "probe", "metric", "protocol", "value"], orient="row")

    runs = {"kn": [run(-0.9, -0.95), run(-0.1, -0.95), run(-0.5, -0.95)]}
    fig = Figure(label="d", kind="downstream_change", arm="kn", protocol="mean;seed", step=5)
    e, _ = KINDS["downstream_change"].compute(fig, runs)
    assert e.n == 3 and e.value == pytest.approx(-0.5) and e.low == -1.0 and 0 < e.high < 1  # cut below: -1
    e7, _ = KINDS["downstream_change"].compute(
        Figure(label="d", kind="downstream_change", arm="kn", protocol="mean;seed", step=7), runs
    )
    assert e7.value == pytest.approx(-0.5)  # the last probed step at or before 7
    last, _ = KINDS["downstream_change"].compute(
        Figure(label="d", kind="downstream_change", arm="kn", protocol="mean;seed"), runs
    )
    assert last.value == pytest.approx(-0.95)
    for claim in ("kn", "mend"):  # the claims' probe spec is one the replay accepts
        spec = next(a for c in R.CLAIMS if c.key == claim for a in c.arms).probes[1]
        assert make_probe(spec).options.protocol == "seed"


def test_a_stored_run_that_cannot_be_checked_is_not_reused(tmp_path, capsys, monkeypatch):
    """A finished run whose planned identity cannot be made (e.g. MEND's hypernetwork file is gone) is
    reported in one line and not reused, rather than ending the reproduction in a traceback."""
    from benchmarks.reproduction import runner
    from benchmarks.reproduction.claims import Arm
    from streams import EditStream
    from streams.errors import MissingFileError
    from tests.conftest import make_edits

    work, scale, seed = tmp_path / "work", "quick", 0
    arm = Arm(key="a", editor="ft", source="counterfact", items={"quick": 2}, overrides={"max_steps": "2"})
    (work / "streams").mkdir(parents=True)
    EditStream(make_edits(2)).to_jsonl(work / "streams" / "counterfact-2-seed0.jsonl")
    model = runner.BaseModel("tiny-llama")
    runner.run_arm(model.lm, model.base, arm, scale, seed, work, "tiny-llama", 1)

    def missing(*args):
        raise MissingFileError("no trained hypernetwork (looked in X)")

    monkeypatch.setattr(runner, "identity_differences", missing)
    assert runner.stored_results(work, scale, arm, seed, model) is None
    assert "cannot check that it is the run its arm plans now, not reused: no trained hypernetwork" in (
        capsys.readouterr().out
    )
    assert runner.run_dir(work, scale, arm, seed).is_dir()  # nothing moved or lost


def test_every_headline_retention_figure_has_its_exact_match_figure_beside_it():
    """#38: the reproduction's headlines do not show ES retention alone: the strictest protocol the runs
    record (exact match: every answer token the greedy one) stands beside it."""
    for claim in R.CLAIMS:
        shown = [f for f in claim.figures if f.label in (claim.headline or [g.label for g in claim.figures[:3]])]
        for fig in shown:
            if fig.kind in ("retained", "retained_difference") and fig.protocol == "es":
                strict = [
                    g
                    for g in shown
                    if (g.kind, g.arm, g.control, g.protocol) == (fig.kind, fig.arm, fig.control, "exact")
                ]
                assert strict, f"{claim.key}: {fig.label} has no exact-match figure beside it in the headline"
