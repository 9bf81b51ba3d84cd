"""MEND's hypernetwork: which weights it edits, its network modules, and the edit gradient's
factors it reads and the edited forwards its output runs (shared by training and the editor)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

from lifelong.core.models import LoadedModel
from lifelong.core.scorer import Scorer
from lifelong.editors.base import parse_layers
from lifelong.editors.hooks import Hooks
from streams.errors import UserError


def default_layers(num_layers: int) -> list[int]:
    """The last three layers' MLPs, as MEND edits them."""
    return list(range(max(0, num_layers - 3), num_layers))


def resolve_layers(spec: str | None, num_layers: int, editor: str = "mend") -> list[int]:
    """MEND's layers: :func:`lifelong.editors.base.parse_layers` with :func:`default_layers`."""
    return parse_layers(spec, num_layers, editor, default_layers)


LEGACY_PARAMS = ("down",)  # the former editor: down projections only, one unshared network per layer
# The gradient network's form, recorded in every trained file and in the cache key: "clamp" is the
# original's (each layer clamped at 0 before its residual, v ~ N(0, 1)). Files without it were
# trained with ReLU in the first layer and nothing in the second, whose first layer never learned
# (ReLU's gradient at the zero start is 0), and are refused.
NETWORK_FORM = "clamp"


