import json

import pytest
import torch

from lifelong.core.arch import ArchAdapter, UnsupportedArchitectureError
from lifelong.core.models import ModelLoadError, load_model, save_model_dir, tiny_model


def test_tiny_models_are_seeded(tiny):
    again = load_model(tiny.name)
    for (n1, p1), (n2, p2) in zip(tiny.model.named_parameters(), again.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    other, _ = tiny_model(tiny.adapter.family, seed=1)
    assert not torch.equal(next(other.parameters()), next(tiny.model.parameters()))


def test_building_a_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("llama", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_out_proj_view_maps_keys_to_values(tiny):
    """W @ k in (out, in) orientation equals what the projection module computes (Conv1D included)."""
    adapter = tiny.adapter
    module = adapter.out_proj(1)
    weight = adapter.out_proj_weight_view(1)
    key = torch.randn(weight.shape[1])
    out = module(key[None])[0]
    bias = getattr(module, "bias", None)
    expected = weight @ key + (bias if bias is not None else 0)
    assert torch.allclose(out, expected, atol=1e-5)
    assert adapter.out_proj_param_name(1) in dict(tiny.model.named_parameters())


def test_save_and_reload_roundtrip(tmp_path, tiny):
    save_model_dir(tiny.model, tiny.tokenizer, tmp_path / "m")
    again = load_model(str(tmp_path / "m"))
    for (_, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b)
    assert again.tokenizer.encode(" Paris") == tiny.tokenizer.encode(" Paris")


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="unknown model 'nope'"):
        load_model("nope")


def test_unsupported_architecture_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(str(tmp_path))
    assert "'bert'" in str(info.value) and "\n" not in str(info.value)


def test_adapter_refuses_unknown_family():
    class Fake(torch.nn.Module):
        class config:
            model_type = "t5"

    with pytest.raises(UnsupportedArchitectureError, match="'t5'"):
        ArchAdapter(Fake())


def test_cuda_request_without_cuda_is_clear():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model("tiny-llama", device="cuda")


@pytest.mark.parametrize("damage", ["drop_one", "empty", "extra", "wrong_shape", "garbled"])
def test_weights_missing_from_the_files_are_refused(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    lm = load_model("tiny-llama")
    path = save_model_dir(lm.model, lm.tokenizer, tmp_path / "m") / "model.safetensors"
    tensors = load_file(str(path))
    if damage == "drop_one":
        tensors.pop(next(k for k in tensors if "mlp.down_proj" in k))
    elif damage == "empty":
        tensors = {}
    elif damage == "wrong_shape":
        tensors[next(k for k in tensors if "mlp.down_proj" in k)] = torch.zeros(3, 5)
    else:
        tensors["model.layers.0.mlp.spare.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(path), metadata={"format": "pt"})
    if damage == "garbled":  # a cut file: refused in one line naming the directory, not a traceback
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        with pytest.raises(ModelLoadError, match="the weights cannot be loaded"):
            load_model(str(tmp_path / "m"))
        return
    kind = {"drop_one": "1 missing", "empty": "missing", "extra": "1 unexpected", "wrong_shape": "1 mismatched"}[damage]
    with pytest.raises(ModelLoadError, match=f"do not match the config.*{kind}.*randomly initialised"):
        load_model(str(tmp_path / "m"))


def test_fingerprint_follows_every_weight(tiny):
    from lifelong.core.models import weights_fingerprint

    before = weights_fingerprint(tiny.model)
    assert weights_fingerprint(tiny.model) == before
    with torch.no_grad():
        param = list(tiny.model.parameters())[-1]
        param.view(-1)[-1] += 1e-3  # the very last value of the last weight
    assert weights_fingerprint(tiny.model) != before


def test_a_model_in_memory_runs_as_loaded(tmp_path, stream_file):
    """LoadedModel.from_hf: a transformers model built elsewhere replays as the registered one does."""
    from lifelong.core.models import LoadedModel
    from lifelong.replay import replay
    from lifelong.run import RunConfig
    from tests.conftest import TINY_FT

    model, tokenizer = tiny_model("llama")
    model.train()
    lm = LoadedModel.from_hf(model, tokenizer, name="tiny-llama")
    assert not model.training and not any(p.requires_grad for p in model.parameters()) and lm.device.type == "cpu"
    config = RunConfig(model="tiny-llama", stream=str(stream_file), editor_overrides=dict(TINY_FT), probe_every=2)
    ours = replay(config, tmp_path / "a", lm=lm, progress=False, stop_after=2).run.results()
    theirs = replay(config, tmp_path / "b", progress=False, stop_after=2).run.results()
    assert ours.drop("run_id").equals(theirs.drop("run_id"))

    class Fake(torch.nn.Module):
        class config:
            model_type = "t5"

    with pytest.raises(UnsupportedArchitectureError, match="'t5'"):
        LoadedModel.from_hf(Fake(), tokenizer)


def test_load_dtype_runs_checks_out_bitwise_and_is_recorded(tmp_path, stream_file):
    """--dtype bfloat16: the weights load in it, a replay runs, checkout rebuilds the live model bitwise
    and the run records the dtype (so checkout and resume load it again); float16 needs a GPU."""
    from lifelong.replay import checkout, replay
    from lifelong.run import RunConfig
    from tests.conftest import TINY_FT

    lm = load_model("tiny-llama", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    config = RunConfig(
        model="tiny-llama", stream=str(stream_file), editor_overrides=dict(TINY_FT), probe_every=2, dtype="bfloat16"
    )
    run = replay(config, tmp_path / "bf16", lm=lm, progress=False, stop_after=2).run
    assert run.manifest()["identity"]["dtype"] == "bfloat16"
    assert (
        "dtype"
        not in replay(
            RunConfig(model="tiny-llama", stream=str(stream_file), editor_overrides=dict(TINY_FT)),
            tmp_path / "f32",
            progress=False,
            stop_after=1,
        ).run.manifest()["identity"]
    )
    rebuilt = checkout(run.path, 2)
    assert all(torch.equal(p, q) for p, q in zip(rebuilt.model.parameters(), lm.model.parameters()))
    assert run.results()["value"].is_finite().all()
    with pytest.raises(ModelLoadError, match="--dtype float16 needs a GPU"):
        replay(
            RunConfig(model="tiny-llama", stream=str(stream_file), dtype="float16"), tmp_path / "f16", progress=False
        )
    assert not (tmp_path / "f16").exists()
    with pytest.raises(ModelLoadError, match="unknown --dtype 'int8'"):
        load_model("tiny-llama", dtype="int8")
