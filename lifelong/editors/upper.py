"""Run only the layers above an edited one, from a given residual stream.

In v*/z* optimisation δ is added to layer l's MLP output, which adds straight into the
residual stream leaving layer l (in every supported family: pre-norm, GPT-J/NeoX
parallel blocks alike). Layers 0..l are therefore constant across optimisation steps:
their output is computed once, and each step runs layers l+1.. only.

The upper stack runs through the family's own body (its masks, rotary embeddings,
KV cache and final norm) with the layer list cut to l+1..; a learned absolute position
embedding (GPT-2's ``wpe``) is zeroed there, since the residual already holds it.
It can run in a lower-precision compute dtype (bfloat16 halves the time of the
matmuls on CPUs with AVX512-BF16 or AMX, and costs 30–70× on CPUs without them:
``auto`` chooses, see :mod:`lifelong.core.machine`): a converted copy of the upper stack,
rebuilt only when one of its weights changes.

This module runs any supported family through its own layers; Llama-family models have a
faster hand-written stack in :mod:`lifelong.editors.upper_llama`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lifelong.core.arch import ArchAdapter
from lifelong.core.machine import choose_dtype


def compute_dtype(name: str, editor: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype for setting ``name`` (``auto`` or a dtype name) on ``device``."""
    return choose_dtype(name, device, f"{editor}: v_dtype").dtype


def _split(path: str) -> tuple[str, str]:
    parent, _, attr = path.rpartition(".")
    return parent, attr


