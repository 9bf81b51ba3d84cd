"""benchmarks/reproduce.py: verdict rules by hand, and one small reproduction end to end on a tiny model."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from lifelong.stats import Estimate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module


R = load_reproduce()


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
    d = R.paired_difference([1.0, 2.0, 3.0], [0.5, 1.0, 2.5])  # differences 0.5, 1.0, 0.5
    assert d.n == 3 and d.value == pytest.approx(2 / 3)
    half = 4.302652729911275 * math.sqrt(1 / 12) / math.sqrt(3)  # t(0.975, 2) · s / √n, s² = 1/12
    assert (d.low, d.high) == (pytest.approx(2 / 3 - half), pytest.approx(2 / 3 + half))


def test_scale_items_and_bad_arguments(capsys):
    arm = R.CLAIMS[0].arms[0]
    assert arm.count("items=4") == 4 and arm.count("quick") == arm.items["quick"]
    for argv in (["--scale", "huge"], ["--claims", "nope"], ["--seeds", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            R.main(argv + ["--report-only"])
        assert exit_info.value.code == 2
    assert "unknown claim" in capsys.readouterr().err


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
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
