"""ROME's per-family defaults (the originals' hparams files) and its generated context templates."""

import dataclasses

import pytest
import torch

from lifelong.core.delta import Delta
from lifelong.editors import make_editor, parse_overrides
from lifelong.editors.locate import generated_templates
from lifelong.editors.rome import HPARAMS_FILES, R_ROME_FAMILY_FILES, ROME_FAMILY_FILES, ROMEParams
from lifelong.replay import replay
from lifelong.run import RunConfig
from streams.errors import UserError

LLAMA_FILE = "zjunlp/EasyEdit@14cea82:hparams/ROME/llama-7b.yaml"
GPT2_FILE = "kmeng01/rome@0874014:hparams/ROME/gpt2-xl.json"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))


def test_generated_templates_are_deterministic_for_a_seed(tiny):
    first = generated_templates(tiny, 3)
    assert generated_templates(tiny, 3) == first
    assert generated_templates(tiny, 4) != first  # the seed selects the samples
    assert len(first) == 21 and first[0] == "{}"  # the bare prompt, then 2 × 10 samples
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in first[1:])


def test_per_family_defaults_follow_the_family_file(tiny):
    p = make_editor("rome").bind(tiny).params
    if tiny.adapter.family == "llama":  # EasyEdit hparams/ROME/llama-7b.yaml
        expected = dict(hparams=LLAMA_FILE, v_steps=25, v_lr=0.5, v_weight_decay=1e-3, mom2=False, context="generated")
    else:  # kmeng01/rome hparams/ROME/gpt2-xl.json
        expected = dict(hparams=GPT2_FILE, v_steps=20, v_lr=0.5, v_weight_decay=0.5, mom2=True, context="generated-eot")
    assert {k: getattr(p, k) for k in expected} == expected
    # The file's layer (5 or 17) is beyond a 4-layer tiny model: it gives way to num_layers // 5.
    assert p.layer == tiny.num_layers // 5
    assert HPARAMS_FILES[p.hparams]["layer"] >= tiny.num_layers


def test_explicit_settings_win_and_the_former_defaults_are_named(tiny):
    p = make_editor("rome", {"v_steps": "8", "mom2": "true", "context": "fixed21"}).bind(tiny).params
    assert (p.v_steps, p.mom2, p.context) == (8, True, "fixed21")
    assert p.v_weight_decay == HPARAMS_FILES[ROME_FAMILY_FILES[tiny.adapter.family]]["v_weight_decay"]
    old = make_editor("rome", {"hparams": "none"}).bind(tiny).params
    assert (old.hparams, old.v_steps, old.v_lr, old.v_weight_decay, old.mom2, old.context) == (
        "none",
        20,
        0.5,
        0.5,
        True,
        "fixed21",
    )
    assert make_editor("r-rome").bind(tiny).params.hparams == R_ROME_FAMILY_FILES[tiny.adapter.family]


def test_a_family_without_a_file_and_unknown_names():
    class Adapter:
        family = "gpt_neox"

    class LM:
        adapter = Adapter()
        num_layers = 10

    from lifelong.editors.rome import family_hparams

    p = family_hparams(ROMEParams(), LM(), ROME_FAMILY_FILES, "rome")  # type: ignore[arg-type]
    assert (p.hparams, p.v_steps, p.context, p.layer) == ("none", 20, "fixed21", 2)
    with pytest.raises(UserError, match="hparams must be"):
        make_editor("rome", {"hparams": "llama-13b"})
    with pytest.raises(UserError, match="context must be"):
        make_editor("rome", {"context": "sampled"})


def test_memit_keeps_its_value_defaults():
    p = make_editor("memit").params
    assert (p.v_steps, p.v_lr, p.v_weight_decay) == (20, 0.5, 0.5)


def test_manifest_settings_rebuild_the_same_editor(tiny):
    bound = make_editor("rome", {"layer": "1", "templates": "4"}).bind(tiny)
    recorded = {k: str(v) for k, v in bound.hyperparameters().items()}  # as a manifest gives them back
    rebuilt = make_editor("rome", {})
    rebuilt.params = parse_overrides(ROMEParams, recorded, "rome")
    rebuilt.bind(tiny)
    assert dataclasses.asdict(rebuilt.params) == dataclasses.asdict(bound.params)
    assert rebuilt.context_templates(tiny) == bound.context_templates(tiny)


def test_resumed_run_regenerates_the_same_templates(tmp_path, stream_file):
    """Generated templates come from θ0 with a seed: a run stopped after step 2 and resumed writes
    the same deltas, bit for bit, as one run straight through."""
    cfg = RunConfig(
        model="tiny-llama",
        stream=str(stream_file),
        editor="rome",
        editor_overrides={"layer": "1", "v_steps": "3", "templates": "6"},
    )
    straight = replay(cfg, tmp_path / "straight", progress=False)
    replay(cfg, tmp_path / "resumed", progress=False, stop_after=2)
    resumed = replay(cfg, tmp_path / "resumed", progress=False)
    assert resumed.run.manifest()["identity"]["hyperparameters"]["context"] == "generated"
    steps = straight.total_steps
    assert steps == resumed.total_steps and steps > 2
    for k in range(1, steps + 1):
        name = f"step_{k:06d}.safetensors"
        a, b = Delta.load(straight.run.deltas_dir / name), Delta.load(resumed.run.deltas_dir / name)
        assert a.changes.keys() == b.changes.keys()
        for key in a.changes:
            assert torch.equal(a.changes[key].materialize(), b.changes[key].materialize())
