"""EMMET against its defining equation (every key of a batch written), on tiny Llama and GPT-2 models."""

from __future__ import annotations

import pytest
import torch

from lifelong.core.delta import DeltaStore
from lifelong.core.models import load_model
from lifelong.editors import make_editor
from lifelong.editors.emmet import EMMETEditor, EMMETParams, default_layers
from lifelong.editors.locate import average_key, fit_value
from lifelong.replay import checkout, replay, step_seed
from lifelong.run import RunConfig
from lifelong.testing import check_editor
from lifelong.testing.equations import invariants_for
from streams import EditStream
from streams.errors import UserError
from tests.conftest import make_edits

FAST = {"v_steps": "5", "templates": "3", "layers": "1", "cov_tokens": "1024"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))


def out_in(lm, change):
    dense = change.materialize().double()
    return dense.T if lm.adapter.spec.transposed else dense


def keys_and_residuals(lm, editor, batch):
    """K (grouped template-averaged keys) and R (z* − h = each fit's δ) on the weights before the step,
    recomputed here outside the editor."""
    p = editor.params
    templates = p.context_templates("emmet")
    keys = torch.stack([average_key(lm, 1, e, templates, "grouped") for e in batch], 1)
    residual = torch.stack([(f.value - f.original) for f in (fit_value(lm, 1, e, p, "emmet") for e in batch)], 1)
    return keys, residual


def test_every_key_of_the_batch_is_written_exactly_without_lambda(tiny):
    editor = make_editor("emmet", {**FAST, "emmet_lambda": "0"})
    batch = make_edits(4)
    keys, residual = keys_and_residuals(tiny, editor, batch)
    weight = tiny.adapter.out_proj_weight_view(1).double().clone()
    delta = editor.apply(tiny, batch)
    new_weight = tiny.adapter.out_proj_weight_view(1).double()
    # W'k̄ᵢ + b = v*ᵢ with v*ᵢ := W k̄ᵢ + b + rᵢ: the bias cancels, so (W' − W) k̄ᵢ = rᵢ for every i
    err = ((new_weight @ keys - (weight @ keys + residual)).norm(dim=0) / residual.norm(dim=0)).max()
    assert err < 1e-4, err
    assert set(delta.changes) == {tiny.adapter.out_proj_param_name(1)}
    assert delta.changes[tiny.adapter.out_proj_param_name(1)].rank == len(batch)  # factors of rank ≤ batch


def test_the_authors_lambda_regularises_batches_only(tiny):
    editor = make_editor("emmet", FAST)
    assert editor.params.emmet_lambda == 0.1
    batch = make_edits(3)
    keys, residual = keys_and_residuals(tiny, editor, batch)
    delta = editor.apply(tiny, batch)
    c = editor.second_moment(tiny, 1).double()
    d = keys.T @ torch.linalg.inv(c) @ keys
    written = out_in(tiny, delta.changes[tiny.adapter.out_proj_param_name(1)]) @ keys
    expected = residual @ torch.linalg.inv(d + 0.1 * torch.eye(3, dtype=d.dtype)) @ d  # R (D + λI)⁻¹ D
    assert ((written - expected).norm() / expected.norm()) < 1e-4
    # a batch of one is not regularised (emmet_main.py:237): its key is written exactly
    one = make_editor("emmet", FAST)
    key, r = keys_and_residuals(tiny, one, make_edits(1, start=5))
    u, v = one.solve(tiny, 1, key, r)
    assert torch.allclose((u @ v.T) @ key, r, rtol=1e-9, atol=1e-9)


def test_a_batch_of_one_is_r_rome_with_the_same_key_and_residual(tiny):
    emmet = make_editor("emmet", FAST).bind(tiny)
    rrome = make_editor("r-rome", {"layer": "1", "cov_tokens": "1024", "cov_reg": "0", "mom2": "true"}).bind(tiny)
    m = tiny.adapter.out_proj_weight_view(1).shape[1]
    d = tiny.adapter.out_proj_weight_view(1).shape[0]
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(m, 1, generator=gen, dtype=torch.float64)
    residual = torch.randn(d, 1, generator=gen, dtype=torch.float64)
    u, v = emmet.solve(tiny, 1, key, residual)
    inverse = rrome._inverse(tiny)  # ROME's C⁻¹ on the same statistics, no ridge
    assert inverse is not None
    rome_u = inverse @ key[:, 0]
    expected = torch.outer(residual[:, 0], rome_u / (rome_u @ key[:, 0]))  # rome.py: (v* − Wk̄) uᵀ / (uᵀk̄)
    assert torch.allclose(u @ v.T, expected, rtol=1e-8, atol=1e-10)


