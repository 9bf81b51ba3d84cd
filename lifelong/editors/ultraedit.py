"""UltraEdit (Gu et al., TMLR 2026): training-free, closed-form edits with a lifelong normaliser.

Faithful to the authors' code (XiaojieGu/UltraEdit @0beb222: ``editor/ultraedit.py``,
``editor/base.py``, ``nets.py``, ``util.py``, ``data/base.py``). One replay step is one of the
authors' *turns*: the whole batch the replay gives (``--batch-size 100`` is their turn of
``dataset.n_edits`` = 100), edited at once. Per step:

1. The edits are sorted by token length, longest first (``data/base.py:43-50``), and split into
   sub-batches of ``sub_batch`` = 10 (``dataset.batch_size``). Each sub-batch gets one forward and
   one backward of the token-mean cross-entropy over its supervised positions: the prompt's last
   token and every answer token but the last (teacher forcing, the prompt masked;
   ``data/zsre.py:24-51``, ``util.py:44-56``). Every such position is one row: K holds the inputs
   of each edited Linear there (keys, d_k wide) and G the gradients of the loss with respect to its
   outputs (d_v wide), both in float32 (``util.py:140-166``, ``ultraedit.py:101-125``).
2. After each sub-batch, for each edited module in order, the normaliser of the module's weight
   shape (shared by every module of that shape, ``ultraedit.py:53-58,120``) takes in [K ‖ G] by
   Chan's merge with the original's ``m · unbiased-variance`` term (``nets.py:16-24``)::

       n' = n + m;  δ = x̄ − μ;  μ += m δ / n';  s += m var₁(x) + n m δ² / n';  σ = √(s / (n' − 1 + ε))

3. With [K̂ ‖ Ĝ] = ([K ‖ G] − μ) / (σ + ε), the values are V = −lr · ‖k̂ᵢ‖² · ĝᵢ (lr = 1e-6) and each
   module's shift solves the ridge problem on the raw keys (``ultraedit.py:78-94``)::

       P = solve(KᵀK + λI, KᵀV)  (d_k × d_k, λ = 1),   ΔW = Pᵀ   (the Linear's output gains x·P)

All shifts of a step are computed on the same weights, then applied together through the returned
Delta (``base.py:59-71,163-169``): as low-rank factors (ΔW = (A V)ᵀ with A = solve(KᵀK + λI, Kᵀ))
when the step's N rows are fewer than half the smaller side of the weight, else dense.
``solve=kernel`` is our cheaper variant: A = Kᵀ(KKᵀ + λI)⁻¹, an N × N solve (push-through
identity), equal to the original up to float error.

The edited modules default to the authors' config for the model's family (the Llama-3-8B list for
Llama: gate_proj of layers 11-15 and up_proj of layers 18-24), used as they are when the model has
every one of those layers (SmolLM2-135M has 30), else mapped to its depth (see
:func:`default_modules`). Deviations from the original are listed in docs/EDITORS.md, "UltraEdit".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lifelong.core.delta import Delta, ParamChange
from lifelong.core.model_access import Codec
from lifelong.core.models import LoadedModel
from lifelong.editors.base import Editor, parse_layers
from lifelong.editors.hooks import Hooks
from lifelong.editors.locate import lowrank_change
from streams import Edit
from streams.errors import UserError

EPS = float(torch.finfo(torch.float32).eps)  # nets.py:23,30: finfo(float32).eps = 1.19e-7
SOLVES = ("original", "kernel")

# The authors' edit_modules per family: (layers of their model, [(MLP role, layers)] in config order).
# Roles are the adapter's: "gate" = gate_proj, "up" = up_proj / fc_in / c_fc, "down" = down_proj / fc_out / c_proj.
AUTHORS_MODULES: dict[str, tuple[int, tuple[tuple[str, tuple[int, ...]], ...]]] = {
    # Llama-3-8B-Instruct, config/model/llama-3-instruct.yaml:7-18 (zsre, wikibigedit, ultraeditbench)
    "llama": (32, (("gate", tuple(range(11, 16))), ("up", tuple(range(18, 25))))),
    # Qwen2.5-7B-Instruct, config/model/qwen2.5-7b.yaml:8-25
    "qwen2": (28, (("gate", tuple(range(18, 27))), ("up", tuple(range(18, 27))))),
    # Mistral-7B-v0.3, config/model/mistral-7b.yaml:7-8
    "mistral": (32, (("down", (29, 30)),)),
    # GPT-J-6B, config/model/gpt-j.yaml:7-15 (the authors' one non-gated family; also used for GPT-2 and NeoX)
    "gptj": (28, (("down", tuple(range(18, 27))),)),
    "gpt2": (28, (("down", tuple(range(18, 27))),)),
    "gpt_neox": (28, (("down", tuple(range(18, 27))),)),
}


@dataclass
class UltraEditParams:
    """UltraEdit's settings (config/editor/ultraedit.yaml, config/dataset/*.yaml, editor/ultraedit.py)."""

    # e.g. "down_proj:28,29" or "gate_proj:11-15;up_proj:18-24" (role: gate/up/down, with or without
    # "_proj"); None: the authors' modules for the model's family (see default_modules)
    modules: str | None = None
    lr: float = 1e-6  # scale of the values V = -lr·‖k̂‖²·ĝ (ultraedit.yaml:2)
    ridge: float = 1.0  # λ in solve(KᵀK + λI, KᵀV) (hard-coded 1 at ultraedit.py:92)
    sub_batch: int = 10  # edits per forward/backward and per normaliser update (dataset.batch_size)
    eps: float = EPS  # the normaliser's ε (nets.py:23,30: finfo(float32).eps)
    solve: str = "original"  # original: the d_k × d_k solve; kernel: the N × N push-through form (ours)

    def validate(self, editor: str) -> None:
        if self.solve not in SOLVES:
            raise UserError(f"{editor}: solve must be one of {', '.join(SOLVES)}, got '{self.solve}'")
        if not self.ridge > 0:  # KᵀK is singular when there are fewer rows than key features
            raise UserError(f"{editor}: ridge must be greater than 0, got {self.ridge}")
        if not self.eps > 0:
            raise UserError(f"{editor}: eps must be greater than 0, got {self.eps}")
        if self.sub_batch < 1:
            raise UserError(f"{editor}: sub_batch must be at least 1, got {self.sub_batch}")
        if self.modules is not None and self.modules.strip():
            _parse_groups(self.modules, editor)  # the syntax; layer ranges are checked by bind


