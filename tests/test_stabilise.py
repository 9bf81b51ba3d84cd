"""The stabilisers NAS, PRUNE and RECT: each one's defining rule, on tensors and through the editors."""

import math

import pytest
import torch

from lifelong.editors import make_editor
from lifelong.editors.stabilise import nas_value, prune_spectrum, rect_mask, trimmed_mean
from lifelong.testing import check_editor
from streams.errors import UserError
from tests.conftest import make_edits

FAST = {"v_steps": "5", "templates": "3", "layers": "1,2", "cov_tokens": "1024", "nas_samples": "4"}
ROME_FAST = {"layer": "1", "v_steps": "5", "templates": "3", "mom2": "false", "nas_samples": "4"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))


def capture_changes(editor):
    """Record each call of ``editor.stabilise_changes``: (weights before, proposed, returned)."""
    calls = []
    inner = editor.stabilise_changes

    def spy(lm, before, changes):
        out = inner(lm, before, changes)
        calls.append(
            ({n: before[n].double() for n in changes}, {n: c.materialize().double() for n, c in changes.items()}, out)
        )
        return out

    editor.stabilise_changes = spy
    return calls


def capture_fits(editor):
    """Record every fit ``editor.stabilise_fit`` returns."""
    fits = []
    inner = editor.stabilise_fit

    def spy(lm, layer, fit):
        fits.append(inner(lm, layer, fit))
        return fits[-1]

    editor.stabilise_fit = spy
    return fits


def anchored(fit, anchor):
    """NAS's v*: of the anchor's norm, or v_orig where the fit was too long (δ dropped)."""
    return math.isclose(float(fit.value.norm()), anchor, rel_tol=1e-9) or torch.equal(fit.value, fit.original)


# -- PRUNE -------------------------------------------------------------------------------------


def test_prune_compresses_singular_values_above_the_bound_as_the_formula_says():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    s = torch.linalg.svdvals(a)
    bound = float(s[2])  # two singular values above it, the rest at or below
    out = prune_spectrum(a, bound)
    expected = torch.where(s > bound, torch.log(s) - math.log(bound) + bound, s)
    assert torch.allclose(torch.linalg.svdvals(out), expected, rtol=1e-10, atol=1e-12)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)  # the singular vectors are kept
    assert torch.allclose(out, u @ torch.diag(expected) @ vh, rtol=1e-10, atol=1e-12)
    assert torch.allclose(prune_spectrum(a, float(s[0]) * 2), a, atol=1e-12)  # below the bound: unchanged


def test_memit_prune_bounds_the_accumulated_update_over_steps():
    from lifelong.core.models import load_model

    lm = load_model("tiny-llama")
    editor = make_editor("memit", {**FAST, "stabilise": "prune"})
    editor.prepare(lm)
    base = editor._stabiliser_state()["base"]
    w0 = {name: lm.model.get_parameter(name).detach().double().clone() for name in editor.scope(lm)}
    calls = capture_changes(editor)
    for step in range(2):
        # The tiny model's updates are far below σ_max(W₀): a bound that binds, to see the rule act
        for name in base:
            base[name] = (base[name][0], 0.05)
        editor.apply(lm, make_edits(2, start=2 * step))
        assert editor.step_report()["prune_compressed"] == len(editor.scope(lm))  # both matrices, this step
        before, proposed, _ = calls[-1]
        for name in editor.scope(lm):
            accumulated = before[name] + proposed[name] - w0[name]
            s = torch.linalg.svdvals(accumulated)
            assert (s > 0.05).any()
            expected = torch.where(s > 0.05, torch.log(s) - math.log(0.05) + 0.05, s)
            now = lm.model.get_parameter(name).detach().double() - w0[name]
            assert torch.allclose(torch.linalg.svdvals(now), expected, rtol=1e-4, atol=1e-5)


# -- RECT --------------------------------------------------------------------------------------


