"""The run dashboard, `lifelong compare` and the general-ability summary lines."""

from __future__ import annotations

import polars as pl
import pytest

from lifelong.cli import main
from lifelong.plots import _panels, plot_dashboard
from lifelong.run import RunDir
from tests.conftest import TINY_FT

PROBES = ["--probe", "perplexity:schedule=every:2,chunk_tokens=64,max_tokens=256,max_sentences=8",
          "--probe", "downstream:schedule=every:2,tasks=sentiment+facts,items=4", "--probe", "weight_drift"]


def replay(capsys, stream_file, out, lr="0.05"):
    sets = [f"--set={k}={v}" for k, v in {**TINY_FT, "lr": lr}.items()]
    code = main(["replay", "--model", "tiny-llama", "--stream", str(stream_file), "--steps", "4", "--probe-every", "2",
                 "--out", str(out), "--quiet", *sets, *PROBES])
    out_text, err = capsys.readouterr()
    assert code == 0, err
    return out_text


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from tests.conftest import make_edits
    from streams import EditStream

    base = tmp_path_factory.mktemp("dash")
    stream = base / "s.jsonl"
    EditStream(make_edits()).to_jsonl(stream)

    for name, lr in (("a", "0.05"), ("b", "0.2")):
        code = main(["replay", "--model", "tiny-llama", "--stream", str(stream), "--steps", "4", "--probe-every", "2",
                     "--out", str(base / name), "--quiet", *[f"--set={k}={v}" for k, v in {**TINY_FT, "lr": lr}.items()],
                     *PROBES])
        assert code == 0
    return base / "a", base / "b"


def test_replay_writes_a_dashboard_and_summary_lines(tmp_path, stream_file, capsys):
    out = replay(capsys, stream_file, tmp_path / "run")
    assert (tmp_path / "run" / "plots" / "dashboard.png").stat().st_size > 10_000
    assert "dashboard.png" in out
    for line in ("perplexity ratio to θ0 at last step", "perplexity collapse step (ratio >= 2)",
                 "downstream drift at last step (difference)", "weight drift ||W_t - W_0||_F at last step"):
        assert line in out, line
    results = RunDir(tmp_path / "run").results()
    assert _panels(results) == ["retention", "perplexity", "downstream", "weight_drift"]


def test_dashboard_draws_distortion_when_chain_rows_exist(two_runs):
    run = RunDir(two_runs[0])
    results = run.results()
    run_id = results["run_id"][0]
    chains = pl.DataFrame([{"run_id": run_id, "step": s, "timestamp": None, "probe": "chains",
                            "metric": "distortion_js", "protocol": "completion", "edit_id": f"c{c}", "value": 0.1 * s}
                           for s in (2, 4) for c in (1, 2)], schema=results.schema)
    pl.concat([results, chains]).write_parquet(run.results_path)
    assert "distortion" in _panels(run.results())
    path = plot_dashboard(run)
    assert path.name == "dashboard.png" and path.stat().st_size > 10_000


def test_compare_overlays_runs_and_writes_one_table(two_runs, tmp_path, capsys):
    code = main(["compare", str(two_runs[0]), str(two_runs[1]), "--out", str(tmp_path / "cmp")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    table = pl.read_csv(tmp_path / "cmp" / "compare.csv")
    assert table.columns == ["measure", "protocol", "ft (a)", "ft (b)"]
    row = table.filter((pl.col("measure") == "perplexity ratio to θ0 at last step") & (pl.col("protocol") == "corpus"))
    assert row.height == 1 and row["ft (a)"][0] > 0 and row["ft (a)"][0] != row["ft (b)"][0]
    assert "ft (a)" in out and "perplexity ratio to θ0 at last step" in out


def test_compare_errors(two_runs, tmp_path, capsys):
    assert main(["compare", str(two_runs[0])]) == 2
    assert "compare needs at least two run directories" in capsys.readouterr().err
    assert main(["compare", str(two_runs[0]), str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