ROLES = {"gate": "gate", "gate_proj": "gate", "up": "up", "up_proj": "up", "down": "down", "down_proj": "down"}
MODULES_HELP = "expected e.g. 'down_proj:28,29' or 'gate_proj:11-15;up_proj:18-24'"


def _parse_groups(spec: str, editor: str) -> list[tuple[str, str]]:
    """'gate_proj:11-15;up_proj:18-24' -> [("gate", "11-15"), ("up", "18-24")], in the order given."""
    groups = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        role, sep, layers = part.partition(":")
        if not sep or role.strip() not in ROLES or not layers.strip():
            raise UserError(f"{editor}: cannot read modules '{spec}': {MODULES_HELP}")
        groups.append((ROLES[role.strip()], layers.strip()))
    if not groups:
        raise UserError(f"{editor}: cannot read modules '{spec}': {MODULES_HELP}")
    return groups


def default_modules(family: str, num_layers: int) -> list[tuple[str, list[int]]]:
    """The authors' modules for ``family`` (:data:`AUTHORS_MODULES`): their layer indices as they are
    when the model has all of them, else each index l mapped to ⌊l · num_layers / reference⌋ (the
    same relative depth; duplicates merged), e.g. a 4-layer Llama: gate_proj 1, up_proj 2-3."""
    reference, groups = AUTHORS_MODULES.get(family, AUTHORS_MODULES["llama"])
    fits = max(layer for _, layers in groups for layer in layers) < num_layers
    out = []
    for role, layers in groups:
        mapped = layers if fits else tuple(layer * num_layers // reference for layer in layers)
        out.append((role, sorted(set(mapped))))
    return out


def _spell(groups: list[tuple[str, list[int]]]) -> str:
    return ";".join(f"{role}_proj:{','.join(map(str, layers))}" for role, layers in groups)


class Normaliser:
    """The lifelong normaliser of one weight shape (``nets.py:5-30``, RunningMeanStd): running
    per-feature mean and spread of [key ‖ value-gradient] rows over every step so far, in float32."""

    FIELDS = ("n", "mean", "var", "std")

    def __init__(self, size: int, device: torch.device | str = "cpu"):
        self.n = torch.zeros(1, device=device)
        self.mean = torch.zeros(size, device=device)
        self.var = torch.zeros(size, device=device)  # Σ m·var₁ + M2-like term, as the original's "var"
        self.std = torch.zeros(size, device=device)

    def update(self, x: torch.Tensor, eps: float) -> None:
        """Chan's merge of the rows ``x`` (m × size), with the original's m·var₁(x) (nets.py:16-24)."""
        m = x.shape[0]
        n = self.n + m
        delta = x.mean(0) - self.mean
        self.mean += m * delta / n
        # var₁ of one row is undefined (the original gives NaN, nets.py:22); our steps can end in a
        # one-row sub-batch, which then adds no spread of its own
        spread = x.var(0) if m > 1 else torch.zeros_like(self.var)
        self.var += m * spread + self.n * m * delta.pow(2) / n
        self.std = (self.var / (n - 1 + eps)).sqrt()
        self.n = n

    def __call__(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        return (x - self.mean) / (self.std + eps)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f).detach().cpu().clone() for f in self.FIELDS}

    @classmethod
    def from_tensors(cls, values: dict[str, torch.Tensor], device: torch.device | str) -> Normaliser:
        out = cls(values["mean"].numel(), device)
        for f in cls.FIELDS:
            setattr(out, f, values[f].to(device=device, dtype=torch.float32).clone())
        return out


