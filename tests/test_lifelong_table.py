"""benchmarks/lifelong_table.py's verdicts follow their stated rules, on hand-made results."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lifelong_table as table  # noqa: E402

CLAIMS = {claim[1]: claim for claim in table.CLAIMS}


def _results(retained: list[int], chunk_nll: list[float] | None = None, ratio: float = 1.0) -> pl.DataFrame:
    rows = [("retention", "retention", "es", f"e{i}", float(v)) for i, v in enumerate(retained)]
    rows += [("edit_quality", "efficacy", "es", f"e{i}", 1.0) for i in range(len(retained))]
    for i, nll in enumerate(chunk_nll or []):
        rows.append(("perplexity", "chunk_nll", "corpus", f"chunk:{i}", nll))
    rows.append(("perplexity", "ratio", "corpus", None, ratio))
    tokens = [("perplexity", "chunk_tokens", "corpus", f"chunk:{i}", 100.0) for i in range(len(chunk_nll or []))]
    schema = {"step": pl.Int64, "probe": pl.String, "metric": pl.String, "protocol": pl.String}
    schema |= {"edit_id": pl.String, "value": pl.Float64}
    return pl.DataFrame([(0, *r) for r in tokens] + [(2, *r) for r in rows], schema=schema, orient="row")


def _arm(name: str, results: pl.DataFrame, seconds: float = 1.0):
    return table.ArmResult(table.Arm(name, name), results, 2, 100, seconds)


def test_ultraedit_claim_needs_retention_within_the_margin_and_half_the_cost():
    alpha = _arm("alphaedit", _results([1] * 100), seconds=2.0)
    same = _arm("ultraedit", _results([1] * 99 + [0]), seconds=0.5)
    assert table.verdict(CLAIMS["ultraedit"], {"ultraedit": same, "alphaedit": alpha})[1] == "supported"
    costly = _arm("ultraedit", _results([1] * 99 + [0]), seconds=1.5)  # retains, but 0.75 × the cost
    assert table.verdict(CLAIMS["ultraedit"], {"ultraedit": costly, "alphaedit": alpha})[1] == "inconclusive"
    worse = _arm("ultraedit", _results([1] * 50 + [0] * 50), seconds=0.5)
    assert table.verdict(CLAIMS["ultraedit"], {"ultraedit": worse, "alphaedit": alpha})[1] == "contradicted"


def test_nas_claim_is_decided_against_memit_and_untestable_without_forgetting():
    memit = _arm("memit", _results([1] * 40 + [0] * 60))
    better = _arm("memit+nas", _results([1] * 80 + [0] * 20))
    figure, said = table.verdict(CLAIMS["memit+nas"], {"memit+nas": better, "memit": memit})
    assert said == "supported" and figure.startswith("Δ retained ES 0.4")
    worse = _arm("memit+nas", _results([1] * 10 + [0] * 90))
    assert table.verdict(CLAIMS["memit+nas"], {"memit+nas": worse, "memit": memit})[1] == "contradicted"
    kept = _arm("memit", _results([1] * 100))
    assert table.verdict(CLAIMS["memit+nas"], {"memit+nas": better, "memit": kept})[1].startswith("not testable")


def test_prune_claim_compares_log_perplexity_chunk_by_chunk():
    memit = _arm("memit", _results([1] * 10, chunk_nll=[400.0 + i for i in range(16)], ratio=3.0))
    lower = _arm("memit+prune", _results([1] * 10, chunk_nll=[300.0 + i for i in range(16)], ratio=1.1))
    assert table.verdict(CLAIMS["memit+prune"], {"memit+prune": lower, "memit": memit})[1] == "supported"
    higher = _arm("memit+prune", _results([1] * 10, chunk_nll=[500.0 + i for i in range(16)], ratio=5.0))
    assert table.verdict(CLAIMS["memit+prune"], {"memit+prune": higher, "memit": memit})[1] == "contradicted"
    fluent = _arm("memit", _results([1] * 10, chunk_nll=[400.0 + i for i in range(16)], ratio=1.01))
    said = table.verdict(CLAIMS["memit+prune"], {"memit+prune": lower, "memit": fluent})[1]
    assert said.startswith("not testable")


def test_a_missing_arm_gets_no_verdict():
    assert table.verdict(CLAIMS["memit+nas"], {}) == ("not run", "no verdict: an arm is not finished")


@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0]])
def test_the_interval_helper_is_a_t_interval(values):
    estimate = table.over_seeds(values)  # the chunks' mean log-ratio difference and its t interval
    assert estimate.value == 2.0 and estimate.n == 3 and estimate.low < 2.0 < estimate.high
    assert not math.isnan(estimate.low)


def test_an_empty_page_option_means_no_page():
    """`--page ''` prints only, as in reproduce.py (Path('') would be '.', a directory to write into)."""
    parser = argparse.ArgumentParser()
    table.table_options(parser, "lifelong-table", "docs/LIFELONG.md")
    assert parser.parse_args(["--page", ""]).page is None
    assert parser.parse_args([]).page is None
    assert parser.parse_args(["--page", "docs/LIFELONG.md"]).page == Path("docs/LIFELONG.md")


def test_cost_is_compared_in_forwards_of_each_arms_machine():
    """An AlphaEdit arm run on a machine 10 × slower is not 10 × costlier: seconds per edit are set
    against each machine's own forward before the cost ratio is taken."""
    alpha = table.ArmResult(table.Arm("alphaedit", "alphaedit"), _results([1] * 100), 2, 100, 20.0, forward=10.0)
    ultra = table.ArmResult(table.Arm("ultraedit", "ultraedit"), _results([1] * 100), 2, 100, 1.5, forward=1.0)
    figure, said = table.verdict(CLAIMS["ultraedit"], {"ultraedit": ultra, "alphaedit": alpha})
    assert "cost ratio 0.75" in figure and said == "inconclusive"  # 1.5 / (20 / 10), not 1.5 / 20
    fast = table.ArmResult(table.Arm("ultraedit", "ultraedit"), _results([1] * 100), 2, 100, 0.5, forward=1.0)
    assert table.verdict(CLAIMS["ultraedit"], {"ultraedit": fast, "alphaedit": alpha})[1] == "supported"


def test_the_forward_yardstick_is_the_arms_devices(tmp_path):
    records = [("cpu", 2.0), ("cpu", 4.0), ("cuda", 0.01), (None, 3.0)]  # None: written before devices were
    lines = [json.dumps({"seconds": s} | ({"device": d} if d else {})) for d, s in records]
    (tmp_path / "forward.jsonl").write_text("\n".join(lines) + "\n")
    assert table.forward_yardstick(tmp_path) == 3.0
    assert table.forward_yardstick(tmp_path, "cuda") == 0.01
    assert math.isnan(table.forward_yardstick(tmp_path, "cuda:1"))


def test_replays_run_on_the_device_asked_for():
    arm = table.Arm("memit+nas", "memit", {"stabilise": "nas"})
    argv = table.replay_command(arm, 1000, 100, Path("out"), "smollm2-135m", None, "cuda")
    assert argv[argv.index("--device") + 1] == "cuda" and argv[argv.index("--set") + 1] == "stabilise=nas"
    assert table.replay_command(arm, 1000, 100, Path("out"), "smollm2-135m", None).count("cpu") == 1
