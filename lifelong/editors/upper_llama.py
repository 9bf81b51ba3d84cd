"""The upper stack of Llama-family models (Llama, Mistral, Qwen2) written out by hand:
:class:`FusedLlamaStack`, a drop-in :class:`~lifelong.editors.upper.UpperStack` with fused
projections and a hand-written backward, and :func:`fused_supported`, which models it computes
exactly as their own layers do."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from lifelong.core.arch import ArchAdapter
from lifelong.editors.upper import UpperStack, _bias, _weight

FUSED_FAMILIES = ("llama", "mistral", "qwen2")


def fused_supported(adapter: ArchAdapter) -> bool:
    """Whether :class:`FusedLlamaStack` computes this model's layers exactly as the model does."""
    config = adapter.config
    return (
        adapter.family in FUSED_FAMILIES
        and getattr(config, "hidden_act", None) == "silu"
        and getattr(config, "pretraining_tp", 1) == 1
        and not getattr(config, "mlp_bias", False)
        and not getattr(config, "use_sliding_window", False)
    )


class _FusedLayer:
    """One decoder layer's weights, converted and fused: q/k/v in one matrix, gate and up in
    another, each with the RMS norm's weight before it folded into its columns and q pre-scaled
    by 1/√head_dim (so neither costs an operation per step)."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype, scale: float):
        m = layer.get_submodule
        q, k, v, o = m("self_attn.q_proj"), m("self_attn.k_proj"), m("self_attn.v_proj"), m("self_attn.o_proj")
        norm1, norm2 = _weight(m("input_layernorm")), _weight(m("post_attention_layernorm"))
        qkv = torch.cat([_weight(q) * scale, _weight(k), _weight(v)])
        self.qkv = (qkv * norm1).to(dtype)
        biases = [_bias(q), _bias(k), _bias(v)]  # all three or none (attention_bias)
        self.qkv_bias = (
            torch.cat([biases[0] * scale, cast(torch.Tensor, biases[1]), cast(torch.Tensor, biases[2])]).to(dtype)
            if biases[0] is not None
            else None
        )
        o_bias = _bias(o)
        self.o = _weight(o).to(dtype)
        self.o_bias = o_bias.to(dtype) if o_bias is not None else None
        self.gate_up = (torch.cat([_weight(m("mlp.gate_proj")), _weight(m("mlp.up_proj"))]) * norm2).to(dtype)
        self.down = _weight(m("mlp.down_proj")).to(dtype)


@dataclass(frozen=True)
class _Shape:
    kv: int  # key/value heads
    groups: int  # query heads per key/value head
    dim: int  # head dimension
    eps: float  # RMS norm epsilon
    dtype: torch.dtype  # compute dtype of the matmuls


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1/RMS(x) over the last dimension, (…, 1)."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rms_backward(grad: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Gradient of x·r(x) (r = 1/RMS) given the gradient of its output: r·(g − x·r²·mean(g·x))."""
    return r * (grad - x * (r * r) * (grad * x).mean(-1, keepdim=True))


def _layer_forward(
    shape: _Shape,
    w: _FusedLayer,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    bias: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor] | None,
):
    """One Llama decoder layer (norm weights folded into w): the updated float32 residual, this
    layer's keys and values (n, kv, T, dim), and what the backward pass needs."""
    f, (n, t, _) = torch.nn.functional, x.shape
    kv, groups, dim, dtype = shape.kv, shape.groups, shape.dim, shape.dtype
    heads = kv * groups
    r1 = _rms(x, shape.eps)
    qkv = f.linear((x * r1).to(dtype), w.qkv, w.qkv_bias)
    qk, v = qkv.split([(heads + kv) * dim, kv * dim], -1)
    qk = qk.view(n, t, heads + kv, dim)  # q's heads then k's: one rotation for both
    qk = qk * cos + qk.roll(dim // 2, -1) * sin
    q = qk[:, :, :heads].reshape(n, t, kv, groups, dim).permute(0, 2, 3, 1, 4).reshape(n, kv, groups * t, dim)
    k = qk[:, :, heads:].transpose(1, 2)
    v = v.view(n, t, kv, dim).transpose(1, 2)
    keys, values = (torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2)) if prefix else (k, v)
    # Scores as (keys × queries): softmax over a non-last dimension is faster on a CPU when the
    # key axis is this short (docs/BENCHMARKS.md).
    probs = torch.softmax(torch.matmul(keys, q.transpose(-1, -2)).float() + bias, -2)
    low = probs.to(dtype)
    out = torch.matmul(low.transpose(-1, -2), values)
    out = out.view(n, kv, groups, t, dim).permute(0, 3, 1, 2, 4).reshape(n, t, heads * dim)
    x2 = x + f.linear(out, w.o, w.o_bias)
    r2 = _rms(x2, shape.eps)
    gate, up = f.linear((x2 * r2).to(dtype), w.gate_up).chunk(2, -1)
    act = f.silu(gate)
    x3 = x2 + f.linear(act * up, w.down)
    return x3, (k, v), (x, r1, q, keys, values, probs, low, x2, r2, gate, up, act)


