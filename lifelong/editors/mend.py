"""MEND (Mitchell et al., ICLR 2022): a trained hypernetwork turns an edit's fine-tuning gradient into the update.

For an MLP output projection W (out, in), the gradient of the edit loss is a sum of
rank-one terms over tokens, ∇W = Σ_t δ_t u_tᵀ (u_t: the projection's input, δ_t: the
loss gradient w.r.t. its output). MEND maps each (u_t, δ_t) through a small network
g_ℓ, one per edited layer: the concatenation z = [u; δ] is normalised with running
statistics from training, then

    h = z + ReLU(U₁V₁z + b₁),    g(z) = h + U₂V₂h + b₂,    [ũ_t; δ̃_t] = g(z_t),

with low-rank U_iV_i (rank r) and U_i initialised to zero, so g starts as the identity.
The update is W̃ = W − α_ℓ Σ_t δ̃_t ũ_tᵀ with a learned step α_ℓ per layer; it is
stored as its factors (−α_ℓ δ̃, ũ), never as the dense product.

Training (:func:`train_hypernetwork`, the ``lifelong train-mend`` command) minimises
c_edit·L_edit + c_loc·L_loc over an editing dataset: L_edit is the new target's NLL
on the edit prompt and its paraphrases after the update, L_loc the KL divergence of
the unedited from the edited model's predictions on locality prompts. Only the
hypernetworks and α learn; the model stays frozen. The result is cached under the
cache root keyed by model, layers and training data, with the training records'
prompts, so that a replay can refuse an evaluation stream that overlaps them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from lifelong.delta import Delta, atomic_save_tensors
from lifelong.durable import publish
from lifelong.editors.base import Editor
from lifelong.editors.kn import parse_layers
from lifelong.editors.locate import lowrank_change
from lifelong.models import LoadedModel, cache_root
from probes.scorer import Scorer
from streams import Edit, EditStream

DEFAULT_TRAIN_DATA = "dataset:zsre_mend"  # MEND's own zsRE training sample; disjoint from the built-in facts


def default_layers(num_layers: int) -> list[int]:
    """The last three layers' MLPs, as MEND edits them."""
    return list(range(max(0, num_layers - 3), num_layers))


def resolve_layers(spec: str, num_layers: int, editor: str = "mend") -> list[int]:
    return default_layers(num_layers) if not spec.strip() else parse_layers(spec, num_layers, editor)


# ------------------------------------------------------------------------------------- the network


class RunningNorm(nn.Module):
    """Per-feature mean and standard deviation accumulated while training (Chan et al.'s merge), frozen after."""

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
        self.m2 += m2 + shift ** 2 * self.count * n / total
        self.mean += shift * n / total
        self.count.fill_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:  # nothing seen yet: leave the input as it is
            return x
        std = (self.m2 / (self.count - 1)).sqrt().to(x.dtype)
        return (x - self.mean.to(x.dtype)) / (std + 1e-8)


