"""The retrieval in-context memory: untouched prompts when nothing is retrieved, retrieval, state, checkout."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifelong.cli import main
from lifelong.core.models import load_model
from lifelong.core.scorer import Scorer
from lifelong.editors import make_editor
from lifelong.replay import checkout, replay, scorer_for
from lifelong.run import RunConfig
from tests.adaptor_helpers import assert_weights_equal, snapshot
from tests.conftest import make_edits


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-llama")


@pytest.fixture
def memory(lm):
    editor = make_editor("memory").bind(lm)
    editor.apply(lm, make_edits(4))
    return editor


def test_retrieval_picks_the_subject_not_the_neighbor(lm, memory):
    e = make_edits(4)[2]
    prompts = [e.rendered_prompt, e.paraphrases[0], e.neighborhood[0].prompt, "Nothing to see here"]
    out = memory.rewrite(lm, prompts)
    assert out[0] == f"Fact: {e.rendered_prompt} {e.target_new}.\nQuestion: {e.rendered_prompt}"
    assert out[1].startswith("Fact: The capital of Country2 is Nova2.\n")
    assert out[2:] == prompts[2:]


def test_same_subject_and_relation_replaces(lm, memory):
    first = make_edits(1)[0]
    back = first.__class__(
        **{
            **first.to_dict(),
            "id": "back",
            "target_new": "City0",
            "target_true": "Nova0",
            "timestamp": first.timestamp,
            "neighborhood": first.neighborhood,
        }
    )
    memory.apply(lm, [back])
    assert len(memory.records) == 4
    assert memory.rewrite(lm, [first.rendered_prompt])[0].startswith("Fact: The capital of Country0 is City0.")


def test_answer_positions_follow_the_longer_prompt(lm, memory):
    e = make_edits(4)[1]
    edited = Scorer(lm.model, lm.tokenizer, rewrite=memory.prompt_rewriter(lm))
    plain = Scorer(lm.model, lm.tokenizer)
    long_prompt = memory.rewrite(lm, [e.rendered_prompt])[0]
    got = edited.score([(e.rendered_prompt, e.target_new)])
    want = plain.score([(long_prompt, e.target_new)])
    assert got.nll[0] == want.nll[0] and got.argmax == want.argmax


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    text=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=40),
    answer=st.sampled_from(["Paris", "blue", "42"]),
)
def test_nothing_retrieved_scores_equal_base(lm, memory, text, answer):
    found = memory.retrieve(lm, [text])[0]
    edited = Scorer(lm.model, lm.tokenizer, rewrite=memory.prompt_rewriter(lm)).score([(text, answer)])
    base = Scorer(lm.model, lm.tokenizer).score([(text, answer)])
    if not found:
        assert edited.nll[0] == base.nll[0] and edited.argmax == base.argmax
    else:
        assert any(w.lower() in text.lower() for w in memory.records[found[0]]["subject"].split())


def test_hidden_retriever(lm):
    editor = make_editor("memory", {"retriever": "hidden", "threshold": "0.999999"}).bind(lm)
    editor.apply(lm, make_edits(3))
    e = make_edits(3)[1]
    out = editor.rewrite(lm, [e.rendered_prompt, "zzz qqq"])
    assert out[0].endswith(e.rendered_prompt) and out[0] != e.rendered_prompt and out[1] == "zzz qqq"
    with pytest.raises(ValueError, match="retriever"):
        make_editor("memory", {"retriever": "bm99"})


def test_weights_state_resume_checkout(tmp_path, stream_file, capsys):
    cfg = RunConfig(model="tiny-llama", editor="memory", stream=str(stream_file), probe_every=2)
    live = load_model("tiny-llama")
    base = snapshot(live)
    full = replay(cfg, tmp_path / "full", lm=live, progress=False)
    assert_weights_equal(live, base)
    replay(cfg, tmp_path / "resumed", progress=False, stop_after=2)
    resumed = replay(cfg, tmp_path / "resumed", progress=False)
    cols = ["step", "probe", "metric", "protocol", "edit_id"]
    assert full.run.results().drop("run_id").sort(cols).equals(resumed.run.results().drop("run_id").sort(cols))
    rebuilt = checkout(tmp_path / "full", 6)
    assert (
        len(rebuilt.editor.records) == 6 and checkout(tmp_path / "full", 2).editor.records[-1]["subject"] == "Country1"
    )
    pairs = [(e.rendered_prompt, e.target_new) for e in make_edits(6)]
    plain = Scorer(rebuilt.model, rebuilt.tokenizer).score(pairs).nll
    assert not (scorer_for(rebuilt).score(pairs).nll == plain).all()
    assert main(["checkout", str(tmp_path / "full"), "--step", "3", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "editor 'memory' keeps its edits outside the weights" in err and len(err.strip().splitlines()) == 1


def test_a_step_saves_only_the_records_it_added(tmp_path, stream_file):
    import json

    from lifelong.core.delta import DeltaStore

    run = replay(
        RunConfig(model="tiny-llama", editor="memory", stream=str(stream_file), steps=4), tmp_path / "m", progress=False
    ).run
    states = DeltaStore(run.deltas_dir, {}).step_states(4, incremental=True)
    assert [len(json.loads(bytes(s["records_json"].tolist()))) for s in states] == [1, 1, 1, 1]
    editor = make_editor("memory")
    editor.load_step_states(states)
    whole = make_editor("memory")
    whole.load_step_states([editor.state_dict(), editor.state_dict()])  # runs that saved whole states
    assert editor.records == whole.records and len(editor.records) == 4


def test_memory_reaches_generation_tasks(lm, memory, monkeypatch):
    """The downstream probe's generation path asks the model through the scorer, so the memory's
    rewriter applies there too (it did not: generation read the model past the rewriter)."""
    from lifelong.core import model_access
    from lifelong.core.model_access import generate
    from probes import ProbeContext, make_probe
    from probes.tasks import Generate

    e = make_edits(4)[3]
    item = Generate(e.rendered_prompt, (e.target_new,), "em")
    probe = make_probe("downstream:tasks=facts,items=1,max_new_tokens=8")
    probe.tasks = {"facts": [item]}
    seen: list[list[str]] = []  # prompts and continuations the greedy decoder was given and produced
    original = model_access.greedy_ids

    def spy(model, tokenizer, encoded, budgets, *args, **kwargs):
        out = original(model, tokenizer, encoded, budgets, *args, **kwargs)
        seen.append(
            [tokenizer.decode(row, skip_special_tokens=True) for row in encoded]
            + [tokenizer.decode(row, skip_special_tokens=True) for row in out]
        )
        return out

    monkeypatch.setattr(model_access, "greedy_ids", spy)
    for rewrite in (None, memory.prompt_rewriter(lm)):
        probe.scores(
            ProbeContext(
                step=0, timestamp=None, batch=(), history=[], scorer=Scorer(lm.model, lm.tokenizer, rewrite=rewrite)
            )
        )
    (base_prompt, base_out), (edited_prompt, edited_out) = seen
    assert base_prompt == e.rendered_prompt
    assert edited_prompt == f"Fact: {e.rendered_prompt} {e.target_new}.\nQuestion: {e.rendered_prompt}"
    assert edited_out != base_out  # the continuation is not θ0's
    monkeypatch.undo()
    got = Scorer(lm.model, lm.tokenizer, rewrite=memory.prompt_rewriter(lm)).generate([e.rendered_prompt], 8)
    assert (
        got
        == generate(lm.model, lm.tokenizer, [edited_prompt], 8)
        != generate(lm.model, lm.tokenizer, [e.rendered_prompt], 8)
    )
