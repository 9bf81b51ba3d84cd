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


def test_ft_defaults_follow_the_family_file(tiny):
    from lifelong.editors.ft import FT_FAMILY_FILES, FT_FILES

    p = make_editor("ft").bind(tiny).params
    assert p.hparams == FT_FAMILY_FILES[tiny.adapter.family]  # recorded in the manifest's hyperparameters
    published = FT_FILES[p.hparams]
    assert (p.lr, p.max_steps, p.stop_loss) == (published["lr"], 25, 1e-2)
    assert (p.objective, p.stop_rule, p.batch_size) == ("prompt_last", "epoch-mean", published["batch_size"])
    assert p.layer == tiny.num_layers // 5  # the file's layer 21 is beyond the tiny model: depth-scaled
    former = make_editor("ft", {"hparams": "none"}).bind(tiny).params
    assert (former.lr, former.norm_constraint, former.stop_loss) == (1e-2, 1e-2, 0.05)
    assert (former.objective, former.stop_rule) == ("target_new", "every-edit")
    with pytest.raises(HyperparameterError, match="hparams must be 'family' or one of"):
        make_editor("ft", {"hparams": "gpt2.json"})
    with pytest.raises(HyperparameterError, match="objective must be one of prompt_last, target_new"):
        make_editor("ft", {"objective": "last"})


def test_prompt_last_reads_every_target_token_at_the_last_prompt_position(tiny):
    """ROME's FT-L loss: mean over the target's tokens of -log p(token | prompt), all from the
    distribution at the prompt's last position (kmeng01/rome baselines/ft/ft_main.py)."""
    editor = make_editor("ft", {"objective": "prompt_last"}).bind(tiny)
    edits = make_edits(2)
    scorer = Scorer(tiny.model, tiny.tokenizer)
    encoded = [scorer.encode(e.rendered_prompt, e.target_new) for e in edits]
    with torch.no_grad():
        got = editor._per_edit_nll(scorer, scorer.collate(encoded))
        for k, (prompt, answer) in enumerate(encoded):
            last = tiny.model(torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)
            assert len(answer) >= 1
            assert got[k].item() == pytest.approx(-last[list(answer)].mean().item(), abs=1e-5)


def test_norm_constraint_zero_is_no_bound_and_stop_loss_skips_steps(tiny):
    edit = make_edits(1)[0]
    free = make_editor("ft", {**TINY_FT, "norm_constraint": "0"})
    change = free.apply(tiny, [edit]).changes[free.scope(tiny)[0]].dense
    assert change.abs().max() > float(TINY_FT["norm_constraint"])  # unbounded, as the files' `false`
    # A chunk whose loss is already below stop_loss takes no step (the original's rule).
    idle = make_editor("ft", {**TINY_FT, "stop_loss": "1000"})
    assert not idle.apply(tiny, [edit]).changes[idle.scope(tiny)[0]].dense.any()
