"""MEND (Mitchell et al., ICLR 2022): a trained hypernetwork turns an edit's fine-tuning gradient into the update.

For a linear map W (out, in) inside the MLP, the gradient of the edit loss is a sum of
rank-one terms over tokens, ∇W = Σ_t δ_t u_tᵀ (u_t: the map's input, δ_t: the loss
gradient w.r.t. its output). For the gate and up projections u_t is the MLP's input
(the hidden state after the block's second norm); for the down projection it is the
activation product act(gate) ⊙ up. MEND maps each (u_t, δ_t) through a small network g:
the concatenation z = [u; δ] is normalised with running statistics from training, then

    h = z + ReLU(s₁ ⊙ (U₁V₁z + b₁) + t₁),   g(z) = h + s₂ ⊙ (U₂V₂h + b₂) + t₂,   [ũ_t; δ̃_t] = g(z_t),

with low-rank U_iV_i (rank r) and U_i initialised to zero, so g starts as the identity.
The update is W̃ = W − α_w Σ_t δ̃_t ũ_tᵀ with a learned step α_w per edited weight w
(initialised to ``edit_lr`` = 1e-4, as the original's ``edit_lrs``); it is stored as its
factors (−α_w δ̃, ũ), never as the dense product.

Which weights (``params``): by default, as the original MEND (``inner_params`` of its
``config/model/*.yaml``: ``mlp.c_fc`` and ``mlp.c_proj`` of GPT-2's last three layers) and
EasyEdit's MEND for Llama (``gate_proj``, ``up_proj``, ``down_proj`` of the last three),
every MLP projection of the last three layers: gate, up and down for gated (Llama-style)
MLPs, up (``c_fc``/``fc_in``/…) and down (``c_proj``/…) otherwise. As the original's
``mend.shared: true``, one network g is shared by all edited weights of the same shape
(gate and up: one, down: another), its normalisation statistics included, and the
per-weight conditioning is the original's ``n_modes`` scale and shift (s, t: one row per
weight of that shape, initialised to 1 and 0) on each layer's pre-activation.

``params=down`` is this editor as it was before: the down projections only, one unshared
network per layer and no per-weight scale/shift. Its cache key is the former one, so
hypernetworks trained before keep loading under that setting.

Differences from the original (``algs/mend.py``, ``nn.py``), named here:
* the second layer of g has no ReLU (the original clamps every layer's output at 0 before
  the residual); the low-rank layers have rank r = 64 by default (the original: 1920);
* the update is W − α δ̃ũᵀ with α > 0 (kept as log α); the original adds ``edit_lrs × g``;
* normalisation statistics are merged per batch exactly (Chan et al.), not per token by
  Welford updates (the same numbers up to rounding), and they stop at the end of training;
* training is a fixed number of steps of Adam on a CPU-sized budget (the original: up to
  500k steps with early stopping on validation), with the edit loss on the prompt and its
  paraphrases and the locality loss on neighborhood prompts, as below.

Training (:func:`train_hypernetwork`, the ``lifelong train-mend`` command) minimises
c_edit·L_edit + c_loc·L_loc over an editing dataset: L_edit is the new target's NLL
on the edit prompt and its paraphrases after the update, L_loc the KL divergence of
the unedited from the edited model's predictions on locality prompts. Only the
hypernetworks and α learn; the model stays frozen. The result is cached under the
cache root keyed by model, layers, edited weights and training data, with the training
records' prompts, so that a replay can refuse an evaluation stream that overlaps them.
Training writes its learning curve (per step: edit and locality loss; every
``eval_every`` steps: edit success on ``holdout`` records kept out of training) to
``curve.csv`` beside the hypernetwork.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TypedDict, cast

import numpy as np
import torch
from torch import nn

from lifelong.delta import Delta, atomic_save_tensors
from lifelong.durable import publish
from lifelong.editors.base import Editor
from lifelong.editors.base import parse_layers
from lifelong.editors.hooks import Hooks
from lifelong.editors.locate import lowrank_change
from lifelong.models import LoadedModel, cache_root
from lifelong.scorer import Scorer
from streams import Edit
from streams.errors import MissingFileError, UserError

DEFAULT_TRAIN_DATA = "dataset:zsre_mend"  # MEND's own zsRE training sample; disjoint from the built-in facts


def default_layers(num_layers: int) -> list[int]:
    """The last three layers' MLPs, as MEND edits them."""
    return list(range(max(0, num_layers - 3), num_layers))


