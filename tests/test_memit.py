"""MEMIT's normal equations and AlphaEdit's null-space guarantee, on tiny models."""

import pytest
import torch

from lifelong.editors import make_editor
from tests.conftest import make_edits

FAST = {"v_steps": "5", "templates": "3", "layers": "1,2", "cov_tokens": "1024"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))


def dense(change):
    return change.materialize().double()


def test_memit_solution_satisfies_normal_equations(tiny):
    editor = make_editor("memit", FAST).bind(tiny)
    m = tiny.adapter.out_proj_weight_view(1).shape[1]
    d = tiny.adapter.out_proj_weight_view(1).shape[0]
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(m, 3, generator=gen, dtype=torch.float64)
    residual = torch.randn(d, 3, generator=gen, dtype=torch.float64)
    u, v = editor.solve(tiny, 1, keys, residual)
    delta = u @ v.T
    a = editor.params.mom2_weight * editor.second_moment(tiny, 1) + keys @ keys.T
    assert torch.allclose(delta @ a, residual @ keys.T, rtol=1e-8, atol=1e-8)


def test_memit_batch_updates_every_layer_with_rank_at_most_batch(tiny):
    editor = make_editor("memit", FAST)
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    delta = editor.apply(tiny, make_edits(2))
    assert set(delta.changes) == set(editor.scope(tiny))
    for name, change in delta.changes.items():
        assert change.rank == 2
        assert torch.equal(tiny.model.get_parameter(name), before[name] + change.materialize())
    for name, p in tiny.model.named_parameters():
        if name not in delta.changes:
            assert torch.equal(p, before[name])


def test_alphaedit_leaves_preserved_keys_outputs_unchanged(tiny):
    # Random tiny models have flat key spectra: a larger fraction still leaves a null space.
    editor = make_editor("alphaedit", {**FAST, "nullspace_threshold": "0.1"}).bind(tiny)
    delta = editor.apply(tiny, make_edits(2))
    for layer in (1, 2):
        c = editor.second_moment(tiny, layer)
        values, vectors = torch.linalg.eigh(c)
        preserved = vectors[:, values >= editor.params.nullspace_threshold * values.max()]  # preserved keys
        assert preserved.shape[1] > 0
        change = dense(delta.changes[tiny.adapter.out_proj_param_name(layer)])
        change = change.T if tiny.adapter.spec.transposed else change  # (out, in)
        leak = (change @ preserved).norm() / (change.norm() * preserved.norm())
        assert change.norm() > 0 and leak < 1e-6, leak


def test_alphaedit_accumulates_keys_as_state(tiny):
    editor = make_editor("alphaedit", {**FAST, "nullspace_threshold": "0.1"})
    assert editor.state_dict() == {}
    editor.apply(tiny, make_edits(1))
    first = editor.state_dict()
    assert set(first) == {"past_keys.1", "past_keys.2"} and first["past_keys.1"].shape[1] == 1
    editor.apply(tiny, make_edits(2, start=1))
    assert editor.state_dict()["past_keys.2"].shape[1] == 3
    # A step saves only its own keys; restoring from the steps' states rebuilds the whole.
    second_step = editor.step_state()
    assert second_step["past_keys.2"].shape[1] == 2
    rebuilt = make_editor("alphaedit", FAST)
    rebuilt.load_step_states([first, second_step])
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in editor.state_dict().items())
    fresh = make_editor("alphaedit", FAST)
    with pytest.raises(ValueError, match="no eigenvalue"):
        make_editor("alphaedit", {**FAST, "nullspace_threshold": "1e-9"}).apply(tiny, make_edits(1))
    fresh.load_state_dict(first)
    assert torch.equal(fresh.state_dict()["past_keys.1"], first["past_keys.1"])
    with pytest.raises(ValueError, match="unexpected state"):
        fresh.load_state_dict({"codebook": torch.zeros(1)})


def test_layer_spec_errors(tiny):
    with pytest.raises(ValueError, match="out of range"):
        make_editor("memit", {"layers": "1,9"}).bind(tiny)
    with pytest.raises(ValueError, match="comma-separated"):
        make_editor("memit", {"layers": "a,b"}).bind(tiny)


def test_default_lambda_scales_with_key_width(tiny):
    editor = make_editor("memit", {"layers": "1"}).bind(tiny)
    width = tiny.adapter.out_proj_weight_view(1).shape[1]
    assert editor.params.mom2_weight == pytest.approx(15000 * width / 16384)
    assert editor.hyperparameters()["mom2_weight"] == editor.params.mom2_weight  # recorded in manifests
    assert make_editor("memit", {"layers": "1", "mom2_weight": "7"}).bind(tiny).params.mom2_weight == 7
