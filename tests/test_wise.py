"""WISE: weights untouched, TIES merge, shard schedule and masks, routing, state round trip."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifelong.editors import make_editor
from lifelong.editors.wise import ties_merge
from lifelong.models import load_model
from probes.scorer import Scorer
from tests.adaptor_helpers import assert_weights_equal, logits, snapshot
from tests.conftest import make_edits

SET = {"layer": "2", "max_steps": "25", "lr": "0.5", "norm_constraint": "0.5", "alpha": "0.5", "beta": "2",
       "gamma": "1", "save_freq": "2", "merge_freq": "4"}


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
