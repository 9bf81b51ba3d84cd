"""Second-moment statistics C = E[k kᵀ] of a layer's MLP keys, cached on disk.

ROME (with its covariance adjustment), MEMIT and AlphaEdit need C per edited layer.
It is computed once per (model, layer, corpus, token count) and cached under
``cache_root()/stats``. The corpus is either text sampled from the model itself
(``model-sample``, the offline default; seeded) or any text file or directory of
``.txt`` files.
"""

from __future__ import annotations

import hashlib
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import cast

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from lifelong.core.bars import bar as progress_bar
from lifelong.core.bars import quiet as bars_quiet
from lifelong.core.delta import atomic_save_tensors, load_tensors
from lifelong.core.models import LoadedModel, cache_root
from lifelong.core.names import MODEL_SAMPLE, corpus_files
from lifelong.editors.hooks import stop_after
from lifelong.editors.locate import capture_keys
from streams.errors import UserError

_SEEDS = (
    "The",
    "In",
    "A",
    "It",
    "When",
    "He",
    "She",
    "This",
    "We",
    "There",
    "After",
    "Many",
    "One",
    "They",
    "I",
    "Our",
    "Today",
    "Most",
    "According",
    "Some",
)


def model_key(lm: LoadedModel) -> str:
    """Identifies the model by name, config and a sample of every weight (64 KiB each)."""
    h = hashlib.sha256(lm.name.encode())
    h.update(lm.adapter.config.to_json_string(use_diff=False).encode())
    for name, p in lm.model.named_parameters():
        h.update(name.encode())
        # the first 16,384 values (64 KiB in float32), without a float32 copy of a 7B-class matrix
        h.update(p.detach().reshape(-1)[:16384].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def corpus_key(corpus: str) -> str:
    if corpus == MODEL_SAMPLE:
        return f"{MODEL_SAMPLE}-v{SAMPLER_VERSION}"
    files = corpus_files(corpus)
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return "text-" + h.hexdigest()[:16]


def _token_rows(lm: LoadedModel, corpus: str, n_tokens: int, seq_len: int, seed: int) -> list[list[int]]:
    """Token sequences of ``seq_len`` covering at least ``n_tokens`` tokens."""
    n_rows = -(-n_tokens // seq_len)
    if corpus != MODEL_SAMPLE:
        text = "\n".join(f.read_text(errors="replace") for f in corpus_files(corpus))
        ids = lm.tokenizer(text).input_ids
        rows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        if not rows:
            raise UserError(f"covariance corpus {corpus!r} has fewer than {seq_len} tokens")
        return rows[:n_rows]
    # Sampling costs far more than the pass over the text: keep the tokens for other layers.
    name = f"{corpus_key(corpus)}-seed{seed}-rows{n_rows}-len{seq_len}"
    path = cache_root() / "stats" / model_key(lm) / f"{name}.safetensors"
    if path.is_file():
        return load_tensors(path)["tokens"].tolist()
    rows = sample_rows(lm, n_rows, seq_len, seed, path.with_name(f"{name}-partial.safetensors"))
    atomic_save_tensors({"tokens": torch.tensor(rows, dtype=torch.long)}, path)
    path.with_name(f"{name}-partial.safetensors").unlink(missing_ok=True)
    return rows


SAMPLER_VERSION = 2  # v2: balanced chunks of up to SAMPLE_BATCH rows, each seeded from (seed, chunk)
# Rows sampled together: the per-token cost of generation falls with the batch (measured on
# SmolLM2 on one core: 48 tokens/s at 32 rows, 58 at 64, 75 at 160), and a chunk is what an
# interruption can lose.
SAMPLE_BATCH = 128


class _TickPerPosition(StoppingCriteria):
    """Advances a progress bar by one token per row at each generated position; never stops."""

    def __init__(self, bar, rows: int):
        self.bar, self.rows = bar, rows

    def __call__(self, input_ids, scores, **kwargs):
        self.bar.update(self.rows)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def sampling_resume_line(partial: Path, done: int, sizes: list[int]) -> str:
    """The line an interrupted text sampling prints when it carries on from ``partial``."""
    kept = sum(sizes[:done])
    return (
        f"resuming text sampling for key statistics from {partial} at chunk {done + 1} of {len(sizes)}: "
        f"{kept} rows kept, {sum(sizes) - kept} of {sum(sizes)} left"
    )


def sample_rows(lm: LoadedModel, n_rows: int, seq_len: int, seed: int, partial: Path) -> list[list[int]]:
    """``n_rows`` sequences of ``seq_len`` tokens sampled from the model (top-k 50), in balanced
    chunks each seeded from (seed, chunk): finished chunks are kept in ``partial`` as they
    complete, so an interrupted first run continues where it stopped, with the same result."""
    chunks = -(-n_rows // SAMPLE_BATCH)
    sizes = [n_rows // chunks + (1 if c < n_rows % chunks else 0) for c in range(chunks)]
    rows: list[list[int]] = load_tensors(partial)["tokens"].tolist() if partial.is_file() else []
    done = next((c for c in range(chunks + 1) if sum(sizes[:c]) == len(rows)), None)
    if done is None:  # not a chunk boundary: not ours, start afresh
        rows, done = [], 0
    if done and not bars_quiet():
        tqdm.write(sampling_resume_line(partial, done, sizes), file=sys.stderr)
    desc = "sampling text for key statistics (once per model, cached)"
    with (
        torch.random.fork_rng(devices=[]),
        progress_bar(
            total=n_rows * (seq_len - 1), initial=len(rows) * (seq_len - 1), desc=desc, unit="tok", unit_scale=True
        ) as bar,
    ):
        for c in range(done, chunks):
            torch.manual_seed(seed * 1_000_003 + c)
            first = sum(sizes[:c])
            starts = [lm.tokenizer(_SEEDS[(first + i) % len(_SEEDS)]).input_ids[-1:] for i in range(sizes[c])]
            ids = torch.tensor(starts, device=lm.device)
            # a transformers model's method; nn.Module types attribute access as Tensor | Module
            out = lm.model.generate(  # type: ignore[operator]
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=50,
                max_new_tokens=seq_len - 1,
                min_new_tokens=seq_len - 1,
                pad_token_id=lm.tokenizer.pad_token_id or 0,
                stopping_criteria=StoppingCriteriaList([_TickPerPosition(bar, sizes[c])]),
            )
            rows += out[:, :seq_len].tolist()
            if c < chunks - 1:
                atomic_save_tensors({"tokens": torch.tensor(rows, dtype=torch.long)}, partial)
    return rows


# The host memory the statistics take beyond their d × d float64 sums: the keys are turned into
# float64 this many bytes at a time, so a 7B-class layer (d_in 11008-14336) needs no full float64
# copy of a batch's keys (docs/MACHINES.md, memory planning).
KEY_CHUNK_BYTES = 64 * 2**20


def key_chunk_rows(width: int, budget: int = KEY_CHUNK_BYTES) -> int:
    """Key rows of ``width`` whose float64 copy fits ``budget`` bytes (at least one)."""
    return max(1, budget // (8 * width))


def accumulate_second_moment(total: torch.Tensor | None, keys: torch.Tensor, chunk: int) -> torch.Tensor:
    """``total`` + Σ k kᵀ over the rows of ``keys`` (n × d), in float64 on the host, ``chunk`` rows
    at a time; the sum is updated in place (no d × d temporary beside it)."""
    for start in range(0, keys.shape[0], chunk):
        part = _host_float64(keys[start : start + chunk])
        total = part.T @ part if total is None else total.addmm_(part.T, part)
    assert total is not None, "no key rows"  # callers pass at least one row
    return total


def _host_float64(keys: torch.Tensor) -> torch.Tensor:
    """One chunk of keys on the host in float64 (the largest intermediate of the statistics)."""
    return keys.cpu().double()


@torch.no_grad()
def compute_second_moments(
    lm: LoadedModel, layers: list[int], rows: list[list[int]], batch_size: int = 8, chunk_tokens: int | None = None
) -> dict[int, torch.Tensor]:
    """E[k kᵀ] for several layers in one pass over the token rows; each batch's keys are summed
    ``chunk_tokens`` rows at a time (default: :data:`KEY_CHUNK_BYTES` worth of float64 keys)."""
    body = lm.adapter.body()
    totals: dict[int, torch.Tensor | None] = {layer: None for layer in layers}
    count = 0
    desc = f"key statistics, layer{'s' if len(layers) > 1 else ''} {','.join(map(str, layers))} (cached)"
    bar = progress_bar(total=sum(len(r) for r in rows), desc=desc, unit="tok", unit_scale=True)
    for start in range(0, len(rows), batch_size):
        ids = torch.tensor(rows[start : start + batch_size], device=lm.device)
        with ExitStack() as stack:
            seen = {layer: stack.enter_context(capture_keys(lm.adapter, layer)) for layer in layers}
            stack.enter_context(stop_after(lm.adapter.out_proj(max(layers))))  # the layers above are not needed
            body(input_ids=ids, use_cache=False)
        for layer in layers:
            keys = seen[layer][0].reshape(-1, seen[layer][0].shape[-1])
            seen[layer].clear()
            totals[layer] = accumulate_second_moment(totals[layer], keys, chunk_tokens or key_chunk_rows(keys.shape[1]))
        count += ids.numel()
        bar.update(ids.numel())
    bar.close()
    if not count:
        raise ZeroDivisionError("key statistics of no token rows")
    return {layer: cast(torch.Tensor, total) / count for layer, total in totals.items()}


def key_second_moments(
    lm: LoadedModel,
    layers: list[int],
    corpus: str = MODEL_SAMPLE,
    n_tokens: int = 20000,
    seq_len: int = 128,
    seed: int = 0,
) -> dict[int, torch.Tensor]:
    """C = E[k kᵀ] (float64, d_in × d_in) per layer, from the cache or computed now in one pass."""
    paths = {
        layer: (
            cache_root()
            / "stats"
            / model_key(lm)
            / f"layer{layer}-{corpus_key(corpus)}-seed{seed}-n{n_tokens}-len{seq_len}.safetensors"
        )
        for layer in layers
    }
    out = {layer: load_tensors(path)["second_moment"] for layer, path in paths.items() if path.is_file()}
    missing = [layer for layer in layers if layer not in out]
    if missing:
        rows = _token_rows(lm, corpus, n_tokens, seq_len, seed)
        for layer, second in compute_second_moments(lm, missing, rows).items():
            atomic_save_tensors(
                {"second_moment": second}, paths[layer], {"tokens": str(len(rows) * seq_len), "corpus": corpus}
            )
            out[layer] = second
    return out


def key_second_moment(
    lm: LoadedModel, layer: int, corpus: str = MODEL_SAMPLE, n_tokens: int = 20000, seq_len: int = 128, seed: int = 0
) -> torch.Tensor:
    """C = E[k kᵀ] for one layer (see :func:`key_second_moments`)."""
    return key_second_moments(lm, [layer], corpus, n_tokens, seq_len, seed)[layer]
