"""RLEdit's hypernetwork and its update equation (shared by training and the editor).

Per edited weight W (out, in): the edit's keys K (N, in: what enters the projection) and value
gradients D (N, out: the cross-entropy's gradient w.r.t. the projection's output), taken at the
answer positions only, go through the network g shared by every weight of that shape:

    [k̃; d̃] = g([k; d], m),   c_i = −η_m · k_iᵀk̃_i,   V = diag(c) D̃,
    ΔWᵀ = (KᵀK + e^{λ_m} I)⁻¹ KᵀV,

with η_m (the learned step, initialised to ``edit_lr``) and λ_m (initialised to 0) one per weight m.
g normalises [k; d] with running statistics, then runs ``n_blocks`` residual blocks
y + s_m ⊙ ReLU(y A B + b) + t_m (A (size, rank) standard normal, B zero: g starts as the normaliser)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from lifelong.core.models import LoadedModel
from lifelong.core.scorer import Scorer
from lifelong.editors.base import parse_layers
from lifelong.editors.hooks import Hooks
from lifelong.editors.mend.network import resolve_params as resolve_mlp_params

_EPS = torch.finfo(torch.float32).eps  # the authors' normaliser eps (float32)


def default_layers(num_layers: int) -> list[int]:
    """The authors' Llama-3-8B layers 22-30 of 32: the nine layers before the last, counted from the end."""
    last = max(1, num_layers - 1)
    return list(range(max(0, num_layers - 10), last))


def resolve_layers(spec: str | None, num_layers: int) -> list[int]:
    return parse_layers(spec, num_layers, "rledit", default_layers)