def test_rect_keeps_only_the_top_relative_changes():
    gen = torch.Generator().manual_seed(1)
    update = torch.randn(20, 10, generator=gen, dtype=torch.float64)
    weight = torch.randn(20, 10, generator=gen, dtype=torch.float64)
    out = rect_mask(update, weight, 40.0, 1e-8)
    relative = (update / (weight + 1e-8)).abs()
    kept = out != 0
    assert int(kept.sum()) == 200 - int(200 * 60 / 100) + 1  # the kthvalue at k = 120 and everything above
    assert relative[kept].min() >= relative[~kept].max()
    assert torch.equal(out[kept], update[kept])


def test_memit_rect_applies_the_masked_update_of_each_layer():
    from lifelong.core.models import load_model

    lm = load_model("tiny-llama")
    editor = make_editor("memit", {**FAST, "stabilise": "rect"})
    calls = capture_changes(editor)
    delta = editor.apply(lm, make_edits(2))
    before, proposed, _ = calls[-1]
    for name, change in delta.changes.items():
        applied = change.materialize().double()
        assert change.dense is not None
        expected = rect_mask(proposed[name], before[name], 40.0, 1e-8)
        assert torch.allclose(applied, expected.float().double(), rtol=0, atol=0)
        assert abs((applied != 0).double().mean().item() - 0.4) < 0.01
        assert torch.equal(lm.model.get_parameter(name).detach(), (before[name] + applied).float())


# -- NAS ---------------------------------------------------------------------------------------


def test_nas_value_takes_the_anchor_norm_or_drops_delta():
    gen = torch.Generator().manual_seed(2)
    original = torch.randn(16, generator=gen, dtype=torch.float64)
    value = original + 0.3 * torch.randn(16, generator=gen, dtype=torch.float64)
    anchor = float(value.norm()) * 0.8
    assert math.isclose(float(nas_value(value, original, anchor, 2.0).norm()), anchor, rel_tol=1e-9)
    assert torch.equal(nas_value(value, original, float(value.norm()) / 2.5, 2.0), original)  # > 2 × anchor
    assert trimmed_mean([1.0] * 19 + [100.0], 0.95) == 1.0  # floor(0.05 · 20) = 1 largest dropped
    assert trimmed_mean([1.0, 3.0], 0.95) == 2.0  # floor(0.1) = 0 dropped


def test_rome_nas_writes_a_value_of_the_anchor_norm():
    from lifelong.core.models import load_model
    from lifelong.editors.locate import fit_value

    lm = load_model("tiny-llama")
    editor = make_editor("rome", {**ROME_FAST, "stabilise": "nas"})
    editor.prepare(lm)
    (anchor,) = editor.nas_anchors().values()
    # the anchor: the mean ‖v*‖ of θ0 fits (4 samples: floor(0.05·4) = 0 dropped)
    import random

    from streams.facts import builtin_stream

    sample = random.Random(0).sample(list(builtin_stream()), 4)
    templates = editor.value_templates(lm)  # ROME's own: generated from θ0 under the family's file
    norms = [float(fit_value(lm, 1, e, editor.params, "rome", templates=templates).value.norm()) for e in sample]
    assert math.isclose(anchor, sum(norms) / 4, rel_tol=1e-9)
    fits = capture_fits(editor)
    for edit in make_edits(2):
        torch.manual_seed(0)
        _, _, key, value = editor.rank_one(lm, edit)
        assert anchored(fits[-1], anchor) and torch.equal(value, fits[-1].value)
        torch.manual_seed(0)
        editor.apply(lm, [edit])
        weight = lm.adapter.out_proj_weight_view(1).double()
        assert ((weight @ key - value).norm() / value.norm()).item() < 1e-4  # after the step: W'k = v*, ‖v*‖ = a


def test_memit_nas_fits_carry_the_anchor_norm():
    from lifelong.core.models import load_model

    lm = load_model("tiny-llama")
    editor = make_editor("memit", {**FAST, "stabilise": "nas"})
    fits = capture_fits(editor)
    editor.apply(lm, make_edits(3))
    (anchor,) = editor.nas_anchors().values()
    assert len(fits) == 3 and all(anchored(fit, anchor) for fit in fits)
    report = editor.step_report()
    assert report["nas_anchor"] == anchor and report["v_fits"] == 3
    assert report["nas_dropped"] == sum(torch.equal(fit.value, fit.original) for fit in fits)
    assert any(math.isclose(float(fit.value.norm()), anchor, rel_tol=1e-9) for fit in fits)


