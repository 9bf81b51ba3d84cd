"""Device tests (marker ``cuda``, issue #36): editors, checkout, a probe and reduced-precision loading on
a GPU. They run on ``$LIFELONG_TEST_DEVICE`` (default ``cuda``) and are skipped where that device is
CUDA and there is none, so the CPU suite skips them at no cost. ``benchmarks/device_check.py --dry-run``
runs them with ``LIFELONG_TEST_DEVICE=cpu`` so that their logic is exercised on any machine;
``benchmarks/device_check.sh`` runs them on the GPU (``pytest -m cuda``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_FT

DEVICE = os.environ.get("LIFELONG_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        torch.device(DEVICE).type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]

# Tiny settings per editor: seconds on the 4-layer test model. Key statistics from the reference corpus
# (256 tokens of text sampled from the tiny model leave AlphaEdit no null space at its threshold).
CORPUS = str(Path(__file__).resolve().parents[1] / "probes" / "data" / "reference_corpus.txt")
TINY = {
    "ft": dict(TINY_FT),
    "rome": {"layer": "1", "v_steps": "5", "templates": "3", "cov_tokens": "256", "cov_corpus": CORPUS},
    "memit": {"layers": "1,2", "v_steps": "5", "templates": "3", "cov_tokens": "256", "cov_corpus": CORPUS},
    "alphaedit": {"layers": "1,2", "v_steps": "5", "templates": "3", "cov_tokens": "256", "cov_corpus": CORPUS},
    "ultraedit": {"sub_batch": "2"},
    "grace": {"layer": "2", "eps_init": "1.0", "max_steps": "10"},
    "wise": {"layer": "2", "max_steps": "10", "lr": "0.5", "save_freq": "2", "merge_freq": "4"},
    "memoir": {"layer": "2", "max_steps": "5", "templates": "2", "background": "pool", "irr_threshold": "0.9"},
}


def _logits(lm, text: str = "The capital of Country1 is") -> torch.Tensor:
    ids = torch.tensor([lm.tokenizer(text).input_ids], device=lm.device)
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


@pytest.mark.parametrize("editor", sorted(TINY))
def test_replay_on_the_device_checks_out_bitwise(editor, tmp_path, stream_file):
    """A two-step replay on the device keeps its weights there, and ``checkout`` of its last step on the
    device gives the live model's weights and outputs bitwise (adaptors: through their hooks)."""
    from lifelong.core.models import load_model
    from lifelong.replay import checkout, replay
    from lifelong.run import RunConfig

    config = RunConfig(
        model="tiny-llama",
        editor=editor,
        editor_overrides=TINY[editor],
        stream=str(stream_file),
        steps=2,
        probe_every=1,
        device=DEVICE,
    )
    lm = load_model("tiny-llama", DEVICE)
    replay(config, tmp_path / "run", lm=lm, progress=False, threads=1)
    assert all(p.device.type == torch.device(DEVICE).type for p in lm.model.parameters())
    back = checkout(tmp_path / "run", 2, device=DEVICE)
    live = dict(lm.model.named_parameters())
    for name, p in back.model.named_parameters():
        assert p.device == live[name].device and torch.equal(p, live[name]), name
    assert torch.equal(_logits(back), _logits(lm))


