"""``--device auto``, editors' buffers on the edited layer's device, chunked key statistics and the
precision each editor records (issue #36), checked on the CPU.

A model spread over several GPUs cannot be made here; what can: ``auto`` resolving to the CPU, its
refusal of a model that would be offloaded, a model dispatched by accelerate's hooks (every part
mapped to the CPU) editing exactly as a plain one, and every editor's buffer placement through
:meth:`LoadedModel.layer_device`. The multi-GPU replay is ``tests/test_cuda.py``'s (≥ 2 GPUs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from lifelong.core.models import LoadedModel, ModelLoadError, load_model, spread_model, tiny_model

ROOT = Path(__file__).resolve().parents[1]
CORPUS = str(ROOT / "probes" / "data" / "reference_corpus.txt")
ROME = {"layer": "1", "mom2": "true", "v_steps": "3", "templates": "2", "cov_tokens": "256", "cov_corpus": CORPUS}
MEMIT = {"layers": "1,2", "v_steps": "3", "templates": "2", "cov_tokens": "256", "cov_corpus": CORPUS}


def cpu_map(model) -> dict[str, str]:
    """A per-module device map of a tiny Llama with every part on the CPU (accelerate's hooks, no GPU)."""
    layers = len(model.model.layers)
    names = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(layers)), "model.norm", "model.rotary_emb"]
    return {**{name: "cpu" for name in names}, "lm_head": "cpu"}


@pytest.fixture
def tiny_llama():
    return load_model("tiny-llama")


# -- device resolution


def test_auto_without_a_gpu_runs_on_the_cpu_with_a_notice(monkeypatch, capsys):
    from lifelong.core.names import unavailable_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = load_model("tiny-llama", "auto")
    assert lm.device == torch.device("cpu") and lm.device_map is None
    assert "--device auto found no GPU" in capsys.readouterr().err
    assert unavailable_device("auto") is None
    assert "expected cpu, cuda, cuda:N, mps or auto" in unavailable_device("autos")


def test_auto_refuses_a_model_that_would_be_offloaded(monkeypatch):
    """An offloaded weight is no tensor an editor can change in place: refused in one line, naming it."""
    import accelerate.utils

    from lifelong.core.models import auto_device_map

    budget = {0: 20_000, 1: 20_000, "cpu": 10**9}  # far less GPU memory than the model's 0.7 MB
    monkeypatch.setattr(accelerate.utils, "get_balanced_memory", lambda *a, **k: budget)
    model, _ = tiny_model("llama")
    with pytest.raises(ModelLoadError, match=r"--device auto: the model does not fit the 2 visible GPU\(s\)") as err:
        auto_device_map(model, torch.float32)
    assert "\n" not in str(err.value) and "would be offloaded" in str(err.value)


SPREAD = {
    "rome": ROME,
    "memit": MEMIT,
    "ultraedit": {"sub_batch": "2"},
    "grace": {"layer": "2", "eps_init": "1.0", "max_steps": "10"},
    "wise": {"layer": "2", "max_steps": "10", "lr": "0.5", "save_freq": "2", "merge_freq": "4"},
    "memoir": {"layer": "2", "max_steps": "5", "templates": "2", "background": "pool", "irr_threshold": "0.9"},
}


@pytest.mark.parametrize("editor", sorted(SPREAD))
def test_a_dispatched_model_edits_as_a_plain_one_and_the_map_is_recorded(tmp_path, stream_file, editor):
    """accelerate's hooks (what ``--device auto`` installs) change no edit: a replay on a model
    dispatched part by part gives the plain model's weights and results bitwise; the manifest records
    the map."""
    from lifelong.replay import replay
    from lifelong.run import RunConfig, RunDir

    config = RunConfig(
        model="tiny-llama",
        editor=editor,
        editor_overrides=SPREAD[editor],
        stream=str(stream_file),
        steps=2,
        probe_every=2,
    )
    plain = load_model("tiny-llama")
    replay(config, tmp_path / "plain", lm=plain, progress=False, threads=1)
    model, tokenizer = tiny_model("llama")
    mapping = cpu_map(model)
    spread = spread_model("tiny-llama", model, tokenizer, mapping)
    assert hasattr(spread.model.model.layers[1], "_hf_hook")  # the hooks are on
    done = replay(config, tmp_path / "spread", lm=spread, progress=False, threads=1)
    ours = dict(spread.model.named_parameters())
    for name, p in plain.model.named_parameters():
        assert torch.equal(p, ours[name]), name
    session = done.run.manifest()["sessions"][0]
    assert session["device_map"] == mapping and session["device"] == "cpu"
    values = [
        RunDir(tmp_path / name).results().sort(["step", "probe", "metric", "edit_id"]) for name in ("plain", "spread")
    ]
    assert values[0]["value"].to_list() == values[1]["value"].to_list()


