"""Knowledge Neurons on tiny models: IG completeness, neuron selection, the sparse value-vector edit."""

from __future__ import annotations

import pytest
import torch

from lifelong.core.delta import DeltaStore
from lifelong.core.scorer import Scorer
from lifelong.editors import make_editor
from lifelong.editors.kn import attribution, layer_attribution, parse_layers, select_neurons

FAST_KN = {"layers": "1-2", "ig_steps": "6"}
PAPER_KN = {**FAST_KN, "rule": "paper", "prompts": "paraphrases"}  # the paper's rule and selection


def _completeness_error(lm, layer, prompt, answer, steps):
    scorer = Scorer(lm.model, lm.tokenizer)
    r = layer_attribution(lm, layer, *scorer.encode(prompt, answer), steps)
    return (r.scores.sum(1) - (r.prob_input - r.prob_baseline)).abs().max().item(), r


@pytest.mark.parametrize("layer", [0, 2])
def test_ig_attributions_sum_to_the_output_difference(tiny, layer):
    coarse, _ = _completeness_error(tiny, layer, "The capital of Country1 is", "Nova1", 4)
    fine, r = _completeness_error(tiny, layer, "The capital of Country1 is", "Nova1", 32)
    gap = (r.prob_input - r.prob_baseline).abs().max().item()
    assert gap > 1e-4  # the check would be empty if zeroing the layer changed nothing
    assert fine < 0.02 * gap and fine < coarse / 4  # midpoint rule: error shrinks ~ 1/m²


def test_ig_probabilities_are_the_models(tiny):
    scorer = Scorer(tiny.model, tiny.tokenizer)
    prompt, answer = scorer.encode("Bo speaks", "Dutch")
    r = layer_attribution(tiny, 1, prompt, answer, 2)
    nll = scorer.score([("Bo speaks", "Dutch")]).nll[0]
    assert torch.log(r.prob_input).mean().item() == pytest.approx(-nll, abs=1e-4)
    assert attribution(tiny, [1, 3], prompt, answer, 2).shape == (2, r.scores.shape[1])


def test_selection_by_threshold_and_sharing():
    a = torch.tensor([[1.0, 0.3, 0.1, 0.0]])
    b = torch.tensor([[0.9, 0.05, 0.5, 0.0]])
    c = torch.tensor([[0.2, 1.0, 0.3, -1.0]])
    mask = select_neurons([a, b, c], threshold=0.25, share=0.5)  # coarse: {0,1}, {0,2}, {1,2}
    assert mask.tolist() == [[True, True, True, False]]
    assert select_neurons([a, b, c], threshold=0.25, share=0.7).tolist() == [[False, False, False, False]]
    assert not select_neurons([-a.abs()], 0.2, 0.5).any()  # no positive attribution: no neurons


def test_layer_specs():
    assert parse_layers("", 30, "kn") == list(range(20, 30))
    assert parse_layers("all", 4, "kn") == [0, 1, 2, 3]
    assert parse_layers("1-2,0", 4, "kn") == [0, 1, 2]
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("3-5", 4, "kn")
    with pytest.raises(ValueError, match="cannot read layers"):
        parse_layers("x", 4, "kn")


def test_edit_moves_only_the_selected_value_vectors(tiny, edits, tmp_path):
    """The paper's rule (λ₂ = 8, signed) on the paraphrase-shared neurons: the new answer gains."""
    editor = make_editor("kn", PAPER_KN).bind(tiny)
    edit = edits[1]
    layers, mask, _ = editor.neurons(tiny, edit)
    assert mask.any(), "the tiny model should have knowledge neurons for this fact"
    base = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    scorer = Scorer(tiny.model, tiny.tokenizer)
    before = scorer.score([(edit.rendered_prompt, edit.target_new)]).nll[0]
    store = DeltaStore.for_scope(tmp_path, tiny.model, editor.scope(tiny))
    delta = editor.apply(tiny, [edit])
    store.commit(1, delta)
    dim = 0 if tiny.adapter.spec.transposed else 1
    for row, layer in enumerate(layers):
        name = tiny.adapter.out_proj_param_name(layer)
        selected = mask[row].nonzero()[:, 0]
        if not len(selected):
            assert name not in delta.changes
            continue
        change = delta.changes[name]
        assert change.sparse and change.dim == dim and torch.equal(change.index, selected)
        param = tiny.model.get_parameter(name)
        assert torch.equal(param, base[name] + change.materialize())
        view = tiny.adapter.out_proj_weight_view(layer) - tiny.adapter.as_stored(base[name])
        assert torch.count_nonzero(view.abs().sum(0)) == len(selected)  # only those (out, in) columns moved
    assert delta.nbytes < sum(base[n].numel() for n in delta.changes) * 4 / 8
    after = scorer.score([(edit.rendered_prompt, edit.target_new)]).nll[0]
    assert after < before
    store.revert_to_base(tiny.model)
    assert all(torch.equal(p, base[n]) for n, p in tiny.model.named_parameters())


