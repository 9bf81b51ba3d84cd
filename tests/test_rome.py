"""ROME and r-ROME against their defining equation, on tiny Llama and GPT-2 models."""

import pytest
import torch

from lifelong.core.delta import Delta
from lifelong.core.scorer import Scorer
from lifelong.editors import make_editor
from lifelong.editors.covariance import key_second_moment
from lifelong.editors.locate import lowrank_change, subject_token_index
from tests.conftest import make_edits

FAST = {"v_steps": "8", "templates": "4", "layer": "1"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))


def output_at(lm, layer, key):
    module = lm.adapter.out_proj(layer)
    weight = lm.adapter.out_proj_weight_view(layer).double()
    bias = module.bias.double() if module.bias is not None else 0
    return weight @ key + bias


@pytest.mark.parametrize("name, mom2", [("rome", "false"), ("r-rome", "false"), ("rome", "true"), ("r-rome", "true")])
def test_update_writes_key_to_value_with_rank_one(tiny, name, mom2):
    editor = make_editor(name, {**FAST, "mom2": mom2, "cov_tokens": "2000"}).bind(tiny)
    edit = make_edits(1)[0]
    left, right, key, value = editor.rank_one(tiny, edit)  # computed on the unedited model
    assert not torch.allclose(output_at(tiny, 1, key), value, atol=1e-3)
    delta = editor.apply(tiny, [edit])
    (change,) = delta.changes.values()
    assert change.rank == 1
    assert torch.linalg.matrix_rank(change.materialize()) == 1  # float32 tolerance
    # W' k = v*: the defining equation, to float32 tolerance relative to ‖v*‖.
    err = (output_at(tiny, 1, key) - value).norm() / value.norm()
    assert err < 1e-4, err
    expected = lowrank_change(tiny.adapter, left, right, torch.float32).materialize()
    assert torch.allclose(change.materialize(), expected)


def test_rome_and_rrome_differ_only_in_the_key(tiny):
    edit = make_edits(1)[0]
    same = {**FAST, "mom2": "false", "context": "generated"}  # their GPT-2 files differ in the templates' starts
    _, _, k_prompt, v1 = make_editor("rome", same).bind(tiny).rank_one(tiny, edit)
    _, _, k_avg, v2 = make_editor("r-rome", same).bind(tiny).rank_one(tiny, edit)
    assert torch.allclose(v1, v2)
    assert not torch.allclose(k_prompt, k_avg)


def test_rome_moves_the_model_toward_the_target(tiny):
    """Direction only: random tiny models barely carry the subject to the answer position;
    efficacy itself is checked on the real default model."""
    edit = make_edits(1)[0]
    scorer = Scorer(tiny.model, tiny.tokenizer)
    before = scorer.score([(edit.rendered_prompt, edit.target_new)]).nll[0]
    editor = make_editor("r-rome", {"layer": "1", "mom2": "false", "v_steps": "20"})
    outside = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    delta = editor.apply(tiny, [edit])
    after = scorer.score([(edit.rendered_prompt, edit.target_new)]).nll[0]
    assert after < before
    for n, p in tiny.model.named_parameters():
        if n not in delta.changes:
            assert torch.equal(p, outside[n])


def test_batch_of_two_is_rank_two_and_replayable(tiny):
    editor = make_editor("rome", {**FAST, "mom2": "false"})
    base = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    delta = editor.apply(tiny, make_edits(2))
    ((name, change),) = delta.changes.items()
    assert change.rank == 2
    live = tiny.model.get_parameter(name).detach().clone()
    with torch.no_grad():
        tiny.model.get_parameter(name).copy_(base[name])
    Delta({name: change}).apply(tiny.model)
    assert torch.equal(tiny.model.get_parameter(name), live)


def test_second_moment_is_cached_and_symmetric(tiny, tmp_path):
    first = key_second_moment(tiny, 1, n_tokens=512, seq_len=32)
    files = sorted(p.name for p in (tmp_path / "cache" / "stats").rglob("*.safetensors"))
    assert len(files) == 2 and files[1].startswith("model-sample-"), files  # the layer's C and the sampled text
    again = key_second_moment(tiny, 1, n_tokens=512, seq_len=32)
    assert torch.equal(first, again)

    def no_sampling(*args, **kwargs):
        raise AssertionError("the sampled text should come from the cache")

    tiny.model.generate = no_sampling  # another layer: a new pass over the cached text, no new sampling
    key_second_moment(tiny, 2, n_tokens=512, seq_len=32)
    assert torch.allclose(first, first.T)
    assert torch.linalg.eigvalsh(first).min() > -1e-8
    assert first.shape[0] == tiny.adapter.out_proj_weight_view(1).shape[1]


def test_second_moment_from_text_file(tiny, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    c = key_second_moment(tiny, 2, corpus=str(corpus), n_tokens=256, seq_len=32)
    assert torch.isfinite(c).all()
    with pytest.raises(FileNotFoundError, match="covariance corpus"):
        key_second_moment(tiny, 2, corpus=str(tmp_path / "missing.txt"))


def test_subject_must_occur_in_prompt(tiny):
    with pytest.raises(ValueError, match="does not occur"):
        subject_token_index(tiny.tokenizer, "The capital of France is", "Germany")
    assert subject_token_index(tiny.tokenizer, "Hi Bob is", "Bob") == len(tiny.tokenizer("Hi Bob").input_ids) - 1


def test_one_pass_for_several_layers_matches_single_layers(tiny, tmp_path, monkeypatch):
    from lifelong.editors.covariance import key_second_moments

    both = key_second_moments(tiny, [1, 2], n_tokens=256, seq_len=32)
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "other-cache"))
    for layer in (1, 2):
        assert torch.allclose(both[layer], key_second_moment(tiny, layer, n_tokens=256, seq_len=32), atol=1e-10)


def test_rome_v_is_scaled_by_the_mlp_output(tiny):
    """ROME's compute_v: ‖δ‖ ≤ clamp_norm_factor × ‖v_orig‖ and the norm term weight_decay·‖δ‖/‖v_orig‖²,
    v_orig the MLP output at the bare prompt's subject token (MEMIT's z* uses the layer output instead)."""
    from lifelong.editors.locate import fit_value

    defaults = make_editor("rome", {}).params
    assert (defaults.clamp_norm, defaults.v_scale, defaults.templates, defaults.stop_on) == (
        4.0,
        "mlp_output",
        21,
        "total",
    )
    editor = make_editor("rome", {**FAST, "mom2": "false", "clamp_norm": "0.01", "v_dtype": "float32"}).bind(tiny)
    edit = make_edits(1)[0]
    fit = fit_value(tiny, 1, edit, editor.params, "rome")
    seen = []
    handle = tiny.adapter.out_proj(1).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        tiny.model(input_ids=torch.tensor([tiny.tokenizer(edit.rendered_prompt).input_ids]))
    handle.remove()
    v_orig = seen[0][0, subject_token_index(tiny.tokenizer, edit.rendered_prompt, edit.subject)].double()
    delta = fit.value - fit.original
    torch.testing.assert_close(fit.scale, v_orig, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fit.original, v_orig, atol=1e-5, rtol=1e-5)
    assert delta.norm().item() == pytest.approx(0.01 * v_orig.norm().item(), rel=1e-5)
    decay = editor.params.v_weight_decay  # the family file's: 1e-3 (Llama), 0.5 (GPT-2)
    assert fit.penalty == pytest.approx(decay * delta.norm().item() / v_orig.norm().item() ** 2, rel=1e-5)