def resolve_layers(spec: str | None, num_layers: int, editor: str = "mend") -> list[int]:
    """MEND's layers: :func:`lifelong.editors.base.parse_layers` with :func:`default_layers`."""
    return parse_layers(spec, num_layers, editor, default_layers)


LEGACY_PARAMS = ("down",)  # the former editor: down projections only, one unshared network per layer


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
        return (x - self.mean.to(x.dtype)) / (std + 1e-8)


class GradientTransform(nn.Module):
    """g_ℓ: [u; δ] -> [ũ; δ̃] through a normalised, low-rank, identity-initialised two-layer MLP."""

    def __init__(self, d_in: int, d_out: int, rank: int, seed: int = 0, n_modes: int | None = None):
        super().__init__()
        self.d_in, self.d_out, self.n_modes = d_in, d_out, n_modes
        width = d_in + d_out
        gen = torch.Generator().manual_seed(seed)
        self.norm_u, self.norm_delta = RunningNorm(d_in), RunningNorm(d_out)
        self.v1 = nn.Parameter(torch.randn(rank, width, generator=gen) / math.sqrt(width))
        self.u1 = nn.Parameter(torch.zeros(width, rank))
        self.b1 = nn.Parameter(torch.zeros(width))
        self.v2 = nn.Parameter(torch.randn(rank, width, generator=gen) / math.sqrt(width))
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
        h = z + torch.relu(a)
        b = h @ self.v2.T @ self.u2.T + self.b2
        if mode is not None:
            b = b * self.scale2[mode] + self.shift2[mode]
        g = h + b
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


# ------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Hyperparameters of hypernetwork training (MEND's losses; steps and rates sized for a CPU)."""

    steps: int = 150
    batch_size: int = 4  # edits per training step
    rank: int = 64  # rank of the hypernetwork's low-rank layers
    lr: float = 1e-3  # Adam on the hypernetworks
    lr_lr: float = 1e-2  # Adam on the log step sizes
    edit_lr: float = 1e-4  # initial α
    c_edit: float = 0.1  # MEND's edit-loss weight (the locality loss has weight 1)
    c_loc: float = 1.0
    seed: int = 0
    checkpoint_every: int = 25
    holdout: int = 0  # the last N records are kept out of training, for the learning curve's edit success
    eval_every: int = 25  # steps between held-out evaluations (and before the first step)


# TrainConfig fields that do not change the trained network (left out of a checkpoint's identity)
_NOT_IDENTITY = ("steps", "checkpoint_every", "eval_every")


def _prompt_key(subject: str, prompt: str) -> str:
    text = json.dumps([subject.strip().lower(), " ".join(prompt.lower().split())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_keys(edit: Edit) -> set[str]:
    """Hashes of (subject, prompt) for an edit's prompt and paraphrases: what overlap is judged on."""
    return {_prompt_key(edit.subject, text) for text in (edit.rendered_prompt, *edit.paraphrases)}


def load_training_records(spec: str, limit: int | None = None) -> list[Edit]:
    """Edits from one or more comma-separated stream specs (builtin, dataset:NAME, file.jsonl)."""
    from streams import load_stream

    records: list[Edit] = []
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        records.extend(load_stream(part))
    if limit:
        records = records[:limit]
    if len(records) < 2:
        raise UserError(f"MEND training data '{spec}' has {len(records)} records: at least 2 are needed")
    return records


def model_key(lm: LoadedModel) -> str:
    name = lm.name
    return str(Path(name).resolve()) if os.path.isdir(name) else name


def hypernet_dir(lm: LoadedModel, layers: Sequence[int], data: str, params: str | Sequence[str] | None = None) -> Path:
    """Cache directory of the hypernetwork for (model, layers, edited weights, training data).

    ``params`` None or empty: every MLP projection (the default). ``params=down`` keeps the
    key and name the down-only editor had, so its trained hypernetworks are found again."""
    kinds = resolve_params(params, lm.adapter)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_key(lm)).name)
    name = f"{safe}-L{'_'.join(map(str, layers))}"
    if kinds == LEGACY_PARAMS:
        key = json.dumps([model_key(lm), list(layers), data])
    else:
        key = json.dumps([model_key(lm), list(layers), data, list(kinds)])
        name += "-" + "_".join(kinds)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "mend" / f"{name}-{digest}"