def _greedy(lm, ids, n):
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


@pytest.mark.parametrize("rule", ["toolkit", "paper"])
def test_each_selected_column_moves_by_the_rules_formula(tiny, edits, rule):
    """Hand computation with the input embedding table e: toolkit (default) Δv_i = E(new) − E(greedy old),
    E = 2·e(t) for one token, Σ_j e(t_j) for more, no sign; paper Δv_i = sign(a_i)·(8·ē(new) − 1·ē(true))."""
    editor = make_editor("kn", FAST_KN if rule == "toolkit" else PAPER_KN).bind(tiny)
    assert editor.params.rule == rule
    edit = edits[1]
    scorer = Scorer(tiny.model, tiny.tokenizer)
    prompt, new = scorer.encode(edit.rendered_prompt, edit.target_new)
    e = tiny.model.get_input_embeddings().weight.detach().clone()
    if rule == "toolkit":
        old = _greedy(tiny, prompt, len(new))
        side = lambda ids: 2 * e[ids[0]] if len(ids) == 1 else e[list(ids)].sum(0)  # noqa: E731
        expected = side(list(new)) - side(old)
    else:
        true = scorer.encode(edit.rendered_prompt, edit.target_true)[1]
        expected = 8 * e[list(new)].mean(0) - 1 * e[list(true)].mean(0)
    layers, mask, _ = editor.neurons(tiny, edit)
    assert mask.any()
    acts = {}
    for layer in layers:  # a_i at the prompt's last position: the output projection's input

        def keep(mod, args, layer=layer):
            acts[layer] = args[0][0, -1].clone()

        h = tiny.adapter.out_proj(layer).register_forward_pre_hook(keep)
        with torch.no_grad():
            tiny.model(input_ids=torch.tensor([prompt]))
        h.remove()
    base = {layer: tiny.adapter.out_proj_weight_view(layer).detach().clone() for layer in layers}
    editor.apply(tiny, [edit])
    for row, layer in enumerate(layers):
        moved = tiny.adapter.out_proj_weight_view(layer) - base[layer]
        for i in range(moved.shape[1]):
            if not mask[row, i]:
                assert torch.count_nonzero(moved[:, i]) == 0
                continue
            want = expected if rule == "toolkit" else torch.sign(acts[layer][i]) * expected
            assert torch.allclose(moved[:, i], want, atol=1e-6), (layer, i)


def test_toolkit_answer_embedding():
    from types import SimpleNamespace

    from lifelong.editors.kn import KNEditor

    table = torch.arange(12.0).view(4, 3)
    lm = SimpleNamespace(model=SimpleNamespace(get_input_embeddings=lambda: SimpleNamespace(weight=table)))
    kn = make_editor("kn", {})
    assert isinstance(kn, KNEditor) and kn.params.scales() == (2.0, 2.0)
    assert kn._toolkit_embedding(lm, [2], 2.0).tolist() == [12.0, 14.0, 16.0]  # 2·e(2)
    assert kn._toolkit_embedding(lm, [1, 3], 2.0).tolist() == [12.0, 14.0, 16.0]  # e(1) + e(3), each once
    assert make_editor("kn", {"rule": "paper"}).params.scales() == (1.0, 8.0)
    assert make_editor("kn", {"rule": "paper", "amplify": "2"}).params.scales() == (1.0, 2.0)


def test_edit_without_a_recorded_old_answer(edits):
    from dataclasses import replace

    from lifelong.core.models import load_model

    lm = load_model("tiny-llama")
    editor = make_editor("kn", FAST_KN).bind(lm)
    delta = editor.apply(lm, [replace(edits[0], target_true=None)])
    assert all(c.sparse for c in delta.changes.values())


def test_bad_hyperparameters_are_refused(tiny):
    with pytest.raises(ValueError, match="ig_steps must be at least 1"):
        make_editor("kn", {"ig_steps": "0"}).bind(tiny)
    with pytest.raises(ValueError, match="out of range"):
        make_editor("kn", {"layers": "9"}).bind(tiny)
    with pytest.raises(ValueError, match="rule must be"):
        make_editor("kn", {"rule": "x"}).bind(tiny)
    with pytest.raises(ValueError, match="prompts must be"):
        make_editor("kn", {"prompts": "x"}).bind(tiny)