def test_duplicate_keys_without_lambda_fall_back_to_the_pseudo_inverse(tiny):
    """The same subject twice with λ = 0: D is singular, and the authors take its pseudo-inverse
    (emmet_main.py:240-244), which writes the mean of the two targets into the shared key."""
    editor = make_editor("emmet", {**FAST, "emmet_lambda": "0"}).bind(tiny)
    m = tiny.adapter.out_proj_weight_view(1).shape[1]
    d = tiny.adapter.out_proj_weight_view(1).shape[0]
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(m, 1, generator=gen, dtype=torch.float64)
    first, second = (torch.randn(d, 1, generator=gen, dtype=torch.float64) for _ in range(2))
    u, v = editor.solve(tiny, 1, torch.cat([key, key], 1), torch.cat([first, second], 1))
    assert editor._pseudo_inverse == [1]
    assert torch.allclose((u @ v.T) @ key, (first + second) / 2, rtol=1e-9, atol=1e-9)
    assert editor.step_report().get("pseudo_inverse_layers") == [1]


def test_original_defaults():
    p = EMMETParams()
    assert (p.v_steps, p.v_lr, p.v_weight_decay, p.kl_factor, p.clamp_norm) == (25, 0.5, 1e-3, 0.0625, 4.0)
    assert (p.emmet_lambda, p.mom2_update_weight, p.update_norm_lambda) == (0.1, 1.0, 0.0)
    assert (p.v_scale, p.templates, p.key_average) == ("layer_output", 6, "grouped")
    assert (p.stop_on, p.stop_loss) == ("total", 0.05)
    assert default_layers(32) == [5] and default_layers(30) == [5] and default_layers(4) == [1]


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("emmet_lambda", "-0.1", "emmet.emmet_lambda: must not be negative, got -0.1"),
        ("mom2_update_weight", "0", "emmet.mom2_update_weight: must be greater than 0, got 0.0"),
        ("key_average", "median", "emmet: key_average must be one of uniform, grouped, got 'median'"),
    ],
)
def test_a_bad_setting_is_refused_in_one_line(setting, value, message):
    with pytest.raises(UserError) as err:
        make_editor("emmet", {setting: value})
    assert str(err.value) == message


def test_a_layer_outside_the_model_is_refused_in_one_line():
    lm = load_model("tiny-llama")
    with pytest.raises(UserError) as err:
        make_editor("emmet", {"layers": "9"}).bind(lm)
    assert str(err.value) == "emmet: layers '9' out of range for a 4-layer model"


def test_resume_and_checkout_rebuild_the_run_bitwise(tmp_path, stream_file):
    cfg = RunConfig(
        model="tiny-llama", editor="emmet", stream=str(stream_file), batch_size=2, probe_every=3, editor_overrides=FAST
    )
    full = replay(cfg, tmp_path / "full", progress=False).run
    replay(cfg, tmp_path / "resumed", progress=False, stop_after=1)
    resumed = replay(cfg, tmp_path / "resumed", progress=False).run
    full_store, resumed_store = DeltaStore(full.deltas_dir, {}), DeltaStore(resumed.deltas_dir, {})
    for step in (1, 2, 3):
        for name, change in full_store.load_delta(step).changes.items():
            assert torch.equal(resumed_store.load_delta(step).changes[name].materialize(), change.materialize())
    # Step 2 checked out and step 3 applied again, C from θ0 as the replay prepares it: the run's step 3, bitwise.
    again = EMMETEditor(EMMETParams(v_steps=5, templates=3, layers="1", cov_tokens=1024))
    again.prepare(load_model("tiny-llama"))
    lm = checkout(tmp_path / "full", 2)
    torch.manual_seed(step_seed(cfg.seed, 3))
    redo = again.apply(lm, EditStream(make_edits()).steps(batch_size=2)[2])
    for name, change in full_store.load_delta(3).changes.items():
        assert torch.equal(redo.changes[name].materialize(), change.materialize()), name


def test_every_key_check_is_emmets_own():
    """The kit runs emmet_writes_every_key on EMMET (tests/test_testing_kit.py), not on its base MEMIT."""
    assert "emmet_writes_every_key" in invariants_for(make_editor("emmet"))
    assert "emmet_writes_every_key" not in invariants_for(make_editor("memit"))


def test_composes_with_a_stabiliser():
    """EMMET takes the stabiliser setting of every locate-and-edit editor (lifelong.editors.stabilise)."""
    report = check_editor(
        lambda: make_editor("emmet", {**FAST, "stabilise": "rect"}),
        model="tiny-llama",
        max_examples=1,
        max_edits=2,
        invariants=["checkout_equals_live", "delta_matches_change"],
    )
    report.raise_if_failed()
    editor = make_editor("emmet", {**FAST, "stabilise": "rect"})
    assert editor.hyperparameters()["stabilise"] == "rect"
    delta = editor.apply(load_model("tiny-llama"), make_edits(2))
    assert all(c.dense is not None for c in delta.changes.values())  # RECT's masked update is dense