# -- buffers on the edited layer's device


def test_editor_buffers_go_to_the_layer_device(monkeypatch, tiny_llama):
    """ROME's C⁻¹ and MEMIT/AlphaEdit's C are placed where ``layer_device`` says (the meta device
    stands in for a second GPU): each layer's, not the device inputs enter on."""
    from lifelong.editors import make_editor

    monkeypatch.setattr(LoadedModel, "layer_device", lambda self, layer: torch.device("meta"))
    rome = make_editor("rome", ROME).bind(tiny_llama)
    inverse = rome._inverse(tiny_llama)
    assert inverse is not None and inverse.device.type == "meta" and inverse.dtype == torch.float64
    memit = make_editor("memit", MEMIT).bind(tiny_llama)
    memit.prepare(tiny_llama)
    assert {c.device.type for c in memit._second_moments.values()} == {"meta"}
    assert tiny_llama.device.type == "cpu"


def test_layer_device_is_the_out_projection_weights():
    model, tokenizer = tiny_model("gpt2")
    lm = LoadedModel.from_hf(model, tokenizer)
    assert lm.layer_device(2) == lm.adapter.out_proj_weight_view(2).device == torch.device("cpu")


# What may still be placed by ``lm.device`` (the device inputs enter on) in the editors: token ids and
# masks, and losses of the whole model's logits (accelerate returns those there). A float buffer, a
# fitted delta or a statistic is placed by its layer (``lm.layer_device``, ``weight.device``).
LM_DEVICE_BUFFERS = {
    "lifelong/editors/locate.py": (2, "the token ids and mask of the sampled context templates"),
    "lifelong/editors/adaptor.py": (1, "the token ids of the sampled context templates (WISE, MEMOIR)"),
    # not spread-aware: under --device auto its per-layer parts would need the layers' devices (docs/MACHINES.md)
    "lifelong/editors/mend/training.py": (1, "MEND's hypernetwork, trained and kept on one device"),
    "lifelong/editors/rledit/training.py": (1, "RLEdit's hypernetwork, trained and kept on one device"),
}