def resolve_params(spec: str | Sequence[str] | None, adapter, editor: str = "mend") -> tuple[str, ...]:
    """The edited MLP projections, in the adapter's order: every one when ``spec`` is empty."""
    kinds = adapter.mlp_kinds()
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return kinds
    names = [x.strip() for x in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [x for x in names if x]
    bad = [x for x in names if x not in kinds]
    if bad or not names:
        raise UserError(
            f"{editor}: params must be comma-separated MLP projections of a {adapter.family} model "
            f"({', '.join(kinds)}), got '{spec}'"
        )
    return tuple(k for k in kinds if k in names)


def edit_targets(layers: Sequence[int], kinds: Sequence[str]) -> list[tuple[int, str]]:
    """(layer, projection) of every edited weight, layer by layer (the original's inner_params order)."""
    return [(layer, kind) for layer in layers for kind in kinds]


def target_param_name(lm: LoadedModel, target: tuple[int, str]) -> str:
    return lm.adapter.mlp_proj_name(*target) + ".weight"


# ------------------------------------------------------------------------------------- the network


class RunningNorm(nn.Module):
    """Per-feature mean and standard deviation accumulated while training (Chan et al.'s merge), frozen after."""

    count: torch.Tensor  # buffers, registered in __init__
    mean: torch.Tensor
    m2: torch.Tensor

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        n, mean = x.shape[0], x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        total = self.count + n
        shift = mean - self.mean
        self.m2 += m2 + shift**2 * self.count * n / total
        self.mean += shift * n / total
        self.count.fill_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:  # nothing seen yet: leave the input as it is
            return x
        std = (self.m2 / (self.count - 1)).sqrt().to(x.dtype)
        return (x - self.mean.to(x.dtype)) / (std + 1e-7)  # the original's ε


class GradientTransform(nn.Module):
    """g_ℓ: [u; δ] -> [ũ; δ̃] through a normalised, low-rank, identity-initialised two-layer MLP,
    as the original's ``IDMLP`` of two ``LRLinear`` layers: x + clamp(u v x + b, 0) each, with
    u = 0 and v ~ N(0, 1) at the start and rank min(rank, width)."""

    def __init__(self, d_in: int, d_out: int, rank: int, seed: int = 0, n_modes: int | None = None):
        super().__init__()
        self.d_in, self.d_out, self.n_modes = d_in, d_out, n_modes
        width = d_in + d_out
        rank = min(rank, width)
        gen = torch.Generator().manual_seed(seed)
        self.norm_u, self.norm_delta = RunningNorm(d_in), RunningNorm(d_out)
        self.v1 = nn.Parameter(torch.randn(rank, width, generator=gen))
        self.u1 = nn.Parameter(torch.zeros(width, rank))
        self.b1 = nn.Parameter(torch.zeros(width))
        self.v2 = nn.Parameter(torch.randn(rank, width, generator=gen))
        self.u2 = nn.Parameter(torch.zeros(width, rank))
        self.b2 = nn.Parameter(torch.zeros(width))
        if n_modes is not None:  # the original's mode_scale / mode_shift embeddings, one row per shared weight
            self.scale1 = nn.Parameter(torch.ones(n_modes, width))
            self.shift1 = nn.Parameter(torch.zeros(n_modes, width))
            self.scale2 = nn.Parameter(torch.ones(n_modes, width))
            self.shift2 = nn.Parameter(torch.zeros(n_modes, width))

    def forward(
        self, u: torch.Tensor, delta: torch.Tensor, mode: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (mode is None) != (self.n_modes is None):
            raise ValueError(f"GradientTransform with n_modes={self.n_modes} called with mode={mode}")
        z = torch.cat([self.norm_u(u), self.norm_delta(delta)], -1)
        a = z @ self.v1.T @ self.u1.T + self.b1
        if mode is not None:
            a = a * self.scale1[mode] + self.shift1[mode]
        # clamp, not relu: at the zero start relu's gradient is 0 and u, b would never learn
        h = z + a.clamp(min=0)
        b = h @ self.v2.T @ self.u2.T + self.b2
        if mode is not None:
            b = b * self.scale2[mode] + self.shift2[mode]
        g = h + b.clamp(min=0)
        return g[..., : self.d_in], g[..., self.d_in :]


class Hypernetwork(nn.Module):
    """The :class:`GradientTransform` networks and one learned log step size per edited weight.

    ``targets`` are the edited weights as (layer, projection), ``shapes`` their (d_in, d_out).
    ``shared``: one network per distinct shape, each weight a mode of it (the original's
    ``shared: true``); otherwise one network per weight (the ``params=down`` editor)."""

    def __init__(
        self,
        targets: Sequence[tuple[int, str]],
        shapes: Sequence[tuple[int, int]],
        rank: int,
        edit_lr: float,
        seed: int = 0,
        shared: bool = True,
    ):
        super().__init__()
        self.targets = [(int(layer), str(kind)) for layer, kind in targets]
        self.shapes = [(int(a), int(b)) for a, b in shapes]
        self.shared = shared
        if shared:
            keys = list(dict.fromkeys(self.shapes))
            self.group = [keys.index(s) for s in self.shapes]
            self.mode: list[int | None] = [self.shapes[:i].count(s) for i, s in enumerate(self.shapes)]
            self.transforms = nn.ModuleList(
                GradientTransform(*key, rank, seed + g, n_modes=self.shapes.count(key)) for g, key in enumerate(keys)
            )
        else:
            self.group, self.mode = list(range(len(self.targets))), [None] * len(self.targets)
            self.transforms = nn.ModuleList(
                GradientTransform(*shape, rank, seed + i) for i, shape in enumerate(self.shapes)
            )
        self.log_lr = nn.Parameter(torch.full((len(self.targets),), math.log(edit_lr)))

    def transform(self, i: int) -> GradientTransform:
        return cast(GradientTransform, self.transforms[self.group[i]])  # ModuleList items are typed Module

    def factors(self, i: int, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(left (out, N), right (in, N)) with ΔW = left @ right.T = −α Σ_t δ̃_t ũ_tᵀ for N token rows."""
        u_t, delta_t = self.transform(i)(u, delta, self.mode[i])
        return -self.log_lr[i].exp() * delta_t.T, u_t.T


# ------------------------------------------------------------------------------------- gradients and edited forwards


def _ids_mask(scorer: Scorer, pairs: Sequence[tuple[str, str]]):
    return scorer.collate([scorer.encode(p, a) for p, a in pairs])


def _mean_nll(scorer: Scorer, data, n: int) -> torch.Tensor:
    """Mean over pairs of each pair's mean target-token NLL."""
    logits = scorer.answer_logits(data)
    token_nll = -logits.log_softmax(-1).gather(1, data.targets[:, None])[:, 0]
    owner = torch.as_tensor(data.owner, device=token_nll.device)
    counts = torch.bincount(owner, minlength=n).to(token_nll.dtype)
    return (torch.zeros(n, device=token_nll.device).index_add(0, owner, token_nll) / counts).mean()


def edit_gradient_factors(
    lm: LoadedModel, targets: Sequence[tuple[int, str]], pairs: Sequence[tuple[str, str]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per edited weight, (u, δ) of every real token of the edit sequences: ∇W of the mean target NLL = Σ δ uᵀ.

    u is what enters the projection (for gate and up: the normed MLP input; for down: the
    activation product), δ the loss gradient w.r.t. its output; all from one backward pass."""
    scorer = Scorer(lm.model, lm.tokenizer)
    data = _ids_mask(scorer, pairs)
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def zero(mod, args, out, i):
        inputs[i] = args[0].detach()
        # δ = ∂loss/∂(this zero added to the output)
        outputs[i] = torch.zeros_like(out, requires_grad=True)
        return outputs[i]

    with Hooks() as hooks:
        for i, target in enumerate(targets):
            hooks.add_to_output(lm.adapter.mlp_proj(*target), lambda mod, args, out, i=i: zero(mod, args, out, i))
        with torch.enable_grad():
            loss = _mean_nll(scorer, data, len(pairs))
            grads = torch.autograd.grad(loss, [outputs[i] for i in range(len(targets))])
    real = data.mask.bool()
    return [(inputs[i][real], g[real]) for i, g in enumerate(grads)]


@contextmanager
def lowrank_added(
    lm: LoadedModel, targets: Sequence[tuple[int, str]], factors: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> Iterator[None]:
    """Forwards inside run with W + left @ right.T at each weight, as x @ right @ left.T (differentiable)."""
    with Hooks() as hooks:
        for target, f in zip(targets, factors):
            hooks.add_to_output(lm.adapter.mlp_proj(*target), lambda mod, args, out, f=f: (args[0] @ f[1]) @ f[0].T)
        yield


def build_hypernetwork(
    lm: LoadedModel, layers: Sequence[int], kinds: Sequence[str], rank: int, edit_lr: float, seed: int = 0
) -> Hypernetwork:
    """An untrained (identity) hypernetwork for ``kinds`` of ``layers``: shared per shape, except ``down`` alone."""
    targets = edit_targets(layers, kinds)
    views = [lm.adapter.mlp_weight_view(*t) for t in targets]  # (out, in)
    shapes = [(v.shape[1], v.shape[0]) for v in views]  # (d_in, d_out)
    return Hypernetwork(targets, shapes, rank, edit_lr, seed, shared=tuple(kinds) != LEGACY_PARAMS)