def resolve_params(spec: str | Sequence[str] | None, adapter) -> tuple[str, ...]:
    """The edited MLP projections: by default gate and up (the authors' Llama modules), up alone for
    MLPs without a gate."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return tuple(k for k in adapter.mlp_kinds() if k in ("gate", "up"))
    return resolve_mlp_params(spec, adapter, "rledit")


def edit_targets(layers: Sequence[int], kinds: Sequence[str]) -> list[tuple[int, str]]:
    """(layer, projection) of every edited weight, projection by projection (the authors' edit_modules order:
    every gate, then every up)."""
    return [(layer, kind) for kind in kinds for layer in layers]


def target_param_name(lm: LoadedModel, target: tuple[int, str]) -> str:
    return lm.adapter.mlp_proj_name(*target) + ".weight"


class RunningMeanStd(nn.Module):
    """The authors' normaliser: n, mean, an accumulated ``var`` (a batch adds b·var_unbiased + the
    Chan shift term) and std = sqrt(var / (n − 1 + eps)); x ↦ (x − mean) / (std + eps)."""

    n: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    std: torch.Tensor

    def __init__(self, size: int):
        super().__init__()
        for name, shape in (("n", (1,)), ("mean", (size,)), ("var", (size,)), ("std", (size,))):
            self.register_buffer(name, torch.zeros(shape))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        b = x.shape[0]
        n = self.n + b
        delta = x.mean(0) - self.mean
        self.mean += b * delta / n
        spread = x.var(0) if b > 1 else torch.zeros_like(self.var)  # one row: no spread (the authors' gives NaN)
        self.var += b * spread + self.n * b * delta.pow(2) / n
        self.std.copy_((self.var / (n - 1 + _EPS)).sqrt())
        self.n.copy_(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + _EPS)


class Block(nn.Module):
    def __init__(self, size: int, rank: int, n_modes: int, gen: torch.Generator):
        super().__init__()
        self.a = nn.Parameter(torch.randn(size, rank, generator=gen))
        self.b = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Parameter(torch.ones(n_modes, size))
        self.shift = nn.Parameter(torch.zeros(n_modes, size))

    def forward(self, y: torch.Tensor, mode: int) -> torch.Tensor:
        # clamp, not relu: its gradient at 0 is 1, so B (zero at first) learns (the authors' x.clamp(0))
        x = (y @ self.a @ self.b + self.bias).clamp(min=0)
        return y + self.scale[mode] * x + self.shift[mode]


class RLEditNet(nn.Module):
    """g for one weight shape (d_in, d_out), with one η and λ per weight of that shape (its modes)."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_blocks: int, n_modes: int, edit_lr: float, seed: int):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        gen = torch.Generator().manual_seed(seed)
        self.normaliser = RunningMeanStd(d_in + d_out)
        self.blocks = nn.ModuleList(Block(d_in + d_out, rank, n_modes, gen) for _ in range(n_blocks))
        self.lr = nn.Parameter(torch.full((n_modes,), float(edit_lr)))
        self.lamda = nn.Parameter(torch.zeros(n_modes))

    def forward(self, keys: torch.Tensor, grads: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.normaliser(torch.cat([keys, grads], -1))
        for block in self.blocks:
            h = block(h, mode)
        return h[..., : self.d_in], h[..., self.d_in :]

    def shift(self, keys: torch.Tensor, grads: torch.Tensor, mode: int) -> torch.Tensor:
        """ΔWᵀ (d_in, d_out) = (KᵀK + e^λ I)⁻¹ KᵀV, V_i = −η (k_i·k̃_i) d̃_i: the update equation."""
        pk, pd = self(keys, grads, mode)
        values = -self.lr[mode] * (keys * pk).sum(-1, keepdim=True) * pd
        eye = torch.eye(self.d_in, dtype=keys.dtype, device=keys.device)
        return torch.linalg.solve(keys.T @ keys + self.lamda[mode].exp() * eye, keys.T @ values)


class Hypernetwork(nn.Module):
    """One :class:`RLEditNet` per distinct weight shape; each edited weight is a mode of its shape's net
    (numbered in target order, as the authors' name2idx)."""

    def __init__(
        self,
        targets: Sequence[tuple[int, str]],
        shapes: Sequence[tuple[int, int]],
        rank: int,
        n_blocks: int,
        edit_lr: float,
        seed: int = 0,
    ):
        super().__init__()
        self.targets = [(int(layer), str(kind)) for layer, kind in targets]
        self.shapes = [(int(a), int(b)) for a, b in shapes]
        keys = list(dict.fromkeys(self.shapes))
        self.group = [keys.index(s) for s in self.shapes]
        self.mode = [self.shapes[:i].count(s) for i, s in enumerate(self.shapes)]
        self.nets = nn.ModuleList(
            RLEditNet(*key, rank, n_blocks, self.shapes.count(key), edit_lr, seed + g) for g, key in enumerate(keys)
        )

    def net(self, i: int) -> RLEditNet:
        return cast(RLEditNet, self.nets[self.group[i]])

    def shift(self, i: int, keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """ΔWᵀ (in, out) of target ``i``."""
        return self.net(i).shift(keys, grads, self.mode[i])

    def shape_nets(self) -> list[RLEditNet]:
        return [cast(RLEditNet, n) for n in self.nets]  # ModuleList items are typed Module

    def normaliser_state(self) -> dict[str, torch.Tensor]:
        return {
            f"{g}.{k}": v.detach().clone()
            for g, n in enumerate(self.shape_nets())
            for k, v in n.normaliser.state_dict().items()
        }

    def load_normaliser_state(self, state: dict[str, torch.Tensor]) -> None:
        for g, net in enumerate(self.shape_nets()):
            own = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(g)}
            net.normaliser.load_state_dict(own)


def build_hypernetwork(
    lm: LoadedModel, layers: Sequence[int], kinds: Sequence[str], rank: int, n_blocks: int, edit_lr: float, seed: int
) -> Hypernetwork:
    targets = edit_targets(layers, kinds)
    views = [lm.adapter.mlp_weight_view(*t) for t in targets]  # (out, in)
    return Hypernetwork(targets, [(v.shape[1], v.shape[0]) for v in views], rank, n_blocks, edit_lr, seed)


def keys_and_grads(
    lm: LoadedModel, net: Hypernetwork, pairs: Sequence[tuple[str, str]], chunk: int, update: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per target, (K, D) at the answer positions of ``pairs``: one forward and backward of the mean
    answer-token cross-entropy per ``chunk`` pairs (the authors' tuples of ``batch_size`` edits), each
    chunk's rows added to the normaliser of its target's net (``update``), target by target."""
    scorer = Scorer(lm.model, lm.tokenizer)
    keys: list[list[torch.Tensor]] = [[] for _ in net.targets]
    grads: list[list[torch.Tensor]] = [[] for _ in net.targets]
    for start in range(0, len(pairs), chunk):
        data = scorer.collate([scorer.encode(p, a) for p, a in pairs[start : start + chunk]])
        inputs: dict[int, torch.Tensor] = {}
        zeros: dict[int, torch.Tensor] = {}

        def zero(args, out, i):
            inputs[i] = args[0].detach()
            zeros[i] = torch.zeros_like(out, requires_grad=True)
            return zeros[i]

        with Hooks() as hooks:
            for i, target in enumerate(net.targets):
                hooks.add_to_output(lm.adapter.mlp_proj(*target), lambda mod, args, out, i=i: zero(args, out, i))
            with torch.enable_grad():
                loss = torch.nn.functional.cross_entropy(scorer.answer_logits(data), data.targets)
                outs = torch.autograd.grad(loss, [zeros[i] for i in range(len(net.targets))])
        for i, g in enumerate(outs):
            k, d = inputs[i][data.rows, data.cols].float(), g[data.rows, data.cols].float()
            if update:
                net.net(i).normaliser.update(torch.cat([k, d], -1))
            keys[i].append(k)
            grads[i].append(d)
    return [(torch.cat(k), torch.cat(d)) for k, d in zip(keys, grads)]


def shifted(lm: LoadedModel, targets: Sequence[tuple[int, str]], shifts: Sequence[torch.Tensor]) -> Hooks:
    """Hooks adding x @ ΔWᵀ to each target's output (differentiable): forwards as with W + ΔW."""
    hooks = Hooks()
    for target, s in zip(targets, shifts):
        hooks.add_to_output(lm.adapter.mlp_proj(*target), lambda mod, args, out, s=s: args[0] @ s.to(out.dtype))
    return hooks