def _lm_device(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "device" and ast.unparse(node.value) == "lm"


def test_no_float_buffer_is_placed_by_the_input_device():
    """``.to(lm.device)`` and float tensor factories (zeros, ones, full, empty, eye, rand*) with
    ``device=lm.device`` in an editor are counted: a new one fails until placed by its layer."""
    found: dict[str, int] = {}
    for path in sorted((ROOT / "lifelong" / "editors").rglob("*.py")):
        tree = ast.parse(path.read_text())
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            moved = node.func.attr == "to" and any(_lm_device(a) for a in node.args)
            factory = (
                ast.unparse(node.func.value) == "torch"
                and node.func.attr in {"zeros", "ones", "full", "empty", "eye", "rand", "randn"}
                and any(k.arg == "device" and _lm_device(k.value) for k in node.keywords)
            )
            if moved or factory:
                found[rel] = found.get(rel, 0) + 1
    allowed = {rel: count for rel, (count, _) in LM_DEVICE_BUFFERS.items()}
    assert found == allowed, f"placed by lm.device: {found}; allowed: {allowed}"


# -- chunked key statistics


def test_chunked_key_statistics_equal_unchunked_and_bound_the_intermediate(monkeypatch, tiny_llama):
    from lifelong.editors import covariance

    rows = [list(range(5 + r, 5 + r + 24)) for r in range(6)]  # 144 tokens
    whole = covariance.compute_second_moments(tiny_llama, [1, 3], rows, batch_size=4, chunk_tokens=10**6)
    seen: list[tuple[int, ...]] = []
    host = covariance._host_float64
    monkeypatch.setattr(covariance, "_host_float64", lambda keys: seen.append(tuple(keys.shape)) or host(keys))
    chunked = covariance.compute_second_moments(tiny_llama, [1, 3], rows, batch_size=4, chunk_tokens=7)
    for layer in (1, 3):
        assert chunked[layer].dtype == torch.float64
        assert torch.allclose(chunked[layer], whole[layer], rtol=1e-12, atol=1e-15), layer
    assert max(rows_ for rows_, _ in seen) == 7  # no float64 copy of more than a chunk
    assert sum(rows_ for rows_, _ in seen) == 2 * 144  # every token of both layers, once


def test_default_chunk_fits_the_budget_for_7b_layers():
    from lifelong.editors.covariance import KEY_CHUNK_BYTES, key_chunk_rows

    for width in (1536, 11008, 14336, 10**9):
        rows = key_chunk_rows(width)
        assert rows >= 1 and (rows * width * 8 <= KEY_CHUNK_BYTES or rows == 1)
    assert key_chunk_rows(11008) * 2 * 11008 * 8 > KEY_CHUNK_BYTES  # not merely tiny


def test_key_statistics_stop_after_the_highest_layer(tiny_llama):
    """The pass ends at the last layer whose keys are summed: the layers above never run."""
    from lifelong.editors.covariance import compute_second_moments

    ran: list[int] = []
    handle = tiny_llama.adapter.layer(3).register_forward_hook(lambda *a: ran.append(3))
    try:
        compute_second_moments(tiny_llama, [1], [list(range(3, 19))])
    finally:
        handle.remove()
    assert ran == []


# -- precision per part in the manifest


@pytest.mark.parametrize(
    ("editor", "overrides", "expected", "actual"),
    [
        (
            "rome",
            ROME,
            {"covariance": "float64", "inverse": "float64", "rank_one_update": "float64"},
            lambda e: {"inverse": e._inverse_cache[1].dtype},
        ),
        (
            "memit",
            MEMIT,
            {"covariance": "float64", "solve": "float64"},
            lambda e: {"covariance": e._second_moments[2].dtype},
        ),
        (
            "ultraedit",
            {"sub_batch": "2"},
            {"normaliser": "float32", "keys_and_gradients": "float32", "ridge_solve": "float32"},
            lambda e: {"normaliser": next(iter(e._norms.values())).mean.dtype},
        ),
    ],
)
def test_manifest_records_the_precision_of_each_part(tmp_path, stream_file, editor, overrides, expected, actual):
    """A run's session records the weights' dtype and each sensitive part's, as the editor computes it
    (checked against the tensors it made), with ``v_dtype=auto`` as it resolved."""
    from lifelong.editors import make_editor
    from lifelong.replay import replay
    from lifelong.run import RunConfig

    config = RunConfig(model="tiny-llama", editor=editor, editor_overrides=overrides, stream=str(stream_file), steps=1)
    instance = make_editor(editor, overrides)
    done = replay(config, tmp_path / "r", editor=instance, progress=False, threads=1)
    session = done.run.manifest()["sessions"][0]
    precision = session["precision"]
    assert precision["weights"] == "float32" and session["device"] == "cpu" and session["device_map"] is None
    assert {k: precision[k] for k in expected} == expected
    for part, dtype in actual(instance).items():
        assert precision[part] == str(dtype).removeprefix("torch."), part
    if "v_dtype" in session["numerics"]:  # ROME's v* and MEMIT's z* fits: the setting as it resolved
        fit = "v_fit" if editor == "rome" else "z_fit"
        assert precision[fit] == session["numerics"]["v_dtype"]["dtype"] in ("float32", "bfloat16")
    else:
        assert not {"v_fit", "z_fit"} & set(precision)
    from lifelong.summary import format_summary

    shown = next(line for line in format_summary(done.run).splitlines() if line.startswith("precision: "))
    assert all(f"{part} {dtype}" in shown for part, dtype in precision.items())  # `lifelong show` says it too


def test_rome_without_the_covariance_records_neither_part(tiny_llama):
    from lifelong.editors import make_editor

    editor = make_editor("rome", {**ROME, "mom2": "false"}).bind(tiny_llama)
    assert {"covariance", "inverse"}.isdisjoint(editor.precision(tiny_llama))
    assert editor.precision(tiny_llama)["rank_one_update"] == "float64"
