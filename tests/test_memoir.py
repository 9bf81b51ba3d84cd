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
from lifelong.editors.memoir import MEMOIRParams, default_memoir_layer, default_top_k, top_hash
from lifelong.replay import checkout, replay
from lifelong.run import RunConfig
from streams.errors import UserError
from tests.adaptor_helpers import assert_weights_equal, logits, snapshot
from tests.conftest import make_edits

# Few steps, and a threshold that tells prompts apart on the tiny random model (its features overlap
# more than a trained model's: two unrelated prompts share about half their columns there).
SET = {"layer": "2", "max_steps": "8", "templates": "2", "irr_threshold": "0.9", "background": "pool"}
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
    # the second edit, hashed elsewhere, leaves the first's own columns as the first left them
    first = make_editor("memoir", {**SET, "weight_decay": "0"}).bind(lm)
    first.apply(lm, distinct_edits()[:1])
    only_first = masks[0] & ~masks[1] & ~masks[2]
    assert only_first.any()
    assert torch.equal(editor.memory[:, only_first], first.memory[:, only_first])
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    editor.apply(lm, [distinct_edits()[0]])  # the same prompt again: its mask is not stored twice
    assert len(editor.masks) == 3 and editor.edits == 4


def test_weight_decay_shrinks_the_other_columns_as_sgd_does():
    """The original's SGD decays the whole memory: outside the mask, each step multiplies by 1 - lr·wd."""
    lm = load_model("tiny-llama")
    editor = make_editor("memoir", {**SET, "weight_decay": "0"}).bind(lm)
    first, second = distinct_edits()[:2]
    editor.apply(lm, [first])
    before = editor.memory.clone()
    editor.params = replace(editor.params, weight_decay=0.01)
    editor.apply(lm, [second])
    outside = ~editor.masks[1]
    steps = editor.last_steps[0]
    assert steps > 0
    want = before[:, outside] * (1 - 0.01) ** steps
    assert torch.allclose(editor.memory[:, outside], want, rtol=1e-5, atol=0)
    assert not torch.equal(editor.memory[:, outside], before[:, outside])


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


def test_routing_is_the_best_overlap_at_or_above_the_threshold(edited):
    """The authors' rule: the stored mask of largest overlap |m ∩ s| / top_k is read when that overlap
    is ≥ irr_threshold; below it, nothing."""
    lm, editor, _ = edited
    saved = (editor.masks, editor.params)
    text = UNRELATED[2]
    own = editor.masks_for(editor.prompt_feature(lm, text)[None])[0]
    on, off = own.nonzero().flatten(), (~own).nonzero().flatten()
    k = editor.top_k

    def stored_with(shared: int) -> torch.Tensor:
        mask = torch.zeros_like(own)
        mask[on[:shared]] = True
        mask[off[: k - shared]] = True
        return mask

    try:
        # overlaps 10/37 and 20/37: the second is the best
        editor.masks = torch.stack([stored_with(10), stored_with(20)])
        editor._version += 1
        for threshold, want in ((20 / k, 1), (20 / k + 1e-6, -1), (0.0, 1)):
            editor.params = replace(saved[1], irr_threshold=threshold)
            logits(lm, [text])
            assert editor.last_match.tolist() == [want], threshold
    finally:
        editor.masks, editor.params = saved
        editor._version += 1


def test_an_answers_later_tokens_read_through_the_prompts_mask(edited):
    """The scorer runs a prompt, then the answer's later tokens over the prompt's KV cache; as in the
    original's teacher-forced forward, every position reads M through the mask the prompt selected."""
    from lifelong.core.scorer import Scorer

    lm, editor, _ = edited
    edit = distinct_edits()[1]
    answer = " Nova and the river of the old town"
    scorer = Scorer(lm.model, lm.tokenizer)
    got = scorer.score([(edit.rendered_prompt, answer)]).logprob[0]
    assert editor.last_match.tolist() == [1]  # the continuation pass took the prompt's route

    # the reference: one forward of the base model over prompt + answer, M read through mask 1 everywhere
    base = load_model("tiny-llama")
    prompt_ids, answer_ids = scorer.encode(edit.rendered_prompt, answer)
    assert len(answer_ids) > 3
    ids = torch.tensor([prompt_ids + answer_ids])
    mask = editor.masks[1].float()

    def read(mod, args, out, memory=editor.memory):
        return out + torch.nn.functional.linear(args[0].float() * mask, memory).to(out.dtype)

    with torch.no_grad():
        handle = base.adapter.out_proj(2).register_forward_hook(read)
        try:
            full = base.model(input_ids=ids).logits[0].float().log_softmax(-1)
        finally:
            handle.remove()
        plain = base.model(input_ids=ids).logits[0].float().log_softmax(-1)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(answer_ids) - 1)
    want = sum(float(full[p, t]) for p, t in zip(positions, answer_ids))
    unread = sum(float(plain[p, t]) for p, t in zip(positions, answer_ids))
    assert abs(got - want) < 1e-3
    assert abs(unread - want) > 1e-2  # the memory matters here, so a wrong route would be seen


def test_generated_tokens_keep_the_prompts_route(edited):
    from lifelong.core.model_access import generate

    lm, editor, _ = edited
    edit = distinct_edits()[2]
    routes = []
    original = editor._hook

    def spy(module, args, out):
        result = original(module, args, out)
        routes.append(editor.last_match.tolist())
        return result

    editor._hooks.remove()
    editor._bound_to = None
    editor._hook = spy
    try:
        editor.bind(lm)
        generate(lm.model, lm.tokenizer, [edit.rendered_prompt, UNRELATED[0]], max_new_tokens=4)
    finally:
        del editor._hook
        editor._hooks.remove()
        editor._bound_to = None
        editor.bind(lm)
    assert len(routes) > 1
    first = routes[0]
    assert 2 in first
    # rows may be dropped as they finish; the edit's row keeps route 2 while it lives
    assert all(2 in r or len(r) < len(first) for r in routes[1:])


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