def _layer_backward(
    shape: _Shape, w: _FusedLayer, saved: tuple, rotary: tuple[torch.Tensor, torch.Tensor], grad: torch.Tensor
) -> torch.Tensor:
    """d(loss)/dx of :func:`_layer_forward` given d(loss)/d(output), both float32 (n, T, d)."""
    x, r1, q, keys, values, probs, low, x2, r2, gate, up, act = saved
    (n, t, _), kv, groups, dim, dtype = x.shape, shape.kv, shape.groups, shape.dim, shape.dtype
    heads, p = kv * groups, keys.shape[2] - x.shape[1]
    # MLP: x3 = x2 + down(silu(gate) · up), (gate, up) = gate_up(x2 · r2)
    d_mid = torch.matmul(grad.to(dtype), w.down)
    d_gate = torch.ops.aten.silu_backward(d_mid * up, gate)
    d_normed = torch.matmul(torch.cat([d_gate, d_mid * act], -1), w.gate_up)
    grad = grad + _rms_backward(d_normed.float(), x2, r2)
    # Attention: x2 = x + o(probsᵀ · values), probs = softmax over keys of keys · qᵀ
    d_out = torch.matmul(grad.to(dtype), w.o)
    d_out = d_out.view(n, t, kv, groups, dim).permute(0, 2, 3, 1, 4).reshape(n, kv, groups * t, dim)
    d_probs = torch.matmul(values, d_out.transpose(-1, -2)).float()
    d_scores = (probs * (d_probs - (d_probs * probs).sum(-2, keepdim=True))).to(dtype)
    d_v = torch.matmul(low[:, :, p:], d_out)  # the prefix's keys and values are constants
    d_k = torch.matmul(d_scores[:, :, p:], q)
    d_q = torch.matmul(d_scores.transpose(-1, -2), keys)
    d_q = d_q.view(n, kv, groups, t, dim).permute(0, 3, 1, 2, 4).reshape(n, t, heads, dim)
    d_qk = torch.cat([d_q, d_k.transpose(1, 2)], 2)
    cos, sin = rotary  # y = x·cos + roll(x, h)·sin  ⇒  dx = dy·cos + roll(dy·sin, −h)
    d_qk = d_qk * cos + (d_qk * sin).roll(-(dim // 2), -1)
    d_qkv = torch.cat([d_qk.reshape(n, t, -1), d_v.transpose(1, 2).reshape(n, t, -1)], -1)
    return grad + _rms_backward(torch.matmul(d_qkv, w.qkv).float(), x, r1)


class _LayerFunction(torch.autograd.Function):
    """A fused decoder layer as one autograd node (fewer, fused operations in the backward)."""

    @staticmethod
    def forward(ctx, x, shape, w, cos, sin, bias, prefix):
        out, _, saved = _layer_forward(shape, w, x, cos, sin, bias, prefix)
        ctx.shape, ctx.w, ctx.saved, ctx.rotary = shape, w, saved, (cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        return (_layer_backward(ctx.shape, ctx.w, ctx.saved, ctx.rotary, grad),) + (None,) * 6


class FusedLlamaStack(UpperStack):
    """The upper stack of a Llama-family model (Llama, Mistral, Qwen2), written out by hand.

    The same arithmetic as the model's layers in a third of the operations: fused q/k/v and
    gate/up projections, grouped-query attention without repeating K and V per head, and
    the rotary tables, prefix keys/values and attention mask prepared once per batch
    (:meth:`bind`). Matmuls run in the compute dtype; the residual stream, norms and softmax
    in float32. The prefix's keys and values above the edited layer are computed here too,
    in the compute dtype, so the model's own (float32) pass over the prefix stops at the
    edited layer. With gradients on, each layer is one autograd node whose backward is
    written out (:func:`_layer_backward`); in float32 it matches the model's layers' outputs
    and gradients to ~1e-6 (tests/test_upper.py).
    """

    full_prefix = False

    def __init__(self, adapter: ArchAdapter, start: int, dtype: torch.dtype):
        super().__init__(adapter, start, dtype)
        config = adapter.config
        self.heads: int = config.num_attention_heads
        self.kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps: float = config.rms_norm_eps
        self.window = getattr(config, "sliding_window", None)
        self._shape = _Shape(self.kv_heads, self.heads // self.kv_heads, self.head_dim, self.eps, dtype)
        self._fused: list[_FusedLayer] | None = None
        self._fused_key: tuple | None = None

    @torch.no_grad()
    def _layers(self) -> list[_FusedLayer]:
        key = self._version()
        if self._fused is None or self._fused_key != key:
            scale = self.head_dim**-0.5
            self._fused = [_FusedLayer(layer, self.dtype, scale) for layer in self._live_layers()]
            self._final_norm = _weight(self.adapter.final_norm()).detach().float()
            head = _weight(self.head).detach()
            self._head = head.to(self.dtype) if self.converted else head
            head_bias = _bias(self.head)
            self._head_bias = head_bias.detach().to(self._head.dtype) if head_bias is not None else None
            self._fused_key = key
        return self._fused

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self._layers()
        return torch.nn.functional.linear(hidden.to(self._head.dtype), self._head, self._head_bias)

    def _rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin, (n, T, 1, head_dim) in the compute dtype: rotate_half(x)·sin
        equals roll(x, head_dim/2)·(sign·sin), one copy instead of a split, a negation and a cat."""
        probe = torch.zeros(1, dtype=torch.float32, device=position_ids.device)
        cos, sin = self.body.get_submodule("rotary_emb")(probe, position_ids)
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half), torch.ones(self.head_dim - half)]).to(sin)
        return cos.to(self.dtype)[:, :, None, :], (sin * sign).to(self.dtype)[:, :, None, :]

    def _mask_bias(self, attention_mask: torch.Tensor, t: int) -> torch.Tensor:
        """Additive mask (n, 1, P + T, groups·T) hiding padding keys and later positions from each
        query; query columns are (group, position) pairs, the fold that spares repeating K/V per head."""
        n, width = attention_mask.shape
        if self.window is not None and width > self.window:
            raise ValueError(f"fused upper stack: {width} tokens exceed the sliding window of {self.window}")
        visible = attention_mask[:, None, :].bool().expand(n, t, width).clone()
        visible[:, :, width - t :] &= torch.ones(t, t, dtype=torch.bool, device=visible.device).tril()
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
        bias.masked_fill_(~visible, torch.finfo(torch.float32).min)
        return bias.repeat(1, self.heads // self.kv_heads, 1).transpose(1, 2).contiguous()[:, None]

    def _layer(
        self,
        w: _FusedLayer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,
        prefix: tuple[torch.Tensor, torch.Tensor] | None,
    ):
        """One decoder layer on the float32 residual ``x`` (n, T, d); returns it updated, with
        this layer's own keys and values (n, kv_heads, T, head_dim). When ``x`` needs a gradient
        the layer runs as one autograd node with a hand-written backward."""
        if torch.is_grad_enabled() and x.requires_grad:
            return _LayerFunction.apply(x, self._shape, w, cos, sin, bias, prefix), None
        x, kv, _ = _layer_forward(self._shape, w, x, cos, sin, bias, prefix)
        return x, kv

    @torch.no_grad()
    def _prefix_kv(self, layers: list[_FusedLayer], residual: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of every upper layer over the prefix, from the residual stream
        entering layer ``start``. Prefixes are right-padded: real tokens see only real tokens
        (causal), and the padding slots are masked out wherever they are read."""
        n, p, _ = residual.shape
        cos, sin = self._rotary(torch.arange(p, device=residual.device).expand(n, p))
        bias = self._mask_bias(torch.ones(n, p, dtype=torch.long, device=residual.device), p)
        x, out = residual.float(), []
        for w in layers:
            x, kv = self._layer(w, x, cos, sin, bias, None)
            out.append(kv)
        return out

    def bind(
        self,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache=None,
        prefix_residual: torch.Tensor | None = None,
    ):
        layers = self._layers()
        prefix: Sequence[tuple[torch.Tensor, torch.Tensor] | None]
        with torch.no_grad():
            if prefix_residual is not None:
                prefix = self._prefix_kv(layers, prefix_residual)
            elif cache is not None:
                prefix = [
                    (
                        cache.layers[self.start + i].keys.to(self.dtype),
                        cache.layers[self.start + i].values.to(self.dtype),
                    )
                    for i in range(len(layers))
                ]
            else:
                prefix = [None] * len(layers)
            cos, sin = self._rotary(position_ids)
            bias = self._mask_bias(attention_mask, position_ids.shape[1])

        def run(hidden: torch.Tensor) -> torch.Tensor:
            x = hidden.float()
            for w, kv in zip(layers, prefix):
                x, _ = self._layer(w, x, cos, sin, bias, kv)
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), self._final_norm, self.eps).to(hidden.dtype)

        return run
