"""Exporters: a run's step-level figures in TensorBoard, streamed during the run or written after."""

import math

import pytest

from lifelong.cli import main
from lifelong.export import scalar_rows
from lifelong.run import RunDir
from tests.conftest import TINY_FT

pytest.importorskip("tensorboard")


def scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_streamed_and_written_after_agree_with_the_results(tmp_path, stream_file, capsys):
    run, live, after = tmp_path / "run", tmp_path / "tb-live", tmp_path / "tb-after"
    argv = [
        "replay",
        "--model",
        "tiny-llama",
        "--stream",
        str(stream_file),
        "--steps",
        "3",
        "--probe-every",
        "1",
        "--quiet",
        "--out",
        str(run),
        "--export",
        f"tensorboard:{live}",
        *[f"--set={k}={v}" for k, v in TINY_FT.items()],
    ]
    assert main(argv) == 0
    assert main(["export", str(run), "--to", f"tensorboard:{after}"]) == 0
    assert "step-level figures" in capsys.readouterr().out
    expected: dict[str, dict[int, float]] = {}
    for row in RunDir(run).results().to_dicts():
        for tag, value in scalar_rows([row]):
            expected.setdefault(tag, {})[row["step"]] = value
    assert "retention/retained_fraction/es" in expected and set(expected["retention/retained_fraction/es"]) == {1, 2, 3}
    for written in (scalars(live), scalars(after)):
        assert set(written) == set(expected)
        for tag, by_step in expected.items():  # float32 in the event file
            assert all(math.isclose(written[tag][s], v, rel_tol=1e-6, abs_tol=1e-7) for s, v in by_step.items()), tag


def test_per_edit_rows_and_nan_are_left_out_and_bad_specs_refused(capsys, tmp_path):
    rows = [
        {"probe": "retention", "metric": "retention", "protocol": "es", "edit_id": "e1", "value": 1.0},
        {"probe": "chains", "metric": "failure_rate", "protocol": "p", "edit_id": None, "value": float("nan")},
        {"probe": "perplexity", "metric": "ratio", "protocol": "corpus", "edit_id": None, "value": 1.5},
    ]
    assert list(scalar_rows(rows)) == [("perplexity/ratio/corpus", 1.5)]
    code = main(["replay", "--model", "tiny-llama", "--export", "wandb:proj", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--export 'wandb:proj': expected tensorboard:DIR" in err and not (tmp_path / "x").exists()
