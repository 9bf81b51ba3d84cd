"""MEMOIR: TopHash masks, edits written only into their mask's columns, routing by mask overlap (an unrouted
prompt's output is the base model's bitwise), state through store/replay/checkout, settings refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifelong.core.delta import DeltaStore
from lifelong.core.models import load_model
from lifelong.editors import HyperparameterError, make_editor
from lifelong.editors.hooks import first_input, stop_after
from lifelong.editors.memoir import MEMOIREditor, MEMOIRParams, default_memoir_layer, default_top_k, top_hash
from lifelong.replay import checkout, replay
from lifelong.run import RunConfig
from lifelong.testing import check_editor
from streams.errors import UserError
from tests.adaptor_helpers import assert_weights_equal, logits, snapshot
from tests.conftest import make_edits

# Few steps, and a threshold that tells prompts apart on the tiny random model (its features overlap
# more than a trained model's: two unrelated prompts share about half their columns there).
SET = {"layer": "2", "max_steps": "8", "templates": "2", "irr_threshold": "0.9"}
PROMPTS = ("The capital of {} is", "Quietly, {} sings about", "{} was founded by a man named")
UNRELATED = ("zzzz qqq", "A b c d", "Hello world, this is unrelated", "x", "The weather is fine today.")


def distinct_edits():
    """Three edits whose prompts differ in wording, not only in subject."""
    return [replace(e, prompt=p) for e, p in zip(make_edits(3), PROMPTS)]


def test_the_authors_defaults():
    p = MEMOIRParams()
    assert (p.lr, p.max_steps, p.weight_decay, p.clip_norm, p.irr_threshold) == (1.0, 30, 1e-5, 1.0, 0.4)
    assert (p.aggregate, p.background, p.background_samples, p.templates) == ("mean_decentered", "zsre_mend", 100, 10)
    assert (p.stop_loss, p.stop_delta) == (0.02, 1e-4)
    # layer 27 of Llama-3-8B's 32 and 4096 of its 14,336 columns, scaled: SmolLM2-135M's 30 layers, 1536 columns
    assert (default_memoir_layer(32), default_memoir_layer(30), default_memoir_layer(4)) == (27, 25, 3)
    assert (default_top_k(14336), default_top_k(1536), default_top_k(128)) == (4096, 439, 37)


def test_top_hash_by_hand():
    features = torch.tensor([[0.1, -5.0, 3.0, 0.2], [1.0, 0.0, 0.0, -2.0]])
    permutation = torch.tensor([2, 0, 3, 1])
    # row 0: largest |x| at 1 and 2 -> columns 0 and 3; row 1: at 3 and 0 -> columns 1 and 2
    masks = top_hash(features, 2, permutation)
    assert masks.tolist() == [[True, False, False, True], [False, True, True, False]]


def prompt_input(lm, layer: int, text: str) -> torch.Tensor:
    """The output projection's input over ``text``'s tokens, captured without the editor's help."""
    ids = torch.tensor([lm.tokenizer(text).input_ids])
    with torch.no_grad(), stop_after(lm.adapter.out_proj(layer), first_input) as seen:
        lm.adapter.body()(input_ids=ids, use_cache=False)
    return seen[0][0]


def test_each_edit_writes_exactly_its_prompts_mask_columns():
    """With weight decay off, an edit changes the memory in the columns of its prompt's mask and no
    other; the mask is TopHash of the prompt's mean input less the background mean."""
    lm = load_model("tiny-llama")
    editor = make_editor("memoir", {**SET, "weight_decay": "0"}).bind(lm)
    before = torch.zeros(lm.adapter.out_proj_weight_view(2).shape)
    for i, edit in enumerate(distinct_edits()):
        editor.apply(lm, [edit])
        written = ((editor.memory - before) != 0).any(0)
        mean = prompt_input(lm, 2, edit.rendered_prompt).float().mean(0)
        want = top_hash((mean - editor.background)[None], editor.params.top_k, editor.permutation)[0]
        assert torch.equal(editor.masks[i], want)
        assert torch.equal(written, want), i
        before = editor.memory.clone()
    masks = editor.masks
    assert len(masks) == 3 and (masks.sum(1) == 37).all()
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    editor.apply(lm, [distinct_edits()[0]])  # the same prompt again: its mask is not stored twice
    assert len(editor.masks) == 3 and editor.edits == 4


@pytest.fixture(scope="module")
def edited():
    lm = load_model("tiny-llama")
    base = snapshot(lm)
    editor = make_editor("memoir", SET).bind(lm)
    for edit in distinct_edits():
        assert not editor.apply(lm, [edit]).changes
    return lm, editor, base


def test_weights_bitwise_unchanged(edited):
    lm, _, base = edited
    assert_weights_equal(lm, base)