def _locality_pairs(records: Sequence[Edit], index: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    edit = records[index]
    if edit.neighborhood:
        n = edit.neighborhood[int(rng.integers(len(edit.neighborhood)))]
        return [(n.prompt, n.answer)]
    other = records[int(rng.integers(len(records)))]  # no neighbors: another record's fact stands in
    return [(other.rendered_prompt, other.target_true or other.target_new)]


def _edit_pairs(edit: Edit) -> list[tuple[str, str]]:
    return [(text, edit.target_new) for text in (edit.rendered_prompt, *edit.paraphrases)]


class StepLosses(TypedDict):
    total: torch.Tensor  # with its graph: call backward through it
    edit: float
    loc: float


def training_step(
    lm: LoadedModel, net: Hypernetwork, batch: Sequence[Edit], loc_pairs: Sequence[tuple[str, str]], config: TrainConfig
) -> StepLosses:
    """MEND's loss for one batch of edits; returns its parts (call backward through the returned total)."""
    scorer = Scorer(lm.model, lm.tokenizer)
    grads = edit_gradient_factors(lm, net.targets, [(e.rendered_prompt, e.target_new) for e in batch])
    for i, (u, delta) in enumerate(grads):  # a shared network's statistics pool all its weights' rows
        net.transform(i).norm_u.update(u)
        net.transform(i).norm_delta.update(delta)
    factors = [net.factors(i, u, delta) for i, (u, delta) in enumerate(grads)]
    edit_pairs = [p for e in batch for p in _edit_pairs(e)]
    loc = _ids_mask(scorer, loc_pairs)
    with torch.no_grad():
        base_logp = scorer.answer_logits(loc).log_softmax(-1)
    with lowrank_added(lm, net.targets, factors):
        edit_loss = _mean_nll(scorer, _ids_mask(scorer, edit_pairs), len(edit_pairs))
        new_logp = scorer.answer_logits(loc).log_softmax(-1)
    loc_loss = torch.nn.functional.kl_div(new_logp, base_logp, log_target=True, reduction="batchmean")
    total = config.c_edit * edit_loss + config.c_loc * loc_loss
    return {"total": total, "edit": edit_loss.item(), "loc": loc_loss.item()}


def heldout_success(lm: LoadedModel, net: Hypernetwork, edits: Sequence[Edit]) -> dict[str, float]:
    """Each edit applied alone through ``net``: mean token accuracy of the new target (MEND's edit
    success) on the prompt (``es``) and on its paraphrases (``gen``), the share of prompts with every
    target token right (``exact``), and the prompt's mean target-token NLL (``nll``)."""
    scorer = Scorer(lm.model, lm.tokenizer)
    es: list[float] = []
    gen: list[float] = []
    exact: list[float] = []
    nll: list[float] = []
    for e in edits:
        grads = edit_gradient_factors(lm, net.targets, [(e.rendered_prompt, e.target_new)])
        with torch.no_grad():
            factors = [net.factors(i, u, delta) for i, (u, delta) in enumerate(grads)]
        with lowrank_added(lm, net.targets, factors):
            scores = scorer.score(_edit_pairs(e))
        es.append(float(scores.token_acc[0]))
        exact.append(float(scores.exact[0]))
        nll.append(float(scores.nll[0]))
        gen.extend(float(x) for x in scores.token_acc[1:])
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {"es": mean(es), "gen": mean(gen), "exact": mean(exact), "nll": mean(nll)}


CURVE_FIELDS = (
    "step",
    "seconds",
    "edit_loss",
    "loc_loss",
    "total",
    "heldout_es",
    "heldout_gen",
    "heldout_exact",
    "heldout_nll",
)


def read_curve(path: Path) -> list[dict[str, float | None]]:
    """Rows of a ``curve.csv`` (empty cells: not evaluated at that step) as floats (None when empty)."""
    import csv

    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def _write_curve(path: Path, rows: Sequence[dict]) -> None:
    import csv

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, CURVE_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CURVE_FIELDS})
    os.replace(tmp, path)


def curve_summary(rows: Sequence[dict]) -> list[dict[str, float]]:
    """One line per held-out evaluation: its step, the mean edit and locality losses and the mean
    seconds per step over the steps since the previous evaluation, and the held-out scores."""
    out, window, last_seconds = [], [], 0.0
    for row in rows:
        if row["step"] > 0:
            window.append(row)
        if row.get("heldout_es") is not None:
            seconds = row["seconds"] if row["seconds"] is not None else last_seconds
            out.append(
                {
                    "step": int(row["step"]),
                    "edit_loss": float(np.mean([r["edit_loss"] for r in window])) if window else None,
                    "loc_loss": float(np.mean([r["loc_loss"] for r in window])) if window else None,
                    "s_per_step": (seconds - last_seconds) / len(window) if window else None,
                    "es": row["heldout_es"],
                    "gen": row["heldout_gen"],
                    "exact": row["heldout_exact"],
                    "nll": row["heldout_nll"],
                }
            )
            window, last_seconds = [], seconds
    return out


