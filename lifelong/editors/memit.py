"""MEMIT (Meng et al. 2023) and AlphaEdit (Fang et al. 2025): batched updates over a layer range.

For a batch of n edits, z_i = h_i + δ_i is the residual stream wanted at the output of the
last layer L of the range (δ_i fit as ROME's v* there: the MLP output of layer L adds
straight into that residual stream). Then, layer by layer upwards, with K (m × n) the
template-averaged keys on the current model and R = z − h (the remaining residual at L,
recomputed after each lower layer is updated) spread over the layers still to go:

    MEMIT:      Δ = Rₗ Kᵀ (λC + K Kᵀ)⁻¹                        solved in float64
    AlphaEdit:  Δ = Rₗ Kᵀ P (Kₚ Kₚᵀ P + K Kᵀ P + L2·I)⁻¹        P: projector on C's null space

P spans the eigenvectors of C = E[kkᵀ] whose eigenvalues (its singular values) fall below 2e-2,
as the original's absolute threshold (``nullspace_rule=relative``: below a fraction of the
largest), so Δ·k ≈ 0 for the keys of preserved knowledge; Kₚ holds the keys of earlier edits,
accumulated across steps as editor state. Deltas are stored as factors of rank ≤ n.

As in the original compute_z, δ's clamp (0.75 ×) and norm term are scaled by the residual stream
leaving layer L at the subject's last token, not by the MLP output as in ROME; keys are averaged
with the bare prompt weighing ½ and the prefixed templates ½ (compute_ks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from lifelong.core.delta import Delta
from lifelong.core.models import LoadedModel
from lifelong.editors.base import Editor, Snapshot, default_layer, each_edit, resolved
from lifelong.editors.base import parse_layers as parse_layer_spec
from lifelong.editors.covariance import MODEL_SAMPLE, corpus_files, key_second_moment, key_second_moments
from lifelong.editors.locate import (
    KEY_AVERAGES,
    FitLog,
    UpperStacks,
    ValueParams,
    average_key,
    lowrank_change,
    padded_batch,
    subject_token_index,
)
from lifelong.editors.stabilise import CHANGE_STABILISERS, Stabilised, StabiliseParams
from streams import Edit
from streams.errors import UserError


@dataclass
class MEMITParams(StabiliseParams, ValueParams):
    """MEMIT's settings where they differ from ROME's (hparams/MEMIT/*.json, memit_main.py):
    z* clamped to 0.75 × the norm of the residual stream leaving the layer, which also scales its
    norm term (compute_z), over 6 context templates (the bare prompt and 5 prefixed ones, as
    MEMIT's get_context_templates), keys averaged bare ½ / prefixed ½ (compute_ks)."""

    clamp_norm: float = 0.75  # ‖δ‖ ≤ 0.75 × ‖residual leaving the layer‖ (compute_z)
    v_scale: str = "layer_output"  # the residual stream leaving the layer scales clamp and norm term
    templates: int = 6  # the bare prompt and 5 prefixed ones
    key_average: str = "grouped"  # "grouped": MEMIT's compute_ks; "uniform": every template alike
    layers: str | None = None  # e.g. "4-8", "4,5,6" or "all"; None: five layers centred on num_layers // 5
    mom2_weight: float | None = None  # λ in λC + KKᵀ; None: 15000·m/16384 (see default_mom2_weight)
    cov_corpus: str = MODEL_SAMPLE  # text for C: "model-sample" (seeded text from the model) or a .txt file/dir
    cov_tokens: int = 20000  # tokens of that text C is estimated from

    def validate(self, editor: str) -> None:
        super().validate(editor)
        check_key_settings(self, editor)


NULLSPACE_RULES = {"absolute": 2e-2, "relative": 1e-2}  # rule -> its default threshold


@dataclass
class AlphaEditParams(MEMITParams):
    """AlphaEdit's own settings (hparams/AlphaEdit/Llama3-8B.json, AlphaEdit_main.py)."""

    # "absolute": directions of C whose singular values fall below nullspace_threshold (the original,
    # 2e-2); "relative": below nullspace_threshold × the largest (ours before, 1e-2).
    nullspace_rule: str = "absolute"
    nullspace_threshold: float | None = None  # None: the rule's default (NULLSPACE_RULES)
    l2: float = 10.0  # the L2 · I term inside AlphaEdit's solve

    def validate(self, editor: str) -> None:
        super().validate(editor)
        if self.nullspace_rule not in NULLSPACE_RULES:
            raise UserError(
                f"{editor}: nullspace_rule must be one of {', '.join(NULLSPACE_RULES)}, got '{self.nullspace_rule}'"
            )


def default_mom2_weight(key_width: int) -> float:
    """MEMIT's λ = 15000 was set for GPT-J, whose keys are 16384 wide. One key gets the share
    s/(1+s) of its residual, s ≈ kᵀ(λC)⁻¹k ≈ m/λ (E[kᵀC⁻¹k] = m); scaling λ with m keeps that
    share: on SmolLM2 (m = 1536) λ = 15000 left ES at 0.40 on 10 built-in facts."""
    return 15000.0 * key_width / 16384


def check_key_settings(params, editor: str) -> None:
    """The checks MEMIT's and EMMET's settings share: the covariance corpus exists (refused before the
    run begins) and the key average is one MEMIT knows."""
    if params.cov_corpus != MODEL_SAMPLE:
        corpus_files(params.cov_corpus)
    if params.key_average not in KEY_AVERAGES:
        raise UserError(f"{editor}: key_average must be one of {', '.join(KEY_AVERAGES)}, got '{params.key_average}'")


def default_layers(num_layers: int) -> list[int]:
    centre = default_layer(num_layers)
    return [layer for layer in range(centre - 2, centre + 3) if 0 <= layer < num_layers]


def parse_layers(spec: str | None, num_layers: int, editor: str = "memit") -> list[int]:
    """MEMIT/AlphaEdit's layers: :func:`lifelong.editors.base.parse_layers` with :func:`default_layers`."""
    return parse_layer_spec(spec, num_layers, editor, default_layers)


class MEMITEditor(Stabilised, Editor[MEMITParams]):
    name = "memit"
    description = "MEMIT: batched least-squares updates spread over a range of MLP output projections"
    Params = MEMITParams
    params: MEMITParams  # the Stabilised mixin's StabiliseParams, narrowed
    precision_parts: ClassVar[dict[str, str]] = {
        "covariance": "float64",  # key_second_moments, the originals' double
        "solve": "float64",
        "z_fit": "v_dtype",  # the layers above the top edited one while z* is fitted
    }

    def __init__(self, params=None):
        super().__init__(params)
        self._second_moments: dict[int, torch.Tensor] = {}
        self._stacks = UpperStacks()
        self._fits = FitLog()
        # layer -> Σ Kₚ Kₚᵀ over every past edit's keys (m × m, float64), for the solves that keep them
        # (keeps_past_keys): all the update needs of them; its size does not grow with the edits.
        self._past_cov: dict[int, torch.Tensor] = {}
        self._step_keys: dict[int, torch.Tensor] = {}  # layer -> (m × edits of the last step): what a step saves

    # A step saves only the keys it added (none without past keys): restoring step k sums steps 1..k.
    incremental_state = True

    def keeps_past_keys(self) -> bool:
        """Whether the solve keeps past edits' keys: ENCORE's add_prev_edits (encore/encore_main.py, the
        SEQ_CACHE term of the sequential case) on MEMIT."""
        return self.params.stabilise == "encore"

    def bind(self, lm: LoadedModel) -> MEMITEditor:
        layers = parse_layers(self.params.layers, lm.num_layers, self.name)
        weight = self.params.mom2_weight
        if weight is None:
            weight = default_mom2_weight(lm.adapter.out_proj_weight_view(layers[0]).shape[1])
        self.params = dataclasses.replace(self.params, layers=",".join(map(str, layers)), mom2_weight=weight)
        return self

    def layers(self, lm: LoadedModel) -> list[int]:
        return parse_layers(self.params.layers, lm.num_layers, self.name)

    @property
    def mom2_weight(self) -> float:
        """λ of λC + KKᵀ, as ``bind`` resolved it."""
        return resolved(self.params.mom2_weight, self.name, "mom2_weight")

    def scope(self, lm: LoadedModel) -> list[str]:
        return [lm.adapter.out_proj_param_name(layer) for layer in self.layers(lm)]

    def prepare(self, lm: LoadedModel) -> None:
        """Key statistics of every layer in the range, on the model as it is now (θ0)."""
        self.bind(lm)
        missing = [layer for layer in self.layers(lm) if layer not in self._second_moments]
        if missing:  # one pass over the corpus for every layer still missing
            stats = key_second_moments(lm, missing, self.params.cov_corpus, self.params.cov_tokens)
            self._second_moments.update({layer: c.to(lm.layer_device(layer)) for layer, c in stats.items()})
        self.prepare_stabiliser(lm)

    def nas_layers(self, lm: LoadedModel) -> list[int]:
        return self.layers(lm)[-1:]

    def second_moment(self, lm: LoadedModel, layer: int) -> torch.Tensor:
        if layer not in self._second_moments:
            self._second_moments[layer] = key_second_moment(
                lm, layer, self.params.cov_corpus, self.params.cov_tokens
            ).to(lm.layer_device(layer))
        return self._second_moments[layer]

    def solve(self, lm: LoadedModel, layer: int, keys: torch.Tensor, residual: torch.Tensor):
        """Factors (U, V), ΔW = U Vᵀ, for keys K (m × n) and residuals Rₗ (d × n), in float64."""
        c = self.second_moment(lm, layer)
        a = self.mom2_weight * c + keys @ keys.T
        if self.norm_weight():  # ENCORE: + α‖Δ‖²_F in the objective, + α·I here
            a = a + self.norm_weight() * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        past = self._past_cov.get(layer) if self.keeps_past_keys() else None
        if past is not None:  # ENCORE: past edits' keys preserved beside C's (cov += SEQ_CACHE)
            a = a + past.to(device=a.device, dtype=a.dtype)
        return residual, torch.linalg.solve(a, keys)  # Δ = Rₗ Kᵀ A⁻¹ = Rₗ (A⁻¹ K)ᵀ (A symmetric)

    def remember(self, layer: int, keys: torch.Tensor) -> None:
        """Keep this step's keys of ``layer`` for the later solves (AlphaEdit; MEMIT under ENCORE)."""
        if not self.keeps_past_keys():
            return
        keys = keys.detach().cpu()
        self._step_keys[layer] = keys
        self._add_keys(layer, keys)

    def _add_keys(self, layer: int, keys: torch.Tensor) -> None:
        keys = keys.double()
        past = self._past_cov.get(layer)
        self._past_cov[layer] = keys @ keys.T if past is None else past + keys @ keys.T

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"past_cov.{layer}": cov for layer, cov in self._past_cov.items()}

    def step_state(self) -> dict[str, torch.Tensor]:
        """Only the keys this step added: a run's saved state grows linearly with its edits, and
        restoring step k sums steps 1..k's keys into Σ Kₚ Kₚᵀ."""
        return {f"past_keys.{layer}": keys.contiguous() for layer, keys in self._step_keys.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """A whole state: Σ Kₚ Kₚᵀ per layer (``past_cov.L``), or the key lists that runs before the
        compact state saved (``past_keys.L``, summed here)."""
        unknown = [k for k in state if not k.startswith(("past_keys.", "past_cov."))]
        if unknown:
            raise ValueError(f"{self.name}: unexpected state entries {unknown}")
        self._past_cov, self._step_keys = {}, {}
        for name, value in state.items():
            kind, layer = name.split(".", 1)
            if kind == "past_cov":
                self._past_cov[int(layer)] = value.double()
            else:
                self._add_keys(int(layer), value)

    def load_step_states(self, states: list[dict[str, torch.Tensor]]) -> None:
        self._past_cov, self._step_keys = {}, {}
        for state in states:  # in step order, as the run added them
            for name, keys in state.items():
                if not name.startswith("past_keys."):
                    raise ValueError(f"{self.name}: unexpected step state entry {name}")
                self._add_keys(int(name.split(".", 1)[1]), keys)

    def _hidden_at(self, lm: LoadedModel, layer: int, edits: Sequence[Edit]) -> torch.Tensor:
        """Residual stream after ``layer`` at each bare prompt's subject token, (d × n) float64."""
        ids, mask = padded_batch(lm, [e.rendered_prompt for e in edits])
        with torch.no_grad():
            out = lm.adapter.body()(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        index = [subject_token_index(lm.tokenizer, e.rendered_prompt, e.subject) for e in edits]
        hidden = out.hidden_states[layer + 1]  # on the layer's device (its own GPU under --device auto)
        rows = torch.arange(len(edits), device=hidden.device)
        return hidden[rows, torch.tensor(index, device=hidden.device)].double().T

    def step_report(self) -> dict:
        return {**self._fits.summary(self.params), **self.stabiliser_report()}

    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        self._fits.clear()
        self._step_keys = {}
        if not batch:
            return Delta.empty()
        self.prepare(lm)
        p = self.params
        layers = self.layers(lm)
        last = layers[-1]
        templates = p.context_templates(self.name)
        # PRUNE/RECT: the layers are solved as MEMIT does, then the step is redone from these weights
        before = Snapshot(lm.model, self.scope(lm)) if p.stabilise in CHANGE_STABILISERS else None
        deltas = []
        for edit in each_edit(batch, "z* fits"):  # δ_i at the top layer of the range, on the unedited (this step) model
            fit = self._fits.add(self.stabilised_fit(lm, last, edit))
            deltas.append(fit.value - fit.original)
        targets = self._hidden_at(lm, last, batch) + torch.stack(deltas, 1)

        changes = {}
        for position, layer in enumerate(layers):
            keys = torch.stack([average_key(lm, layer, e, templates, p.key_average) for e in batch], 1)  # m × n
            residual = ((targets - self._hidden_at(lm, last, batch)) / (len(layers) - position)).to(keys.device)
            u, v = self.solve(lm, layer, keys, residual)
            name = lm.adapter.out_proj_param_name(layer)
            changes[name] = lowrank_change(lm.adapter, u, v, lm.model.get_parameter(name).dtype)
            Delta({name: changes[name]}).apply(lm.model)  # each parameter gets exactly this one add
            self.remember(layer, keys)
        if before is not None:
            return before.restore_and_apply(self.stabilise_changes(lm, before, changes))
        return Delta(changes)


class AlphaEditEditor(MEMITEditor):
    name = "alphaedit"
    description = (
        "AlphaEdit: MEMIT's update projected onto the null space of preserved keys "
        "(C's singular values below 2e-2), past edits' keys kept"
    )
    Params = AlphaEditParams
    params: AlphaEditParams
    precision_parts: ClassVar[dict[str, str]] = {
        **MEMITEditor.precision_parts,
        "null_space_projector": "float64",  # eigh of C in float64
        "past_keys": "float64",  # Σ Kₚ Kₚᵀ
    }

    def __init__(self, params=None):
        super().__init__(params)
        self._projectors: dict[int, torch.Tensor] = {}

    def keeps_past_keys(self) -> bool:
        return True  # AlphaEdit's Kₚ Kₚᵀ term (the original's cache_c)

    def bind(self, lm: LoadedModel) -> AlphaEditEditor:
        super().bind(lm)
        if self.params.nullspace_threshold is None:
            self.params = dataclasses.replace(
                self.params, nullspace_threshold=NULLSPACE_RULES[self.params.nullspace_rule]
            )
        return self

    def prepare(self, lm: LoadedModel) -> None:
        super().prepare(lm)
        for layer in self.layers(lm):
            self.projector(lm, layer)

    def null_directions(self, values: torch.Tensor) -> torch.Tensor:
        """Which of C's eigenvalues (= its singular values, C being symmetric PSD) span the null
        space: below the threshold ("absolute", as the original) or below threshold × the largest."""
        p = self.params
        threshold = NULLSPACE_RULES[p.nullspace_rule] if p.nullspace_threshold is None else p.nullspace_threshold
        limit = threshold * values.abs().max() if p.nullspace_rule == "relative" else threshold
        return values.abs() < limit

    def projector(self, lm: LoadedModel, layer: int) -> torch.Tensor:
        """P = Û Ûᵀ over the eigenvectors of C = E[kkᵀ] in its null space (see null_directions)."""
        if layer not in self._projectors:
            values, vectors = torch.linalg.eigh(self.second_moment(lm, layer))
            basis = vectors[:, self.null_directions(values)]
            if basis.shape[1] == 0:
                p = self.params
                scale = " × the largest" if p.nullspace_rule == "relative" else ""
                raise UserError(
                    f"alphaedit: C of layer {layer} has no eigenvalue below "
                    f"{p.nullspace_threshold}{scale}; raise nullspace_threshold"
                )
            self._projectors[layer] = basis @ basis.T
        return self._projectors[layer]

    def solve(self, lm: LoadedModel, layer: int, keys: torch.Tensor, residual: torch.Tensor):
        """AlphaEdit's ΔWᵀ = (P(K Kᵀ + Kₚ Kₚᵀ) + L2·I)⁻¹ P K Rᵀ, as factors (U, V) with ΔW = U Vᵀ."""
        proj = self.projector(lm, layer)
        past = self._past_cov.get(layer)
        ridge = self.params.l2 + self.norm_weight()  # ENCORE's α‖ΔP‖²_F joins AlphaEdit's own L2‖ΔP‖²_F
        a = keys @ keys.T @ proj + ridge * torch.eye(proj.shape[0], dtype=proj.dtype, device=proj.device)
        if past is not None:
            a = a + past.to(device=proj.device, dtype=proj.dtype) @ proj
        # Δ = Rₗ Kᵀ P A⁻¹ = Rₗ (A⁻ᵀ P K)ᵀ
        return residual, torch.linalg.solve(a.T, proj @ keys)