class GradientTransform(nn.Module):
    """g_ℓ: [u; δ] -> [ũ; δ̃] through a normalised, low-rank, identity-initialised two-layer MLP."""

    def __init__(self, d_in: int, d_out: int, rank: int, seed: int = 0):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        width = d_in + d_out
        gen = torch.Generator().manual_seed(seed)
        self.norm_u, self.norm_delta = RunningNorm(d_in), RunningNorm(d_out)
        self.v1 = nn.Parameter(torch.randn(rank, width, generator=gen) / math.sqrt(width))
        self.u1 = nn.Parameter(torch.zeros(width, rank))
        self.b1 = nn.Parameter(torch.zeros(width))
        self.v2 = nn.Parameter(torch.randn(rank, width, generator=gen) / math.sqrt(width))
        self.u2 = nn.Parameter(torch.zeros(width, rank))
        self.b2 = nn.Parameter(torch.zeros(width))

    def forward(self, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([self.norm_u(u), self.norm_delta(delta)], -1)
        h = z + torch.relu(z @ self.v1.T @ self.u1.T + self.b1)
        g = h + h @ self.v2.T @ self.u2.T + self.b2
        return g[..., : self.d_in], g[..., self.d_in:]


class Hypernetwork(nn.Module):
    """One :class:`GradientTransform` and one learned log step size per edited layer."""

    def __init__(self, layers: Sequence[int], d_in: int, d_out: int, rank: int, edit_lr: float, seed: int = 0):
        super().__init__()
        self.layers = list(layers)
        self.transforms = nn.ModuleList(GradientTransform(d_in, d_out, rank, seed + i) for i, _ in enumerate(layers))
        self.log_lr = nn.Parameter(torch.full((len(layers),), math.log(edit_lr)))

    def factors(self, i: int, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(left (out, N), right (in, N)) with ΔW = left @ right.T = −α Σ_t δ̃_t ũ_tᵀ for N token rows."""
        u_t, delta_t = self.transforms[i](u, delta)
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


def edit_gradient_factors(lm: LoadedModel, layers: Sequence[int], pairs: Sequence[tuple[str, str]]
                          ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (u, δ) of every real token of the edit sequences: ∇W of the mean target NLL = Σ δ uᵀ."""
    scorer = Scorer(lm.model, lm.tokenizer)
    data = _ids_mask(scorer, pairs)
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def hook(mod, args, out, layer=layer):
            inputs[layer] = args[0].detach()
            # δ = ∂loss/∂(this zero added to the output)
            outputs[layer] = torch.zeros_like(out, requires_grad=True)
            return out + outputs[layer]
        handles.append(lm.adapter.out_proj(layer).register_forward_hook(hook))
    try:
        with torch.enable_grad():
            loss = _mean_nll(scorer, data, len(pairs))
            grads = torch.autograd.grad(loss, [outputs[layer] for layer in layers])
    finally:
        for h in handles:
            h.remove()
    real = data.mask.bool()
    return [(inputs[layer][real], g[real]) for layer, g in zip(layers, grads)]


@contextmanager
def lowrank_added(lm: LoadedModel, layers: Sequence[int], factors: Sequence[tuple[torch.Tensor, torch.Tensor]]
                  ) -> Iterator[None]:
    """Forwards inside run with W + left @ right.T at each layer, as x @ right @ left.T (differentiable)."""
    handles = [lm.adapter.out_proj(layer).register_forward_hook(
        lambda mod, args, out, f=f: out + (args[0] @ f[1]) @ f[0].T) for layer, f in zip(layers, factors)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
        raise ValueError(f"MEND training data '{spec}' has {len(records)} records: at least 2 are needed")
    return records


def model_key(lm: LoadedModel) -> str:
    name = lm.name
    return str(Path(name).resolve()) if os.path.isdir(name) else name


def hypernet_dir(lm: LoadedModel, layers: Sequence[int], data: str) -> Path:
    """Cache directory of the hypernetwork for (model, layers, training data)."""
    key = json.dumps([model_key(lm), list(layers), data])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_key(lm)).name)
    return cache_root() / "mend" / f"{safe}-L{'_'.join(map(str, layers))}-{digest}"


def _locality_pairs(records: Sequence[Edit], index: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    edit = records[index]
    if edit.neighborhood:
        n = edit.neighborhood[int(rng.integers(len(edit.neighborhood)))]
        return [(n.prompt, n.answer)]
    other = records[int(rng.integers(len(records)))]  # no neighbors: another record's fact stands in
    return [(other.rendered_prompt, other.target_true or other.target_new)]


def _edit_pairs(edit: Edit) -> list[tuple[str, str]]:
    return [(text, edit.target_new) for text in (edit.rendered_prompt, *edit.paraphrases)]


def training_step(lm: LoadedModel, net: Hypernetwork, batch: Sequence[Edit], loc_pairs: Sequence[tuple[str, str]],
                  config: TrainConfig) -> dict[str, float]:
    """MEND's loss for one batch of edits; returns its parts (call backward through the returned total)."""
    scorer = Scorer(lm.model, lm.tokenizer)
    grads = edit_gradient_factors(lm, net.layers, [(e.rendered_prompt, e.target_new) for e in batch])
    for i, (u, delta) in enumerate(grads):
        net.transforms[i].norm_u.update(u)
        net.transforms[i].norm_delta.update(delta)
    factors = [net.factors(i, u, delta) for i, (u, delta) in enumerate(grads)]
    edit_pairs = [p for e in batch for p in _edit_pairs(e)]
    loc = _ids_mask(scorer, loc_pairs)
    with torch.no_grad():
        base_logp = scorer.answer_logits(loc).log_softmax(-1)
    with lowrank_added(lm, net.layers, factors):
        edit_loss = _mean_nll(scorer, _ids_mask(scorer, edit_pairs), len(edit_pairs))
        new_logp = scorer.answer_logits(loc).log_softmax(-1)
    loc_loss = torch.nn.functional.kl_div(new_logp, base_logp, log_target=True, reduction="batchmean")
    total = config.c_edit * edit_loss + config.c_loc * loc_loss
    return {"total": total, "edit": edit_loss.item(), "loc": loc_loss.item()}


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    publish(tmp, path)


def train_hypernetwork(lm: LoadedModel, layers: Sequence[int], data: str, config: TrainConfig, *,
                       directory: Path | None = None, limit: int | None = None, progress: bool = True,
                       stop_after: int | None = None) -> Path:
    """Train (or resume training) the hypernetwork for ``lm``'s ``layers`` on ``data``; returns its file.

    A checkpoint is written every ``config.checkpoint_every`` steps, so a killed run resumes
    where it stopped; batches are drawn from (seed, step), so resuming gives the same result."""
    from tqdm import tqdm

    records = load_training_records(data, limit)
    keys = sorted(set().union(*(record_keys(e) for e in records)))
    content = hashlib.sha256(json.dumps([e.to_dict() for e in records], sort_keys=True, default=str)
                             .encode()).hexdigest()[:16]
    directory = Path(directory) if directory else hypernet_dir(lm, layers, data)
    directory.mkdir(parents=True, exist_ok=True)
    final, ckpt = directory / "hypernet.safetensors", directory / "checkpoint.pt"
    weight = lm.adapter.out_proj_weight_view(layers[0])
    net = Hypernetwork(layers, weight.shape[1], weight.shape[0], config.rank, config.edit_lr, config.seed).to(lm.device)
    groups = [{"params": [p for n, p in net.named_parameters() if n != "log_lr"], "lr": config.lr},
              {"params": [net.log_lr], "lr": config.lr_lr}]
    optimizer = torch.optim.Adam(groups)
    identity = {"model": model_key(lm), "layers": list(layers), "data": data, "limit": limit, "content": content,
                "config": {k: v for k, v in asdict(config).items() if k not in ("steps", "checkpoint_every")}}
    done, seconds = 0, 0.0
    if ckpt.is_file():
        saved = torch.load(ckpt, weights_only=True)
        if json.loads(saved["identity"]) != identity:
            raise ValueError(f"{ckpt}: checkpoint of a different training set-up; delete {directory} to start over")
        net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        done, seconds = int(saved["step"]), float(saved["seconds"])

    def save_checkpoint(step: int) -> None:
        _atomic_torch_save({"identity": json.dumps(identity), "net": net.state_dict(), "step": step,
                            "optimizer": optimizer.state_dict(), "seconds": seconds}, ckpt)

    todo = range(done + 1, config.steps + 1)
    if stop_after is not None:
        todo = todo[:stop_after]
    bar = tqdm(todo, desc="train-mend", unit="step", initial=done, total=config.steps, disable=not progress)
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
        bar.set_postfix(edit=f"{losses['edit']:.2f}", loc=f"{losses['loc']:.3f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint(step)
    bar.close()
    done = max([done, *todo]) if len(todo) else done
    if done >= config.steps:
        meta = {"identity": identity, "steps": config.steps, "seconds": round(seconds, 2),
                "train_ids": [e.id for e in records], "train_keys": keys}
        tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        atomic_save_tensors(tensors, final, {"lifelong_mend": json.dumps(meta)})
    return final


# ------------------------------------------------------------------------------------- the editor


@dataclass
class MENDParams:
    layers: str = ""  # e.g. "27-29"; empty: the last three layers
    train_data: str = DEFAULT_TRAIN_DATA  # which trained hypernetwork to use (its training source)
    hypernet: str = ""  # an explicit hypernetwork file instead of the cached one


class OverlapError(ValueError):
    """The evaluation stream shares records with the hypernetwork's training data."""


def load_hypernetwork(path: Path, device: torch.device) -> tuple[Hypernetwork, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lifelong_mend", "{}"))
    if not meta:
        raise ValueError(f"{path}: not a MEND hypernetwork file")
    tensors = load_file(str(path))
    d_in, d_out = tensors["transforms.0.norm_u.mean"].numel(), tensors["transforms.0.norm_delta.mean"].numel()
    rank = tensors["transforms.0.v1"].shape[0]
    net = Hypernetwork(meta["identity"]["layers"], d_in, d_out, rank, 1.0)
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

    def layers(self, lm: LoadedModel) -> list[int]:
        return resolve_layers(self.params.layers, lm.num_layers, self.name)

    def hypernet_path(self, lm: LoadedModel) -> Path:
        if self.params.hypernet:
            return Path(self.params.hypernet)
        return hypernet_dir(lm, self.layers(lm), self.params.train_data) / "hypernet.safetensors"

    def bind(self, lm: LoadedModel) -> "MENDEditor":
        layers = self.layers(lm)
        if self._net is not None:
            return self
        path = self.hypernet_path(lm)
        if not path.is_file():
            spec = ",".join(map(str, layers))
            raise FileNotFoundError(
                f"no trained MEND hypernetwork for model '{lm.name}', layers {spec}, data '{self.params.train_data}' "
                f"(looked in {path}): run `lifelong train-mend --model {lm.name} --layers {spec} "
                f"--data {self.params.train_data}` first")
        net, meta = load_hypernetwork(path, lm.device)
        other_model = not self.params.hypernet and meta["identity"]["model"] != model_key(lm)
        if meta["identity"]["layers"] != layers or other_model:
            raise ValueError(f"{path}: hypernetwork trained for model {meta['identity']['model']} layers "
                             f"{meta['identity']['layers']}, not {model_key(lm)} layers {layers}")
        self._net, self._meta = net, meta
        return self

    def hyperparameters(self) -> dict:
        out = asdict(self.params)
        if self._meta:  # what the run used: the hypernetwork's training set-up
            out["hypernet_identity"] = self._meta["identity"]
            out["hypernet_steps"] = self._meta["steps"]
        return out

    def check_stream(self, stream: EditStream) -> None:
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
                f"e.g. {e.id} {e.rendered_prompt!r}; evaluate on other records or train-mend on other data")

    def scope(self, lm: LoadedModel) -> list[str]:
        return [lm.adapter.out_proj_param_name(layer) for layer in self.layers(lm)]

    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        if not batch:
            return Delta.empty()
        self.bind(lm)
        net = self._net
        grads = edit_gradient_factors(lm, net.layers, [(e.rendered_prompt, e.target_new) for e in batch])
        changes = {}
        with torch.no_grad():
            for i, (layer, (u, delta)) in enumerate(zip(net.layers, grads)):
                left, right = net.factors(i, u, delta)
                param = lm.model.get_parameter(lm.adapter.out_proj_param_name(layer))
                changes[lm.adapter.out_proj_param_name(layer)] = lowrank_change(lm.adapter, left, right, param.dtype)
        delta = Delta(changes)
        delta.apply(lm.model)
        return delta