def format_curve(rows: Sequence[dict]) -> str:
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    lines = [
        f"{'step':>6} {'edit loss':>10} {'loc loss':>9} {'s/step':>7} {'held-out ES':>12} {'gen':>6} "
        f"{'exact':>6} {'NLL':>6}"
    ]
    for r in curve_summary(rows):
        lines.append(
            f"{r['step']:>6} {fmt(r['edit_loss'], '.3f'):>10} {fmt(r['loc_loss'], '.4f'):>9} "
            f"{fmt(r['s_per_step'], '.2f'):>7} {fmt(r['es'], '.3f'):>12} {fmt(r['gen'], '.3f'):>6} "
            f"{fmt(r['exact'], '.3f'):>6} {fmt(r['nll'], '.2f'):>6}"
        )
    return "\n".join(lines)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    publish(tmp, path)


def build_hypernetwork(
    lm: LoadedModel, layers: Sequence[int], kinds: Sequence[str], rank: int, edit_lr: float, seed: int = 0
) -> Hypernetwork:
    """An untrained (identity) hypernetwork for ``kinds`` of ``layers``: shared per shape, except ``down`` alone."""
    targets = edit_targets(layers, kinds)
    views = [lm.adapter.mlp_weight_view(*t) for t in targets]  # (out, in)
    shapes = [(v.shape[1], v.shape[0]) for v in views]  # (d_in, d_out)
    return Hypernetwork(targets, shapes, rank, edit_lr, seed, shared=tuple(kinds) != LEGACY_PARAMS)


