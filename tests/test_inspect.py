"""lifelong inspect: greedy continuations at θ0, after an edit's step and at the last step."""

import pytest

from lifelong.core.model_access import generate
from lifelong.core.models import load_model
from lifelong.inspect import before_after, choose_edits, format_before_after
from lifelong.replay import replay
from lifelong.run import RunConfig
from tests.conftest import TINY_FT


def test_continuations_are_the_checked_out_models(tmp_path, stream_file):
    lm = load_model("tiny-llama")
    config = RunConfig(
        model="tiny-llama", stream=str(stream_file), probe_every=2, editor_overrides={**TINY_FT, "lr": "0.5"}
    )
    run = replay(config, tmp_path / "r", lm=lm, progress=False, stop_after=4).run
    chosen, rows, steps = before_after(run.path, count=2, tokens=6)
    assert [k for k, _ in chosen] == [1, 4] and steps == [0, 1, 4]
    # At the last step the live model of the replay is the one checked out: same greedy text.
    assert [r.by_step[4] for r in rows] == generate(lm.model, lm.tokenizer, [r.text for r in rows], 6)
    fresh = load_model("tiny-llama")
    assert [r.by_step[0] for r in rows] == generate(fresh.model, fresh.tokenizer, [r.text for r in rows], 6)
    assert {r.kind for r in rows} == {"prompt", "paraphrase", "neighbour"}
    text = format_before_after(chosen, rows)
    assert "θ0" in text and "after its step 1" in text and "last step 4" in text
    assert text.count("(step ") == 2
    named, _, _ = before_after(run.path, edit_ids=[chosen[1][1].id], tokens=4)
    assert [e.id for _, e in named] == [chosen[1][1].id]
    with pytest.raises(ValueError, match="no edit 'nope' in the run's completed steps"):
        before_after(run.path, edit_ids=["nope"])


def test_choose_edits_spreads_over_the_run():
    steps = [(f"e{i}",) for i in range(10)]
    assert [k for k, _ in choose_edits(steps, None, 3)] == [1, 5, 10]
    assert [k for k, _ in choose_edits(steps, None, 1)] == [1]
    assert len(choose_edits(steps[:2], None, 5)) == 2
    with pytest.raises(ValueError, match="--edits must be at least 1"):
        choose_edits(steps, None, 0)
