"""The property-testing kit (lifelong.testing): built-in editors pass it, broken editors are caught."""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from hypothesis import given, settings

from lifelong.core.delta import Delta, ParamChange
from lifelong.editors import EDITORS, make_editor
from lifelong.editors.base import Editor
from lifelong.testing import (
    INVARIANTS,
    Invariant,
    InvariantViolation,
    check_editor,
    edit_streams,
    edits,
    invariants_for,
    tiny_models,
)
from streams import Edit, EditStream

# Small hyperparameters that keep each built-in editor fast on the tiny models.
FAST = {
    "ft": {"layer": "1", "lr": "0.05", "norm_constraint": "0.05", "max_steps": "15"},
    "rome": {"layer": "1", "v_steps": "8", "templates": "4", "mom2": "false"},
    "r-rome": {"layer": "1", "v_steps": "8", "templates": "4", "mom2": "false"},
    "memit": {"layers": "1,2", "v_steps": "5", "templates": "3", "cov_tokens": "1024"},
    "emmet": {"layers": "1", "v_steps": "5", "templates": "3", "cov_tokens": "1024"},
    "ultraedit": {"sub_batch": "2"},
    "alphaedit": {
        "layers": "1,2",
        "v_steps": "5",
        "templates": "3",
        "cov_tokens": "1024",
        "nullspace_threshold": "0.5",
    },  # absolute: tiny-llama's C has no eigenvalue below 2e-2
    "grace": {"layer": "2", "eps_init": "1.0", "max_steps": "10"},
    "wise": {
        "layer": "2",
        "max_steps": "8",
        "lr": "0.5",
        "norm_constraint": "0.5",
        "alpha": "0.5",
        "beta": "2",
        "gamma": "1",
        "save_freq": "1",
        "merge_freq": "2",
    },
    "memory": {},
    # the background mean from WISE's fixed sentences: the default (zsRE loc texts) reads ../shared/data
    "memoir": {"layer": "2", "max_steps": "3", "templates": "1", "background": "pool"},
    "kn": {"layers": "1-2", "ig_steps": "4"},
    "mend": {},  # given the hypernetwork of the tiny_mend_hypernet fixture
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_mend_hypernet(private_cache):
    """A MEND hypernetwork for tiny-llama trained a few steps on the built-in facts, in the private cache."""
    from lifelong.core.models import load_model
    from lifelong.editors.mend import resolve_layers, train_hypernetwork, training_preset

    lm = load_model("tiny-llama")
    return train_hypernetwork(
        lm,
        resolve_layers("", lm.num_layers),
        "builtin",
        training_preset("cpu-small", steps=3, rank=8, holdout=0),
        progress=False,
    )


@pytest.fixture
def tiny_rledit_hypernet(private_cache, tmp_path):
    """An RLEdit hypernetwork for tiny-llama trained over one short sequence of the built-in facts."""
    from lifelong.core.models import load_model
    from lifelong.editors.rledit import TrainConfig, resolve_layers, train_hypernetwork

    lm = load_model("tiny-llama")
    config = TrainConfig(n_edits=2, chunk=2, num_seq=2, rank=4, n_blocks=1, holdout=0)
    layers = resolve_layers("", lm.num_layers)
    return train_hypernetwork(lm, layers, "builtin", config, directory=tmp_path / "rledit", progress=False)


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_builtin_editor_passes_every_invariant(name, request):
    overrides = FAST.get(name, {})
    if name == "mend":  # given files: the cache keys hold the training settings
        overrides = {"hypernet": str(request.getfixturevalue("tiny_mend_hypernet"))}
    if name == "rledit":
        overrides = {"hypernet": str(request.getfixturevalue("tiny_rledit_hypernet"))}
    report = check_editor(lambda: make_editor(name, overrides), model="tiny-llama", max_examples=3, max_edits=3)
    report.raise_if_failed()
    assert set(INVARIANTS) <= set(report.passed)
    # each editor's own defining equation (ROME's key→value write, EMMET's every key, UltraEdit's ridge
    # solve, RLEdit's hypernetwork...) is among the checks passed, not skipped
    own = set(invariants_for(make_editor(name, overrides)))
    assert own <= set(report.passed), own - set(report.passed)
    if name in ("rome", "r-rome", "alphaedit", "emmet", "ultraedit", "rledit"):
        assert own - set(INVARIANTS), f"{name} lost its equation check"


def test_builtin_editor_on_gpt2():
    report = check_editor(
        lambda: make_editor("r-rome", FAST["r-rome"]),
        model="tiny-gpt2",
        max_examples=1,
        max_edits=2,
        invariants=["scope_respected", "delta_matches_change", "rome_writes_key_value"],
    )
    report.raise_if_failed()


# -- editors written for these tests: one correct toy, and three broken on purpose


def _vector(text: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    return torch.randn(n, 1, generator=g)


class ToyEditor(Editor):
    """A cheap, correct editor: a rank-one change of layer 1's MLP output projection per edit."""

    name = "toy"
    description = "deterministic rank-one noise, for testing the kit"

    class Params:
        pass

    def scope(self, lm):
        return [lm.adapter.out_proj_param_name(1)]

    def change(self, lm, batch) -> Delta:
        name = self.scope(lm)[0]
        rows, cols = lm.model.get_parameter(name).shape
        u = torch.cat([_vector(e.rendered_prompt, rows) for e in batch], 1) * 1e-2
        v = torch.cat([_vector(e.target_new, cols) for e in batch], 1)
        return Delta({name: ParamChange(u=u, v=v)})

    def apply(self, lm, batch):
        if not batch:
            return Delta.empty()
        delta = self.change(lm, batch)
        delta.apply(lm.model)
        return delta

    def hyperparameters(self):
        return {}


class LeakyEditor(ToyEditor):
    """Also nudges layer 2's output projection, outside its declared scope and not in its delta."""

    def apply(self, lm, batch):
        delta = super().apply(lm, batch)
        if batch:
            with torch.no_grad():
                lm.model.get_parameter(lm.adapter.out_proj_param_name(2)).add_(1e-3)
        return delta


class NoisyEditor(ToyEditor):
    """Adds noise from a generator seeded by the operating system: not reproducible."""

    def change(self, lm, batch):
        delta = super().change(lm, batch)
        name, change = next(iter(delta.changes.items()))
        g = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        noise = torch.randn(change.materialize().shape, generator=g) * 1e-3
        return Delta({name: ParamChange(dense=change.materialize() + noise)})


class LyingEditor(ToyEditor):
    """Changes the model by the full update but reports only half of it."""

    def apply(self, lm, batch):
        delta = super().apply(lm, batch)
        return Delta({n: ParamChange(u=c.u * 0.5, v=c.v) for n, c in delta.changes.items()})


def test_correct_toy_editor_passes():
    check_editor(ToyEditor, max_examples=2).raise_if_failed()


def test_leak_outside_scope_is_caught_with_a_minimal_example():
    report = check_editor(LeakyEditor, invariants=["scope_respected", "delta_matches_change"], max_examples=3)
    assert not report.ok
    assert report.failed == ["scope_respected", "delta_matches_change"]
    failure = report.failures[0]
    assert "model.layers.2.mlp.down_proj.weight" in failure.message
    assert len(failure.stream) == 1, failure.example  # shrunk to a single edit
    assert "e0" in failure.example and "->" in failure.example
    with pytest.raises(AssertionError, match="FAILED scope_respected"):
        report.raise_if_failed()


def test_unseeded_randomness_is_caught():
    report = check_editor(NoisyEditor, invariants=["deterministic", "scope_respected"], max_examples=3)
    assert report.failed == ["deterministic"]
    assert report.passed == ["scope_respected"]
    assert "differs between two identical runs" in report.failures[0].message


def test_delta_that_lies_is_caught():
    report = check_editor(
        LyingEditor,
        invariants=["delta_matches_change", "checkout_equals_live", "deterministic"],
        max_examples=2,
        shrink=False,
    )
    assert report.failed == ["delta_matches_change", "checkout_equals_live"]
    assert "not the weights before + the returned Delta" in report.failures[0].message


def test_leak_breaks_revert_too():
    report = check_editor(
        LeakyEditor, invariants=["revert_restores_base", "empty_batch_is_noop"], max_examples=1, shrink=False
    )
    assert report.failed == ["revert_restores_base"]


# -- the kit's own API


class SelfCheckingEditor(ToyEditor):
    """An editor that brings its own equation check through ``testing_invariants``."""

    def testing_invariants(self):
        def always_wrong(subject, stream):
            raise InvariantViolation("the toy equation does not hold")

        return [Invariant("toy_equation", always_wrong, "a check that always fails")]


def test_editor_specific_equations():
    assert "rome_writes_key_value" in invariants_for(make_editor("r-rome"))
    assert "rome_writes_key_value" not in invariants_for(make_editor("ft"))
    report = check_editor(SelfCheckingEditor, invariants=["toy_equation", "rome_writes_key_value"], max_examples=1)
    assert report.failed == ["toy_equation"]
    assert report.skipped and "rome_writes_key_value" in report.skipped[0]
    assert "1 failed, 1 skipped" in str(report)
    with pytest.raises(ValueError, match="unknown invariant 'nope'"):
        check_editor(ToyEditor, invariants=["nope"])
    with pytest.raises(TypeError, match="must return a lifelong Editor"):
        check_editor(lambda: object())


@settings(max_examples=40, deadline=None)
@given(stream=edit_streams(max_edits=5, max_batch=3))
def test_generated_streams_are_valid(stream):
    assert 1 <= len(stream) <= 5
    steps = stream.steps()
    assert all(len(step) <= 3 for step in steps)
    stamps = [step[0].timestamp for step in steps]
    assert stamps == sorted(set(stamps))
    step_of = {e.id: k for k, step in enumerate(steps) for e in step}
    chains: dict[str, list[Edit]] = {}
    for e in stream:
        assert "{}" in e.prompt and e.subject in e.rendered_prompt
        assert e.target_new != e.target_true and e.target_new in e.candidates
        assert len(e.rendered_prompt) < 40
        if e.chain:
            chains.setdefault(e.chain.chain_id, []).append(e)
    for links in chains.values():
        first, second = links
        assert (first.chain.role, second.chain.role) in (("round-out", "round-back"), ("conflict-e1", "conflict-e2"))
        assert (first.subject, first.relation_id) == (second.subject, second.relation_id)
        assert second.target_true == first.target_new and step_of[first.id] < step_of[second.id]
        if first.chain.role == "round-out":
            assert second.target_new == first.target_true


@settings(max_examples=20, deadline=None)
@given(edit=edits())
def test_generated_edits_are_valid(edit):
    assert isinstance(edit, Edit) and edit.target_new.strip()
    assert Edit.from_dict(edit.to_dict()) == edit
    EditStream([edit])


@settings(max_examples=2, deadline=None)
@given(lm=tiny_models())
def test_tiny_models_are_fresh_and_seeded(lm):
    assert lm.name in ("tiny-llama", "tiny-gpt2") and lm.num_layers == 4
