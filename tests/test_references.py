"""`replay --references-from`: step 0 copied from a sibling run gives the run it would have computed,
and is refused (computed instead, with a note) when the runs differ in more than the editor or the
editor shows the model another θ0."""

from __future__ import annotations

import json

import polars as pl
import pytest

from lifelong.core.models import load_model
from lifelong.editors import make_editor
from lifelong.references import CHECK_KEY
from lifelong.replay import replay
from lifelong.run import RunConfig
from tests.conftest import TINY_FT

PROBES = ["edit_quality:generation=question+qa", "retention:schedule=end,generation=question"]
GRACE = {"layer": "2", "eps_init": "1.0", "max_steps": "10"}


def _config(stream_file, editor, overrides, **kw):
    return RunConfig(
        model="tiny-llama", stream=str(stream_file), editor=editor, editor_overrides=overrides, probes=PROBES, **kw
    )


def _rows(run):
    return run.results().drop("run_id").sort(["step", "probe", "metric", "protocol", "edit_id"])


@pytest.fixture
def ft_run(tmp_path, stream_file):
    return replay(_config(stream_file, "ft", dict(TINY_FT)), tmp_path / "ft", progress=False).run


def test_a_borrowed_step_0_gives_the_run_computed_in_full(tmp_path, stream_file, ft_run):
    config = _config(stream_file, "grace", GRACE)
    computed = replay(config, tmp_path / "computed", progress=False).run
    borrowed = replay(config, tmp_path / "borrowed", progress=False, references_from=ft_run.path).run
    assert borrowed.manifest()["references_from"] == {
        "path": str(ft_run.path.resolve()),
        "run_id": ft_run.manifest()["run_id"],
    }
    assert "references_from" not in computed.manifest()
    from lifelong.summary import format_summary

    assert f"step 0 (θ0's references) copied from run {ft_run.manifest()['run_id']}" in format_summary(borrowed)
    assert _rows(borrowed).equals(_rows(computed))  # every step, step 0 included
    assert set(borrowed.results().filter(pl.col("step") == 0)["run_id"]) == {borrowed.manifest()["run_id"]}
    assert borrowed.generations().drop("run_id").equals(computed.generations().drop("run_id"))
    assert json.loads(borrowed.reference_path.read_text()) == json.loads(computed.reference_path.read_text())
    assert CHECK_KEY in json.loads(computed.reference_path.read_text())


def test_a_run_that_differs_in_more_than_the_editor_is_not_borrowed_from(tmp_path, stream_file, ft_run, capsys):
    config = _config(stream_file, "grace", GRACE, steps=4)
    run = replay(config, tmp_path / "g", progress=False, references_from=ft_run.path).run
    assert "references_from" not in run.manifest()
    err = capsys.readouterr().err
    differs = "steps, stream_edits, stream_hash, stream_steps"
    assert f"θ0 references not taken from {ft_run.path}: its run differs in {differs}; computing them" in err
    assert run.completed_step() == 4


def test_an_editor_that_shows_the_model_another_theta0_is_not_borrowed_for(tmp_path, stream_file, ft_run, capsys):
    editor = make_editor("grace", GRACE)
    editor.prompt_rewriter = lambda lm: lambda prompts: ["Note: " + p for p in prompts]  # type: ignore[method-assign]
    config = _config(stream_file, "grace", GRACE, steps=2)
    lm = load_model("tiny-llama")
    base = replay(config, tmp_path / "plain", lm=lm, progress=False).run  # plain GRACE: a source with 2 steps
    lm = load_model("tiny-llama")
    run = replay(config, tmp_path / "p", lm=lm, editor=editor, progress=False, references_from=base.path).run
    err = capsys.readouterr().err
    assert "its editor saw another θ0 (answer log-probabilities differ by up to" in err
    assert "references_from" not in run.manifest() and run.completed_step() == 2