def shape_key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


class UltraEditEditor(Editor[UltraEditParams]):
    name = "ultraedit"
    description = (
        "UltraEdit: closed-form ridge shifts of MLP projections from answer-token keys and value gradients, "
        "lifelong normaliser (training-free)"
    )
    Params = UltraEditParams
    precision_parts: ClassVar[dict[str, str]] = {
        "normaliser": "float32",  # running mean/var of [K ‖ G] (util.py:140-166)
        "keys_and_gradients": "float32",
        "ridge_solve": "float32",
    }

    def __init__(self, params=None):
        super().__init__(params)
        self._norms: dict[str, Normaliser] = {}  # "d_kxd_v" -> the normaliser of every module of that shape
        self._report: dict = {}

    # -- modules

    def bind(self, lm: LoadedModel) -> UltraEditEditor:
        self.params = dataclasses.replace(self.params, modules=_spell(self._groups(lm)))
        return self

    def _groups(self, lm: LoadedModel) -> list[tuple[str, list[int]]]:
        spec = self.params.modules
        if spec is None or not spec.strip():
            return default_modules(lm.adapter.family, lm.num_layers)
        roles = lm.adapter.mlp_kinds()
        groups = []
        for role, layers in _parse_groups(spec, self.name):
            if role not in roles:
                raise UserError(
                    f"{self.name}: modules '{spec}': a {lm.adapter.family} MLP has no {role}_proj "
                    f"(it has {', '.join(r + '_proj' for r in roles)})"
                )
            try:
                groups.append((role, parse_layers(layers, lm.num_layers, self.name)))
            except UserError as err:
                raise UserError(f"{self.name}: modules '{spec}': {str(err).removeprefix(self.name + ': ')}") from None
        pairs = [(role, layer) for role, layers in groups for layer in layers]
        if len(set(pairs)) != len(pairs):
            raise UserError(f"{self.name}: modules '{spec}' names a module twice")
        return groups

    def modules(self, lm: LoadedModel) -> list[str]:
        """The edited modules' paths, in the order the normaliser takes them in (the config's order)."""
        return [lm.adapter.mlp_proj_name(layer, role) for role, layers in self._groups(lm) for layer in layers]

    def scope(self, lm: LoadedModel) -> list[str]:
        return [name + ".weight" for name in self.modules(lm)]

    def shape(self, lm: LoadedModel, module: str) -> tuple[int, int]:
        """(d_k, d_v): the Linear's (in, out) features, as the original's get_shape (util.py:38-41)."""
        weight = lm.model.get_parameter(module + ".weight")
        d_out, d_in = weight.shape[::-1] if lm.adapter.spec.transposed else weight.shape
        return int(d_in), int(d_out)

    # -- keys and value gradients

    def sub_batches(self, lm: LoadedModel, batch: Sequence[Edit]) -> list[list[tuple]]:
        """The encoded (prompt ids, answer ids) of ``batch``, longest first (a stable sort, as
        collate_fn), in sub-batches of ``sub_batch`` edits."""
        codec = Codec(lm.tokenizer)
        encoded = [codec.encode(e.rendered_prompt, e.target_new) for e in batch]
        encoded.sort(key=lambda pa: len(pa[0]) + len(pa[1]), reverse=True)
        size = self.params.sub_batch
        return [encoded[i : i + size] for i in range(0, len(encoded), size)]

    def collect(
        self, lm: LoadedModel, encoded: Sequence[tuple]
    ) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """One forward and backward over a sub-batch on the live weights: the token-mean CE at the
        supervised positions and, per edited module, (K, G) at those positions in float32."""
        codec = Codec(lm.tokenizer)
        data = codec.collate(encoded, lm.device)  # (rows, cols): the last prompt token, answer tokens but the last
        rows, cols = data.rows, data.cols
        keys: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}

        def grab(name: str):
            def keep_grad(grad: torch.Tensor) -> None:
                grads[name] = grad[rows, cols].float()

            def hook(module, args, out):
                keys[name] = args[0].detach()[rows, cols].float()
                if not out.requires_grad:  # no edited module below: the backward can start here
                    out = out.detach().requires_grad_(True)
                out.register_hook(keep_grad)
                return out

            return hook

        names = self.modules(lm)
        with torch.enable_grad(), Hooks() as hooks:
            for name in names:
                hooks.on_output(lm.model.get_submodule(name), grab(name))
            # Logits at the supervised positions only: the loss and every gradient are those of the full logits.
            hidden = lm.adapter.body()(input_ids=data.ids, attention_mask=data.mask, use_cache=False).last_hidden_state
            logits = lm.adapter.unembedding()(hidden[rows, cols]).float()
            loss = F.cross_entropy(logits, data.targets)
            loss.backward()
        return loss.item(), {name: (keys[name], grads[name]) for name in names}

    # -- the solve

    def normaliser(self, shape: tuple[int, int]) -> Normaliser | None:
        """The normaliser of weights of ``shape`` ((d_k, d_v)), None before any step edited one."""
        return self._norms.get(shape_key(shape))

    def _normaliser(self, shape: tuple[int, int], device: torch.device) -> Normaliser:
        """The normaliser of weights of ``shape`` on ``device`` (made empty for a shape not seen yet)."""
        key = shape_key(shape)
        norm = self._norms.get(key)
        if norm is None:
            norm = self._norms[key] = Normaliser(sum(shape), device)
        elif norm.mean.device != device:  # loaded from a state on the CPU
            norm = self._norms[key] = Normaliser.from_tensors(norm.tensors(), device)
        return norm

    def values(self, keys: torch.Tensor, grads: torch.Tensor, norm: Normaliser) -> torch.Tensor:
        """V = −lr·‖k̂ᵢ‖²·ĝᵢ from the normalised [K ‖ G] (ultraedit.py:84-90)."""
        z = norm(torch.cat([keys, grads], -1), self.params.eps)
        k_hat, g_hat = z.split([keys.shape[1], grads.shape[1]], -1)
        return -self.params.lr * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat

    def shift(self, lm: LoadedModel, keys: torch.Tensor, v: torch.Tensor) -> ParamChange:
        """ΔW = Pᵀ, P = (KᵀK + λI)⁻¹KᵀV (float32), in the parameter's storage orientation."""
        p = self.params
        n, d_k = keys.shape
        d_v = v.shape[1]
        eye = lambda size: torch.eye(size, dtype=keys.dtype, device=keys.device)  # noqa: E731
        low_rank = n < min(d_k, d_v) / 2
        if p.solve == "kernel":  # A = Kᵀ(KKᵀ + λI)⁻¹ (d_k × N), the gram matrix symmetric
            a = torch.linalg.solve(keys @ keys.T + p.ridge * eye(n), keys).T
        elif low_rank:  # A = (KᵀK + λI)⁻¹Kᵀ: the original's d_k × d_k system, N right-hand sides
            a = torch.linalg.solve(keys.T @ keys + p.ridge * eye(d_k), keys.T)
        else:  # the original's very expression (ultraedit.py:92-94)
            shift = torch.linalg.solve(keys.T @ keys + p.ridge * eye(d_k), keys.T @ v)
            return ParamChange(dense=lm.adapter.as_stored(shift.T).contiguous())
        if low_rank:  # ΔW (out, in) = Vᵀ Aᵀ: factors kept in float32, the solve's precision
            return lowrank_change(lm.adapter, v.T, a, torch.float32)
        return ParamChange(dense=lm.adapter.as_stored((a @ v).T).contiguous())

    # -- the step

    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        self._report = {}
        if not batch:
            return Delta.empty()
        names = self.modules(lm)
        shapes = {name: self.shape(lm, name) for name in names}
        rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in names}
        losses = []
        for encoded in self.sub_batches(lm, batch):  # every sub-batch on the same (this step's) weights
            loss, captured = self.collect(lm, encoded)
            losses.append(loss)
            for name in names:  # sub-batch major, then module: the original's update order (ultraedit.py:103-120)
                keys, grads = captured[name]
                self._normaliser(shapes[name], keys.device).update(torch.cat([keys, grads], -1), self.params.eps)
                rows[name].append((keys, grads))
        changes = {}
        with torch.no_grad():  # every shift from the statistics that include this step (ultraedit.py:60-97)
            for name in names:
                keys = torch.cat([k for k, _ in rows[name]])
                grads = torch.cat([g for _, g in rows[name]])
                v = self.values(keys, grads, self._normaliser(shapes[name], keys.device))
                changes[name + ".weight"] = self.shift(lm, keys, v)
        delta = Delta(changes)
        delta.apply(lm.model)  # all modules together, after the whole step is cached (base.py:163-169)
        n_rows = sum(k.shape[0] for k, _ in rows[names[0]])
        self._report = {"rows": n_rows, "loss_before": sum(losses) / len(losses), "modules": len(names)}
        return delta

    def step_report(self) -> dict:
        """Supervised rows N of the step, its sub-batches' mean CE before the edit, modules edited."""
        return dict(self._report)

    # -- state: one normaliser per weight shape, fixed size

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"norm.{key}.{f}": t for key, norm in self._norms.items() for f, t in norm.tensors().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        found: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in state.items():
            kind, _, rest = name.partition(".")
            key, _, field = rest.rpartition(".")
            if kind != "norm" or field not in Normaliser.FIELDS or not key:
                raise ValueError(f"{self.name}: unexpected state entry '{name}'")
            found.setdefault(key, {})[field] = value
        incomplete = sorted(k for k, v in found.items() if set(v) != set(Normaliser.FIELDS))
        if incomplete:
            raise ValueError(f"{self.name}: normaliser state of shape {incomplete[0]} is incomplete")
        self._norms = {key: Normaliser.from_tensors(values, "cpu") for key, values in found.items()}