def test_probe_scores_on_the_device_match_the_cpu():
    """The batched scorer (what every probe scores with) gives the CPU's numbers on the device."""
    from lifelong.core.models import load_model
    from lifelong.core.scorer import Scorer

    pairs = [("The capital of Country1 is", " Nova1"), ("Paris is in", " France"), ("A", " longer answer here")]
    here = Scorer(load_model("tiny-llama", DEVICE).model, load_model("tiny-llama").tokenizer).score(pairs)
    cpu_lm = load_model("tiny-llama", "cpu")
    there = Scorer(cpu_lm.model, cpu_lm.tokenizer).score(pairs)
    assert here.argmax == there.argmax
    assert abs(here.nll - there.nll).max() < 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_loads_and_edits_on_the_device(dtype):
    """Weights load in bfloat16 (and float16 on a GPU) on the device; a ROME edit on them gives a finite
    delta in the weights' dtype, and its numerically sensitive parts resolve to a recorded dtype."""
    from lifelong.core.models import load_model
    from lifelong.editors import make_editor
    from tests.conftest import make_edits

    if dtype == "float16" and torch.device(DEVICE).type == "cpu":
        pytest.skip("float16 weights need a GPU")
    lm = load_model("tiny-llama", DEVICE, dtype)
    assert {p.dtype for p in lm.model.parameters()} == {getattr(torch, dtype)}
    assert {p.device.type for p in lm.model.parameters()} == {torch.device(DEVICE).type}
    editor = make_editor("rome", TINY["rome"]).bind(lm)
    editor.prepare(lm)
    weight = dict(lm.model.named_parameters())[editor.scope(lm)[0]]
    before = weight.detach().clone()
    editor.apply(lm, make_edits(1))
    assert weight.dtype == getattr(torch, dtype) and weight.device == before.device
    change = (weight.detach() - before).float()
    assert torch.isfinite(change).all() and change.abs().max() > 0
    assert all(v["dtype"] in ("float32", "bfloat16", "float16") for v in editor.numerics(lm).values())


def _two_devices() -> list[str] | None:
    """Two devices to spread the model over: cuda:0 and cuda:1, or the CPU twice (the dry run: the hooks
    and the map run, the devices do not differ); None where CUDA has fewer than two GPUs."""
    if torch.device(DEVICE).type != "cuda":
        return [DEVICE, DEVICE]
    return ["cuda:0", "cuda:1"] if torch.cuda.device_count() >= 2 else None


@pytest.mark.parametrize("editor", ["rome", "memit", "alphaedit", "ultraedit", "grace", "wise", "memoir"])
def test_a_model_spread_over_two_gpus_edits_as_on_one(editor, tmp_path, stream_file):
    """``--device auto``'s placement over two GPUs (layers 0-1 on the first, 2-3 and the head on the
    second): each editor's replay runs, keeps every weight on its GPU, leaves its buffers on the edited
    layer's, and gives the one-device run's weights (float tolerance: kernels may differ by GPU)."""
    from lifelong.core.models import load_model, spread_model, tiny_model
    from lifelong.editors import make_editor
    from lifelong.replay import replay
    from lifelong.run import RunConfig

    devices = _two_devices()
    if devices is None:
        pytest.skip("needs two CUDA devices")
    config = RunConfig(
        model="tiny-llama",
        editor=editor,
        editor_overrides=TINY[editor],
        stream=str(stream_file),
        steps=2,
        probe_every=2,
    )
    one = load_model("tiny-llama", devices[0])
    replay(config, tmp_path / "one", lm=one, progress=False, threads=1)
    model, tokenizer = tiny_model("llama")
    first, second = devices
    mapping = {
        "model.embed_tokens": first,
        "model.layers.0": first,
        "model.layers.1": first,
        "model.layers.2": second,
        "model.layers.3": second,
        "model.norm": second,
        "model.rotary_emb": second,
        "lm_head": second,
    }
    spread = spread_model("tiny-llama", model, tokenizer, mapping)
    instance = make_editor(editor, TINY[editor])
    done = replay(config, tmp_path / "spread", lm=spread, editor=instance, progress=False, threads=1)
    assert done.run.manifest()["sessions"][0]["device_map"] == mapping
    buffers = {**getattr(instance, "_second_moments", {}), **getattr(instance, "_inverse_cache", {})}
    for layer, buffer in buffers.items():  # key statistics and C⁻¹ on their layer's GPU
        assert buffer.device == spread.layer_device(layer) == torch.device(mapping[f"model.layers.{layer}"]), layer
    reference = {name: p.detach().to("cpu") for name, p in one.model.named_parameters()}
    for name, p in spread.model.named_parameters():
        where = next(d for module, d in mapping.items() if name.startswith(module + "."))
        assert p.device == torch.device(where), name
        assert torch.allclose(p.detach().to("cpu"), reference[name], rtol=1e-4, atol=1e-5), name
