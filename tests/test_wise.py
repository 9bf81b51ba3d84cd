"""WISE: weights untouched, TIES merge, shard schedule and masks, routing, state round trip."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifelong.core.models import load_model
from lifelong.core.scorer import Scorer
from lifelong.editors import make_editor
from lifelong.editors.wise import (
    IRRELEVANT,
    WISEEditor,
    WISEParams,
    act_distance,
    margin_loss,
    merge_into,
    mlp_activation,
    ties_merge,
)
from tests.adaptor_helpers import assert_weights_equal, logits, snapshot
from tests.conftest import make_edits

SET = {
    "layer": "2",
    "max_steps": "25",
    "lr": "0.5",
    "norm_constraint": "0.5",
    "alpha": "0.5",
    "beta": "2",
    "gamma": "1",
    "save_freq": "2",
    "merge_freq": "4",
}


def test_ties_merge_hand_case():
    a = torch.tensor([3.0, -1.0, 0.2, 2.0])
    b = torch.tensor([1.0, 2.0, -0.1, -4.0])
    # density 0.5 keeps a: [3, 0, 0, 2], b: [0, 2, 0, -4]; signs of the sums: +, +, 0, -
    out = ties_merge([a, b], [0.5, 0.5], density=0.5)
    assert torch.allclose(out, torch.tensor([3.0, 2.0, 0.0, -4.0]))
    out = ties_merge([a, b], [0.5, 0.5], density=1.0)  # sign of 0.5·2 − 0.5·4 < 0: only b's entry agrees
    assert torch.allclose(out, torch.tensor([2.0, 2.0, 0.2, -4.0]))


@pytest.fixture(scope="module")
def edited():
    lm = load_model("tiny-llama")
    base_weights = snapshot(lm)
    editor = make_editor("wise", SET).bind(lm)
    scorer = Scorer(lm.model, lm.tokenizer)
    edits = make_edits(5)
    pairs = [(e.rendered_prompt, e.target_new) for e in edits]
    before = scorer.score(pairs).nll
    history = []
    for e in edits:
        assert not editor.apply(lm, [e]).changes
        history.append((len(editor.closed), editor.side is not None, editor.current is not None))
    return lm, editor, base_weights, before, scorer.score(pairs).nll, history


def test_weights_bitwise_unchanged(edited):
    lm, _, base, *_ = edited
    assert_weights_equal(lm, base)


def test_shards_close_and_merge_on_schedule(edited):
    _, editor, _, _, _, history = edited
    # save_freq 2, merge_freq 4: closed after 2, merged (and cleared) after 4, a new open shard at 5
    assert history == [(0, False, True), (1, False, False), (1, False, True), (0, True, False), (0, True, True)]
    shape = editor.current.shape
    outside = ~editor.mask(editor.shard_index, shape)
    assert (editor.current[outside] == 0).all() and (editor.current != 0).any()
    assert 0.1 < editor.mask(0, shape).float().mean() < 0.3  # mask_ratio 0.2


def test_edits_take_hold(edited):
    *_, before, after, _ = edited
    assert (after < before).mean() >= 0.8, (before, after)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=40))
def test_unrouted_prompts_equal_base(edited, text):
    lm, editor, *_ = edited
    base = load_model("tiny-llama")
    got, want = logits(lm, [text]), logits(base, [text])
    if not bool(editor.last_routed.any()):
        assert torch.equal(got, want)


def test_state_round_trip_restores_routing(edited):
    lm, editor, *_ = edited
    other_lm = load_model("tiny-llama")
    other = make_editor("wise", SET).bind(other_lm)
    other.load_state_dict(editor.state_dict())
    texts = [e.rendered_prompt for e in make_edits(5)] + ["An unrelated sentence about soup."]
    assert torch.equal(logits(other_lm, texts), logits(lm, texts))
    other.load_state_dict({})
    assert torch.equal(logits(other_lm, texts), logits(load_model("tiny-llama"), texts))


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="multiple of save_freq"):
        make_editor("wise", {"save_freq": "3", "merge_freq": "4"})


def test_ties_merge_elects_plus_on_a_zero_sum():
    # the WISE code's sign election: majority = + when the weighted sum is >= 0
    out = ties_merge([torch.tensor([2.0, 1.0]), torch.tensor([-2.0, 3.0])], [0.5, 0.5], density=1.0)
    assert torch.allclose(out, torch.tensor([2.0, 2.0]))


def test_act_distance_applies_the_mlp_activation_by_hand():
    silu = mlp_activation(load_model("tiny-llama"))
    assert torch.allclose(silu(torch.tensor([1.0])), torch.tensor([1.0 / (1 + math.exp(-1.0))]))
    base = torch.tensor([[[0.0, 1.0], [2.0, -1.0], [5.0, 5.0]]])
    change = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    real = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    s = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    tok0 = math.hypot(s(1.0) - s(0.0), s(1.0) - s(1.0))
    tok1 = math.hypot(s(2.0) - s(2.0), s(0.0) - s(-1.0))
    got = act_distance(base, change, real, silu)
    assert got.item() == pytest.approx((tok0 + tok1) / 2, rel=1e-6)
    assert act_distance(base, change, real, None).item() == pytest.approx(1.0)  # activation=none: ‖change‖
    assert act_distance(base, change, torch.ones(1, 3), silu, long_row=2).item() == pytest.approx(
        float((silu(torch.tensor([14.0, 14.0])) - silu(torch.tensor([5.0, 5.0]))).norm()), rel=1e-6
    )  # max
    assert mlp_activation(load_model("tiny-gpt2")).__class__.__name__ == "NewGELUActivation"


def test_margin_loss_by_hand():
    # α, β, γ = 5, 20, 10: gap terms 8−25+10 = −7 and 8−15+10 = 3 (mean of positives 3); 8−5 = 3; 20−15 = 5
    loss = margin_loss(torch.tensor([25.0, 15.0]), torch.tensor([8.0]), alpha=5, beta=20, gamma=10)
    assert loss.item() == pytest.approx(11.0)
    assert margin_loss(torch.tensor([30.0]), torch.tensor([1.0]), 5, 20, 10).item() == 0.0


def test_original_defaults():
    p = WISEParams()
    assert (p.alpha, p.beta, p.gamma, p.norm_constraint, p.act_ratio) == (5.0, 20.0, 10.0, 1.0, 0.88)
    assert (p.lr, p.max_steps, p.mask_ratio, p.density, p.stop_loss, p.stop_delta) == (1.0, 70, 0.2, 0.53, 0.02, 1e-4)
    assert (p.variant, p.activation, p.templates) == ("merge", "model", 10)


def test_context_templates_are_the_bare_prompt_and_ten_greedy_prefixes():
    lm = load_model("tiny-llama")
    editor = make_editor("wise", SET).bind(lm)
    templates = editor.context_templates(lm)
    assert len(templates) == 11 and templates[0] == "{}"
    starts = ["I", "You", "Because", "Yes", "Q: "] * 2
    assert all(t.startswith(st_.strip()) and t.endswith(" {}") for t, st_ in zip(templates[1:], starts))
    assert make_editor("wise", SET).bind(lm).context_templates(lm) == templates  # greedy: deterministic
    assert make_editor("wise", {**SET, "templates": "0"}).bind(lm).context_templates(lm) == ["{}"]


def test_irrelevant_input_is_one_sentence_per_edit():
    edit = make_edits(1)[0]
    prompt, answer = WISEEditor(WISEParams()).irrelevant_pair(edit)
    assert prompt + " " + answer in IRRELEVANT
    near = WISEEditor(WISEParams(irrelevant="neighborhood")).irrelevant_pair(edit)
    if edit.neighborhood:
        assert near == (edit.neighborhood[0].prompt, edit.neighborhood[0].answer)


def test_stop_rule_on_the_total_loss():
    lm = load_model("tiny-llama")
    e = make_edits(1)[0]
    # any loss passes: training stops at the first check with two recorded losses (the third forward)
    loose = make_editor("wise", {**SET, "stop_loss": "1e9", "stop_delta": "1e9"}).bind(lm)
    loose.apply(lm, [e])
    assert loose.last_steps == 2
    never = make_editor("wise", {**SET, "stop_loss": "-1"}).bind(lm)
    never.apply(lm, [e])
    assert never.last_steps == int(SET["max_steps"]) - 1


def test_merge_before_evaluation_and_retrieve(edited):
    lm, editor, *_ = edited  # 5 edits, save_freq 2, merge_freq 4: merged side, open shard with edit 5
    closed, current = list(editor.closed), editor.current.clone()
    ((view, threshold),) = editor.memories()
    assert torch.equal(view, merge_into(editor.side, [current], editor.params.density))
    assert threshold == pytest.approx(editor.params.act_ratio * editor.min_act)
    assert editor.closed == closed and torch.equal(editor.current, current)  # evaluating changes no state

    other = make_editor("wise", SET).bind(load_model("tiny-llama"))
    other.load_state_dict(editor.state_dict())
    other.edits = 3  # a closed shard pending as well: both are merged (no side yet: weights ½, ½)
    other.side, other.closed = None, [(0, current * 2, 1.0)]
    other._view = None
    ((view, _),) = other.memories()
    assert torch.equal(view, ties_merge([current * 2, current], [0.5, 0.5], other.params.density))
    other.edits = 1  # fewer than save_freq edits: the open shard alone, unmerged
    other.closed, other._view = [], None
    assert [torch.equal(d, current) for d, _ in other.memories()] == [True]

    retrieve = make_editor("wise", {**SET, "variant": "retrieve"})
    retrieve.edits, retrieve.current, retrieve.min_act = 3, current, 1.0
    retrieve.closed, retrieve.current_min_act = [(0, current * 2, 4.0)], 2.0
    retrieve._view = None
    mems = retrieve.memories()  # the open shard, then the closed shard, each with its own threshold
    assert [torch.equal(d, w) for (d, _), w in zip(mems, [current, current * 2])] == [True, True]
    assert [t for _, t in mems] == pytest.approx([0.88 * 2.0, 0.88 * 4.0])


def test_retrieve_groups_shards_at_merge_freq():
    lm = load_model("tiny-llama")
    editor = make_editor("wise", {**SET, "variant": "retrieve", "max_steps": "3"}).bind(lm)
    for e in make_edits(4):
        editor.apply(lm, [e])
    assert editor.side is None and not editor.closed and len(editor.groups) == 1 and editor.current is None
    other = make_editor("wise", {**SET, "variant": "retrieve"})
    other.load_state_dict(editor.state_dict())
    assert torch.equal(other.groups[0][0], editor.groups[0][0]) and other.groups[0][1] == editor.groups[0][1]