@contextmanager
def _swapped(root: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Temporarily replace submodules of ``root`` (paths relative to it)."""
    saved = {}
    try:
        for path, module in replacements.items():
            parent, attr = _split(path)
            owner = root.get_submodule(parent) if parent else root
            saved[path] = (owner, attr, getattr(owner, attr))
            setattr(owner, attr, module)
        yield
    finally:
        for owner, attr, module in saved.values():
            setattr(owner, attr, module)


def _weight(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)  # nn.Module types attribute access as Tensor | Module


def _bias(module: nn.Module) -> torch.Tensor | None:
    return cast("torch.Tensor | None", module.bias)


def _zero_positions(module: nn.Embedding) -> nn.Embedding:
    zero = nn.Embedding(
        module.num_embeddings, module.embedding_dim, device=module.weight.device, dtype=module.weight.dtype
    )
    nn.init.zeros_(zero.weight)
    zero.requires_grad_(False)
    return zero


class UpperStack:
    """Layers ``start``.. of a model, run from a residual stream given as ``inputs_embeds``."""

    full_prefix = True  # bind() needs the model's KV cache over the prefix at every layer

    def __init__(self, adapter: ArchAdapter, start: int, dtype: torch.dtype):
        self.adapter, self.start, self.dtype = adapter, start, dtype
        self.body = adapter.body()
        prefix = cast(str, adapter.model.base_model_prefix) + "."
        self.layers_path = adapter.spec.layers.removeprefix(prefix)  # relative to the body
        self.positions_path = (adapter.spec.positions or "").removeprefix(prefix) or None
        self.head = adapter.unembedding()
        self._copy: nn.Module | None = None
        self._copy_head: nn.Module | None = None
        self._copy_key: tuple | None = None

    def _replacements(
        self, layers: list[nn.Module], positions: tuple[str, nn.Embedding] | None
    ) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {self.layers_path: nn.ModuleList(layers)}
        if positions is not None:
            path, module = positions
            out[path] = _zero_positions(module)
        return out

    def _live_layers(self) -> list[nn.Module]:
        return list(cast(nn.ModuleList, self.body.get_submodule(self.layers_path)))[self.start :]

    def _positions(self) -> tuple[str, nn.Embedding] | None:
        """The learned absolute position embedding (GPT-2's wpe, an nn.Embedding) with its path, if any."""
        if not self.positions_path:
            return None
        return self.positions_path, cast(nn.Embedding, self.body.get_submodule(self.positions_path))

    def _version(self) -> tuple:
        """Identity and version of every weight the copy is made of (a changed weight forces a rebuild)."""
        return (
            tuple((id(p), p._version) for layer in self._live_layers() for p in layer.parameters())
            + tuple(
                (name, id(p), p._version)
                for name, p in self.body.named_parameters()
                if not name.startswith(self.layers_path + ".")
            )
            + tuple((id(p), p._version) for p in self.head.parameters())
        )

    def _converted(self) -> nn.Module:
        key = self._version()
        if self._copy is None or self._copy_key != key:
            # Copy the body with only the upper layers in it (and no token embedding: the
            # stack is always fed inputs_embeds), then convert the copy.
            embed = self.adapter.embedding()
            embed_path = next(name for name, m in self.body.named_modules() if m is embed)
            with _swapped(self.body, {self.layers_path: nn.ModuleList(self._live_layers()), embed_path: nn.Identity()}):
                body = copy.deepcopy(self.body)
            for param in body.parameters():  # parameters only: buffers (rotary inv_freq) keep their precision
                param.data = param.data.to(self.dtype)
            if self.positions_path:
                with torch.no_grad():
                    _weight(body.get_submodule(self.positions_path)).zero_()
            # The output embedding too: in float32 its product with a few rows is bound by
            # reading its (vocab × d) weight, twice per step (forward and backward).
            head = copy.deepcopy(self.head)
            for param in head.parameters():
                param.data = param.data.to(self.dtype)
            self._copy, self._copy_head, self._copy_key = body, head, key
        return self._copy

    @property
    def converted(self) -> bool:
        """Whether the stack computes in a dtype other than the model's own."""
        return self.dtype != self._model_dtype()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states, in the compute dtype."""
        if not self.converted:
            return self.head(hidden)
        self._converted()
        head = self._copy_head
        assert head is not None  # _converted() builds it with the body copy
        return head(hidden.to(self.dtype))

    def cast_cache(self, cache):
        """The prefix KV cache in the compute dtype (a copy; layers below ``start`` are never read)."""
        if cache is None or not self.converted:
            return cache
        cache = copy.deepcopy(cache)
        for layer in cache.layers:
            if getattr(layer, "keys", None) is not None:
                layer.keys = layer.keys.to(self.dtype)
                layer.values = layer.values.to(self.dtype)
        return cache

    def _model_dtype(self) -> torch.dtype:
        return next(self.body.parameters()).dtype

    def bind(
        self,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache=None,
        prefix_residual: torch.Tensor | None = None,
    ):
        """A function from the residual stream entering layer ``start`` (n, T, d) to the final
        normed hidden states, for one batch: rows ``attention_mask`` (n, P + T) over a prefix
        of P cached tokens (``cache``: the model's KV cache, or None when P = 0), queries at
        ``position_ids`` (n, T). Whatever is constant across calls is prepared here, once.
        A stack with ``full_prefix`` False can take the prefix's residual stream entering
        layer ``start`` instead of the cache's upper layers."""
        if prefix_residual is not None and self.full_prefix:
            raise ValueError("this upper stack reads the prefix from the model's KV cache at every layer")
        cache = self.cast_cache(cache)
        return lambda hidden: self(hidden, **suffix_pass_kwargs(attention_mask, position_ids, cache))

    def __call__(self, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
        """Final (normed) hidden states from ``hidden``, the residual stream entering layer ``start``."""
        # A few query tokens against a short cache: the plain attention kernel beats the flash
        # one there, forward and backward (the figures: docs/BENCHMARKS.md).
        with sdpa_kernel(SDPBackend.MATH):
            if not self.converted:
                with _swapped(self.body, self._replacements(self._live_layers(), self._positions())):
                    return self.body(inputs_embeds=hidden, **kwargs).last_hidden_state
            out = self._converted()(inputs_embeds=hidden.to(self.dtype), **kwargs).last_hidden_state
        return out.to(hidden.dtype)


def suffix_pass_kwargs(attention_mask: torch.Tensor, position_ids: torch.Tensor, cache) -> dict:
    """Keyword arguments of a model pass over suffix tokens at ``position_ids`` (n, T) after a
    prefix held in ``cache`` (a fresh copy each call: a pass appends to it), with
    ``attention_mask`` (n, P + T) covering both; without a cache only its last T columns apply."""
    if cache is None:
        return dict(
            attention_mask=attention_mask[:, -position_ids.shape[1] :],
            position_ids=position_ids,
            cache=None,
            use_cache=False,
        )
    return dict(attention_mask=attention_mask, position_ids=position_ids, cache=copy.deepcopy(cache), use_cache=True)


def layer_output(output) -> torch.Tensor:
    """A decoder layer's hidden-state output (some families return a tuple)."""
    return output[0] if isinstance(output, tuple) else output