def test_an_edits_prompt_reads_its_own_mask(edited):
    lm, editor, _ = edited
    base = load_model("tiny-llama")
    for i, edit in enumerate(distinct_edits()):
        got = logits(lm, [edit.rendered_prompt])
        assert editor.last_match.tolist() == [i]
        assert not torch.equal(got, logits(base, [edit.rendered_prompt]))
    texts = [e.rendered_prompt for e in distinct_edits()] + list(UNRELATED)
    logits(lm, texts)  # one padded batch: each row is routed on its own tokens
    assert editor.last_match[:3].tolist() == [0, 1, 2]


def test_unrelated_prompts_leave_the_output_unchanged(edited):
    lm, editor, _ = edited
    base = load_model("tiny-llama")
    unrouted = 0
    for text in UNRELATED:
        got = logits(lm, [text])
        if int(editor.last_match[0]) < 0:
            unrouted += 1
            assert torch.equal(got, logits(base, [text])), text
    assert unrouted >= 2


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=40))
def test_unrouted_text_equals_base(edited, text):
    lm, editor, _ = edited
    got = logits(lm, [text])
    if int(editor.last_match[0]) < 0:
        assert torch.equal(got, logits(load_model("tiny-llama"), [text]))


def test_state_round_trip_restores_routing(tmp_path, edited):
    lm, editor, _ = edited
    store = DeltaStore.for_scope(tmp_path, lm.model, editor.scope(lm))
    assert make_editor("memoir", SET).state_dict() == {}
    store.commit(1, editor.apply(lm, []), editor.state_dict())
    other_lm = load_model("tiny-llama")
    other = make_editor("memoir", {**SET, "seed": "7", "background": "pool"}).bind(other_lm)
    other.load_state_dict(store.load_state(1))  # the permutation and background come with the state
    for key, value in editor.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key
    texts = [e.rendered_prompt for e in distinct_edits()] + list(UNRELATED)
    assert torch.equal(logits(other_lm, texts), logits(lm, texts))
    other.load_state_dict({})
    assert torch.equal(logits(other_lm, texts), logits(load_model("tiny-llama"), texts))


def test_resume_and_checkout_equal_live(tmp_path, stream_file):
    cfg = RunConfig(model="tiny-llama", editor="memoir", stream=str(stream_file), probe_every=2, editor_overrides=SET)
    lm = load_model("tiny-llama")
    full = replay(cfg, tmp_path / "full", lm=lm, progress=False)
    replay(cfg, tmp_path / "resumed", progress=False, stop_after=3)
    resumed = replay(cfg, tmp_path / "resumed", progress=False)
    cols = ["step", "probe", "metric", "protocol", "edit_id"]
    assert full.run.results().drop("run_id").sort(cols).equals(resumed.run.results().drop("run_id").sort(cols))
    texts = [e.rendered_prompt for e in make_edits(6)] + list(UNRELATED)
    assert torch.equal(logits(checkout(tmp_path / "full", 6), texts), logits(lm, texts))
    assert not torch.equal(logits(checkout(tmp_path / "full", 0), texts), logits(lm, texts))


def test_passes_the_kit():
    report = check_editor(
        lambda: MEMOIREditor(MEMOIRParams(max_steps=3, templates=1, background="pool")),
        model="tiny-llama",
        max_examples=3,
        max_edits=3,
    )
    report.raise_if_failed()


def test_stop_rule_is_the_originals_meter():
    lm = load_model("tiny-llama")
    edit = make_edits(1)[0]
    loose = make_editor("memoir", {**SET, "stop_loss": "1e9", "stop_delta": "1e9"}).bind(lm)
    loose.apply(lm, [edit])  # the meter starts at (0, 1e9): any bounds this loose stop before a step
    assert loose.last_steps == [0]
    never = make_editor("memoir", {**SET, "stop_loss": "-1"}).bind(lm)
    never.apply(lm, [edit])
    assert never.last_steps == [int(SET["max_steps"])]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"irr_threshold": "1.5"}, "memoir: irr_threshold must be in [0, 1], got 1.5"),
        ({"aggregate": "max"}, "memoir: aggregate must be mean_decentered, mean or last, got 'max'"),
        ({"background": "wiki"}, "memoir: background must be zsre_mend or pool, got 'wiki'"),
        ({"templates": "11"}, "memoir: templates must be in 0..10"),
        ({"top_k": "0"}, "memoir.top_k: must be at least 1, got 0"),
        ({"clip_norm": "0"}, "memoir: clip_norm must be greater than 0, got 0.0"),
    ],
)
def test_bad_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises((UserError, HyperparameterError)) as err:
        make_editor("memoir", overrides)
    assert str(err.value) == message


def test_top_k_wider_than_the_layer_is_refused_at_bind():
    with pytest.raises(UserError, match=r"^memoir: top_k 129 exceeds the 128 input columns of layer 3$"):
        make_editor("memoir", {"top_k": "129"}).bind(load_model("tiny-llama"))