# -- the editors: the contract, none as before, bad values -------------------------------------


@pytest.mark.parametrize("mode", ["nas", "prune", "rect"])
def test_memit_with_each_stabiliser_passes_check_editor(mode):
    report = check_editor(
        lambda: make_editor("memit", {**FAST, "stabilise": mode}), model="tiny-llama", max_examples=2, max_edits=2
    )
    report.raise_if_failed()
    assert {"checkout_equals_live", "resume_same_results"} <= set(report.passed)


@pytest.mark.parametrize(
    "name, mode", [("rome", "prune"), ("r-rome", "rect"), ("alphaedit", "nas"), ("alphaedit", "prune")]
)
def test_every_locate_and_edit_editor_composes(name, mode):
    overrides = {**ROME_FAST} if "rome" in name else {**FAST, "nullspace_threshold": "0.5"}
    report = check_editor(
        lambda: make_editor(name, {**overrides, "stabilise": mode}),
        model="tiny-llama",
        max_examples=1,
        max_edits=2,
        invariants=["checkout_equals_live", "delta_matches_change"],
    )
    report.raise_if_failed()
    from lifelong.core.models import load_model

    editor = make_editor(name, {**overrides, "stabilise": mode})
    delta = editor.apply(load_model("tiny-llama"), make_edits(1))
    if mode == "nas":  # the hook ran: low-rank factors of v* at the anchor norm
        assert "nas_anchor" in editor.step_report() and all(c.rank for c in delta.changes.values())
    else:  # the hook ran: the stabilised change is dense
        assert all(c.dense is not None for c in delta.changes.values())


def test_rome_with_nas_still_writes_key_value():
    report = check_editor(
        lambda: make_editor("r-rome", {**ROME_FAST, "stabilise": "nas"}),
        model="tiny-llama",
        max_examples=1,
        max_edits=2,
        invariants=["checkout_equals_live", "rome_writes_key_value"],
    )
    report.raise_if_failed()


@pytest.mark.parametrize("name", ["rome", "r-rome", "memit", "alphaedit"])
def test_the_stabiliser_is_in_the_hyperparameters_and_none_changes_nothing(name):
    editor = make_editor(name, {"stabilise": "rect"})
    assert editor.hyperparameters()["stabilise"] == "rect"
    assert editor.hyperparameters()["rect_percent"] == 40.0
    plain = make_editor(name)
    assert plain.hyperparameters()["stabilise"] == "none"
    changes: dict = {}
    assert plain.stabilise_changes(None, None, changes) is changes
    assert plain.stabilise_fit(None, 0, "fit") == "fit"


def test_memit_none_is_bitwise_the_plain_editor():
    from lifelong.core.models import load_model

    deltas = []
    for overrides in ({}, {"stabilise": "none"}):
        lm = load_model("tiny-llama")
        torch.manual_seed(0)
        deltas.append(make_editor("memit", {**FAST, **overrides}).apply(lm, make_edits(2)))
    for name, change in deltas[0].changes.items():
        assert change.rank == 2 and torch.equal(change.u, deltas[1].changes[name].u)
        assert torch.equal(change.v, deltas[1].changes[name].v)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stabilise": "nass"}, "memit: stabilise must be one of none, nas, prune, rect, encore, got 'nass'"),
        ({"rect_percent": "0"}, "memit: rect_percent must be in (0, 100], got 0.0"),
        ({"nas_trim": "1.5"}, "memit: nas_trim must be in (0, 1], got 1.5"),
        ({"nas_samples": "0"}, "memit.nas_samples: must be at least 1, got 0"),
        ({"nas_skip": "0"}, "memit.nas_skip: must be greater than 0, got 0.0"),
    ],
)
def test_a_bad_value_is_refused_in_one_line(overrides, message):
    with pytest.raises(UserError) as err:
        make_editor("memit", overrides)
    assert str(err.value) == message