def train_hypernetwork(
    lm: LoadedModel,
    layers: Sequence[int],
    data: str,
    config: TrainConfig,
    *,
    params: str | Sequence[str] | None = None,
    directory: Path | None = None,
    limit: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train (or resume training) the hypernetwork for ``lm``'s ``params`` of ``layers`` on ``data``; returns its file.

    ``params`` None: every MLP projection. A checkpoint is written every ``config.checkpoint_every``
    steps, so a killed run resumes where it stopped; batches are drawn from (seed, step), so
    resuming gives the same result. The learning curve goes to ``curve.csv`` in the same directory."""
    from lifelong.bars import bar as progress_bar

    kinds = resolve_params(params, lm.adapter)
    records = load_training_records(data, limit)
    heldout: list[Edit] = []
    if config.holdout:
        if config.holdout > len(records) - 2:
            raise UserError(f"holdout {config.holdout} leaves fewer than 2 of {len(records)} training records")
        records, heldout = records[: -config.holdout], records[-config.holdout :]
    keys = sorted(set().union(*(record_keys(e) for e in records)))
    content = hashlib.sha256(
        json.dumps([e.to_dict() for e in records], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    directory = Path(directory) if directory else hypernet_dir(lm, layers, data, kinds)
    directory.mkdir(parents=True, exist_ok=True)
    final, ckpt, curve_path = directory / "hypernet.safetensors", directory / "checkpoint.pt", directory / "curve.csv"
    net = build_hypernetwork(lm, layers, kinds, config.rank, config.edit_lr, config.seed).to(lm.device)
    groups = [
        {"params": [p for n, p in net.named_parameters() if n != "log_lr"], "lr": config.lr},
        {"params": [net.log_lr], "lr": config.lr_lr},
    ]
    optimizer = torch.optim.Adam(groups)
    setup = {k: v for k, v in asdict(config).items() if k not in _NOT_IDENTITY}
    if not config.holdout:
        del setup["holdout"]  # as before holdout existed, so such checkpoints still resume
    identity: dict[str, Any] = {
        "model": model_key(lm),
        "layers": list(layers),
        "data": data,
        "limit": limit,
        "content": content,
        "config": setup,
    }
    if kinds != LEGACY_PARAMS:
        identity["params"] = list(kinds)
    done, seconds = 0, 0.0
    if ckpt.is_file():
        saved = torch.load(ckpt, weights_only=True)
        if json.loads(saved["identity"]) != identity:
            raise UserError(f"{ckpt}: checkpoint of a different training set-up; delete {directory} to start over")
        net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        done, seconds = int(saved["step"]), float(saved["seconds"])
        if done > config.steps:
            raise UserError(
                f"{ckpt}: checkpoint at step {done}, past the {config.steps} steps asked for; "
                f"ask for {done} steps to finish there"
            )
    # every row has its step
    curve = [row for row in read_curve(curve_path) if cast(float, row["step"]) <= done] if done else []

    def evaluate(row: dict) -> None:
        if heldout:
            scores = heldout_success(lm, net, heldout)
            row.update({f"heldout_{k}": v for k, v in scores.items()})

    def save_checkpoint(step: int) -> None:
        _atomic_torch_save(
            {
                "identity": json.dumps(identity),
                "net": net.state_dict(),
                "step": step,
                "optimizer": optimizer.state_dict(),
                "seconds": seconds,
            },
            ckpt,
        )

    todo = range(done + 1, config.steps + 1)
    if stop_after is not None:
        todo = todo[:stop_after]
    if done == 0 and len(todo):  # the untrained (identity) network's scores start the curve
        curve = [{"step": 0, "seconds": 0.0}]
        evaluate(curve[0])
        _write_curve(curve_path, curve)
    bar = progress_bar(todo, show=progress, desc="train-mend", unit="step", initial=done, total=config.steps)
    for step in bar:
        t0 = time.perf_counter()
        rng = np.random.default_rng([config.seed, step])
        picks = rng.choice(len(records), size=min(config.batch_size, len(records)), replace=False)
        batch = [records[int(i)] for i in picks]
        loc_pairs = [p for i in picks for p in _locality_pairs(records, int(i), rng)]
        losses = training_step(lm, net, batch, loc_pairs, config)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        seconds += time.perf_counter() - t0
        row = {
            "step": step,
            "seconds": round(seconds, 3),
            "edit_loss": losses["edit"],
            "loc_loss": losses["loc"],
            "total": losses["total"].item(),
        }
        if step % config.eval_every == 0 or step == config.steps:
            evaluate(row)
        curve.append(row)
        _write_curve(curve_path, curve)
        bar.set_postfix(
            edit=f"{losses['edit']:.2f}",
            loc=f"{losses['loc']:.3f}",
            **({"es": f"{row['heldout_es']:.2f}"} if "heldout_es" in row else {}),
        )
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint(step)
    bar.close()
    done = max([done, *todo]) if len(todo) else done
    if done >= config.steps:
        meta = {
            "identity": identity,
            "steps": config.steps,
            "seconds": round(seconds, 2),
            "targets": [list(t) for t in net.targets],
            "shapes": [list(s) for s in net.shapes],
            "heldout_ids": [e.id for e in heldout],
            "train_ids": [e.id for e in records],
            "train_keys": keys,
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        atomic_save_tensors(tensors, final, {"lifelong_mend": json.dumps(meta)})
    return final


# ------------------------------------------------------------------------------------- the editor


@dataclass
class MENDParams:
    layers: str = ""  # e.g. "27-29", "28,29" or "all"; empty: the last three layers
    # edited MLP weights of each layer: comma-separated gate, up, down; empty: all of them (gate,up,down
    # for Llama-style MLPs, up,down = c_fc,c_proj for GPT-2); "down": the former down-only editor
    params: str = ""
    train_data: str = DEFAULT_TRAIN_DATA  # which trained hypernetwork to use (its training source)
    hypernet: str = ""  # an explicit hypernetwork file instead of the cached one


def _describe(targets: Sequence[tuple[int, str]]) -> str:
    return " ".join(f"{layer}.{kind}" for layer, kind in targets)


class OverlapError(UserError):
    """The evaluation stream shares records with the hypernetwork's training data."""


def load_hypernetwork(path: Path, device: torch.device) -> tuple[Hypernetwork, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lifelong_mend", "{}"))
    if not meta:
        raise UserError(f"{path}: not a MEND hypernetwork file")
    tensors = load_file(str(path))
    rank = tensors["transforms.0.v1"].shape[0]
    kinds = tuple(meta["identity"].get("params", LEGACY_PARAMS))  # files from before params existed: down only
    if "targets" in meta:
        targets, shapes = [tuple(t) for t in meta["targets"]], [tuple(s) for s in meta["shapes"]]
    else:
        layers = meta["identity"]["layers"]
        targets = edit_targets(layers, kinds)
        shapes = [
            (tensors[f"transforms.{i}.norm_u.mean"].numel(), tensors[f"transforms.{i}.norm_delta.mean"].numel())
            for i in range(len(layers))
        ]
    net = Hypernetwork(targets, shapes, rank, 1.0, shared=kinds != LEGACY_PARAMS)
    net.load_state_dict(tensors)
    return net.to(device).eval().requires_grad_(False), meta


class MENDEditor(Editor):
    name = "mend"
    description = "MEND: a trained hypernetwork maps the edit's rank-one gradient factors to a low-rank update"
    Params = MENDParams

    def __init__(self, params=None):
        super().__init__(params)
        self._net: Hypernetwork | None = None
        self._meta: dict = {}
        self._weights: list[str] = []

    def layers(self, lm: LoadedModel) -> list[int]:
        return resolve_layers(self.params.layers, lm.num_layers, self.name)

    def kinds(self, lm: LoadedModel) -> tuple[str, ...]:
        return resolve_params(self.params.params, lm.adapter, self.name)

    def targets(self, lm: LoadedModel) -> list[tuple[int, str]]:
        return edit_targets(self.layers(lm), self.kinds(lm))

    def hypernet_path(self, lm: LoadedModel) -> Path:
        if self.params.hypernet:
            return Path(self.params.hypernet)
        return hypernet_dir(lm, self.layers(lm), self.params.train_data, self.kinds(lm)) / "hypernet.safetensors"

    def bind(self, lm: LoadedModel) -> "MENDEditor":
        layers, kinds = self.layers(lm), self.kinds(lm)
        # the resolved edited weights go to the manifest: layers and params by role, edited_weights by name
        self.params = dataclasses.replace(self.params, layers=",".join(map(str, layers)), params=",".join(kinds))
        self._weights = [target_param_name(lm, t) for t in edit_targets(layers, kinds)]
        if self._net is not None:
            return self
        path = self.hypernet_path(lm)
        if not path.is_file():
            spec = ",".join(map(str, layers))
            raise MissingFileError(
                f"no trained MEND hypernetwork for model '{lm.name}', layers {spec}, params {','.join(kinds)}, "
                f"data '{self.params.train_data}' (looked in {path}): run `lifelong train-mend --model {lm.name} "
                f"--layers {spec} --params {','.join(kinds)} --data {self.params.train_data}` first"
            )
        net, meta = load_hypernetwork(path, lm.device)
        other_model = not self.params.hypernet and meta["identity"]["model"] != model_key(lm)
        if net.targets != edit_targets(layers, kinds) or other_model:
            raise UserError(
                f"{path}: hypernetwork trained for model {meta['identity']['model']} weights "
                f"{_describe(net.targets)}, not {model_key(lm)} weights "
                f"{_describe(edit_targets(layers, kinds))}"
            )
        self._net, self._meta = net, meta
        return self

    def hyperparameters(self) -> dict:
        out = asdict(self.params)
        if self._weights:
            out["edited_weights"] = list(self._weights)
        if self._meta:  # what the run used: the hypernetwork's training set-up
            out["hypernet_identity"] = self._meta["identity"]
            out["hypernet_steps"] = self._meta["steps"]
        return out

    def check_stream(self, stream: Sequence[Edit]) -> None:
        """Refuse an evaluation stream that shares a (subject, prompt) with the training records."""
        if self._net is None:
            raise RuntimeError("MENDEditor.check_stream needs bind(lm) first")
        trained = set(self._meta["train_keys"])
        clashes = [e for e in stream if record_keys(e) & trained]
        if clashes:
            e = clashes[0]
            raise OverlapError(
                f"evaluation stream overlaps the MEND hypernetwork's training records "
                f"({self._meta['identity']['data']}): {len(clashes)} of {len(stream)} edits share a subject+prompt, "
                f"e.g. {e.id} {e.rendered_prompt!r}; evaluate on other records or train-mend on other data"
            )

    def scope(self, lm: LoadedModel) -> list[str]:
        return [target_param_name(lm, t) for t in self.targets(lm)]

    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        if not batch:
            return Delta.empty()
        self.bind(lm)
        net = self._net
        assert net is not None  # bind() loads it or raises
        grads = edit_gradient_factors(lm, net.targets, [(e.rendered_prompt, e.target_new) for e in batch])
        changes = {}
        with torch.no_grad():
            for i, (target, (u, delta)) in enumerate(zip(net.targets, grads)):
                left, right = net.factors(i, u, delta)
                name = target_param_name(lm, target)
                changes[name] = lowrank_change(lm.adapter, left, right, lm.model.get_parameter(name).dtype)
        out = Delta(changes)
        out.apply(lm.model)
        return out
