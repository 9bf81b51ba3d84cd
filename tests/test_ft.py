import pytest
import torch

from lifelong.core.scorer import Scorer
from lifelong.editors import HyperparameterError, UnknownEditorError, make_editor
from tests.conftest import TINY_FT, make_edits


def test_ft_edits_in_scope_within_bound(tiny):
    editor = make_editor("ft", TINY_FT)
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    edit = make_edits(1)[0]
    scorer = Scorer(tiny.model, tiny.tokenizer)
    nll_before = scorer.score([(edit.rendered_prompt, edit.target_new)]).nll[0]
    delta = editor.apply(tiny, [edit])
    (scope,) = editor.scope(tiny)
    assert set(delta.changes) == {scope}
    for n, p in tiny.model.named_parameters():
        if n != scope:
            assert torch.equal(p, before[n]), n
    change = delta.changes[scope].dense
    assert change.abs().max() <= float(TINY_FT["norm_constraint"]) + 1e-7
    # The live weight is exactly base + delta (checkout repeats the same operation).
    assert torch.equal(tiny.model.get_parameter(scope), before[scope] + change)
    assert scorer.score([(edit.rendered_prompt, edit.target_new)]).nll[0] < nll_before - 0.5


def test_ft_empty_batch_changes_nothing(tiny):
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    delta = make_editor("ft", TINY_FT).apply(tiny, [])
    assert not delta
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())


def test_ft_is_deterministic():
    from lifelong.core.models import load_model

    results = []
    for _ in range(2):
        lm = load_model("tiny-llama")
        make_editor("ft", TINY_FT).apply(lm, make_edits(2))
        results.append(lm.model.get_parameter(lm.adapter.out_proj_param_name(1)).detach().clone())
    assert torch.equal(*results)


def test_ft_layer_out_of_range(tiny):
    with pytest.raises(ValueError, match="layer 99 out of range"):
        make_editor("ft", {"layer": "99"}).scope(tiny)


def test_registry_errors():
    with pytest.raises(UnknownEditorError, match="unknown editor 'rome2'"):
        make_editor("rome2")
    with pytest.raises(HyperparameterError, match="no hyperparameter 'lrr'"):
        make_editor("ft", {"lrr": "1"})
    with pytest.raises(HyperparameterError, match="ft.lr: cannot read 'fast' as float"):
        make_editor("ft", {"lr": "fast"})
    assert make_editor("ft", {"layer": "none", "max_steps": "3"}).params.max_steps == 3


def test_default_layer_is_resolved_per_model(tiny):
    editor = make_editor("ft").bind(tiny)
    assert editor.params.layer == tiny.num_layers // 5
    assert editor.hyperparameters()["layer"] == editor.params.layer
