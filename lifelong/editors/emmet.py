"""EMMET (Gupta et al. 2024, "A Unified Framework for Model Editing"): batched ROME with equality constraints.

Each edit of a batch is a constraint W' k̄ᵢ = W k̄ᵢ + rᵢ; minimising the change's effect on the
preserved keys (C = E[kkᵀ]) under those n constraints gives, with K (m × n) the template-averaged
keys and R (d × n) the residuals z − h:

    Δ = R D⁻¹ Kᵀ C⁻¹,    D = Kᵀ C⁻¹ K (+ λ·I when n > 1),    solved in float64,

so that Δ K = R (KᵀC⁻¹K + λI)⁻¹ KᵀC⁻¹K: exactly R (every key of the batch written) when λ = 0; the
authors add λ = 0.1 for batches (emmet_main.py:237-238, "to counter ill-conditioned D"). For one edit D
is not regularised and Δ = r (C⁻¹k̄)ᵀ / (k̄ᵀ C⁻¹ k̄): r-ROME's update with the averaged key.

The authors' code (scalable-model-editing/unified-model-editing, emmet/) is MEMIT's machinery with
this solve: z* fit at the layer's output as MEMIT's compute_z (emmet/compute_z.py, the residual
stream leaving the layer scaling the clamp and the norm term), keys averaged bare ½ / prefixed ½
(emmet/compute_ks.py:39-50), the residual R = z − h at the bare prompts (emmet_main.py:183-193),
so this editor runs :class:`~lifelong.editors.memit.MEMITEditor`'s step with its own solve.
Defaults from ``hparams/EMMET/llama2-7b.json`` (the default model is of the Llama family): one
layer, 5 of Llama-2-7B's 32 (scaled to depth here: round(5/32 × layers), layer 5 of SmolLM2's 30),
clamp_norm_factor 4, v_num_grad_steps 25, v_lr 0.5, v_weight_decay 1e-3, kl_factor 0.0625,
mom2_update_weight 1, update_norm_lambda 0, emmet_lambda 0.1. docs/EDITORS.md lists the deviations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lifelong.core.delta import Delta
from lifelong.core.models import LoadedModel
from lifelong.editors.base import parse_layers as parse_layer_spec
from lifelong.editors.covariance import MODEL_SAMPLE
from lifelong.editors.locate import ValueParams
from lifelong.editors.memit import MEMITEditor, check_key_settings
from lifelong.editors.stabilise import StabiliseParams
from streams import Edit
from streams.errors import UserError

SOURCE = "scalable-model-editing/unified-model-editing hparams/EMMET/llama2-7b.json"
SOURCE_LAYER, SOURCE_DEPTH = 5, 32  # llama2-7b.json:2-4: layer 5 of Llama-2-7B's 32


@dataclass
class EMMETParams(StabiliseParams, ValueParams):
    """EMMET's settings (hparams/EMMET/llama2-7b.json; emmet_main.py for how each is used), and the
    stabiliser any locate-and-edit editor takes (``--set stabilise=nas``; lifelong.editors.stabilise)."""

    v_steps: int = 25  # v_num_grad_steps (llama2-7b.json:8)
    v_weight_decay: float = 1e-3  # llama2-7b.json:11
    clamp_norm: float = 4.0  # clamp_norm_factor (llama2-7b.json:5), × the residual stream leaving the layer
    v_scale: str = "layer_output"  # compute_z.py:163, 183: target_init, the layer's output
    templates: int = 6  # the bare prompt and 5 prefixed ones (get_context_templates, emmet_main.py:400-419)
    key_average: str = "grouped"  # compute_ks.py:39-50: bare prompt ½, prefixed ½
    layers: str | None = None  # None: round(5/32 × num_layers), one layer (llama2-7b.json:2-4)
    emmet_lambda: float = 0.1  # λ added to D = KᵀC⁻¹K when the batch holds > 1 edit (emmet_main.py:237-238)
    mom2_update_weight: float = 1.0  # C ×= this (emmet_main.py:220-221; llama2-7b.json:14)
    update_norm_lambda: float = 0.0  # C += this · I (emmet_main.py:223-224; llama2-7b.json:25)
    cov_corpus: str = MODEL_SAMPLE  # text for C: "model-sample" (seeded text from the model) or a .txt file/dir
    cov_tokens: int = 20000  # tokens of that text C is estimated from (the authors: 100,000 Wikipedia samples)

    def validate(self, editor: str) -> None:
        super().validate(editor)
        check_key_settings(self, editor)


def default_layers(num_layers: int) -> list[int]:
    """The authors' one layer, 5 of Llama-2-7B's 32, at the same relative depth: 5 of SmolLM2's 30."""
    return [min(num_layers - 1, round(SOURCE_LAYER * num_layers / SOURCE_DEPTH))]


class EMMETEditor(MEMITEditor):
    name = "emmet"
    description = (
        "EMMET: batched ROME with equality constraints, Δ = R (KᵀC⁻¹K + 0.1·I)⁻¹ KᵀC⁻¹ on one MLP output "
        "projection (every key of the batch written; exactly with emmet_lambda=0)"
    )
    Params = EMMETParams  # type: ignore[assignment]  # MEMIT's step, not its λ or layer range: its own settings
    params: EMMETParams  # type: ignore[assignment]

    def __init__(self, params=None):
        super().__init__(params)
        self._pseudo_inverse: list[int] = []  # layers whose D fell back to the pseudo-inverse in the last step

    def bind(self, lm: LoadedModel) -> EMMETEditor:
        layers = self.layers(lm)
        self.params = dataclasses.replace(self.params, layers=",".join(map(str, layers)))
        return self

    def layers(self, lm: LoadedModel) -> list[int]:
        return parse_layer_spec(self.params.layers, lm.num_layers, self.name, default_layers)

    def preserved_moment(self, lm: LoadedModel, layer: int) -> torch.Tensor:
        """The C of the solve, float64: E[kkᵀ] × mom2_update_weight + (update_norm_lambda + α) · I, α
        ENCORE's norm weight under ``stabilise=encore`` (else 0)."""
        p = self.params
        c = self.second_moment(lm, layer).double()
        if p.mom2_update_weight != 1:
            c = c * p.mom2_update_weight
        ridge = p.update_norm_lambda + self.norm_weight()  # ENCORE's α‖Δ‖²_F: the same term as update_norm_lambda
        if ridge != 0:
            c = c + ridge * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
        return c

    def keeps_past_keys(self) -> bool:
        return False  # EMMET's solve has no past-keys term; ENCORE's is MEMIT's (MEMITEditor.keeps_past_keys)

    def solve(self, lm: LoadedModel, layer: int, keys: torch.Tensor, residual: torch.Tensor):
        """Factors (U, V) with ΔW = U Vᵀ = R D⁻¹ Kᵀ C⁻¹: U = R (d × n), V = C⁻¹ K D⁻¹ (m × n), float64."""
        keys, residual = keys.double(), residual.double()
        try:
            c_inv_k = torch.linalg.solve(self.preserved_moment(lm, layer), keys)  # C⁻¹ K (emmet_main.py:234-235)
        except torch.linalg.LinAlgError:  # the authors' torch.inverse(cov) raises here too
            raise UserError(
                f"emmet: the key statistics C of layer {layer} are singular; "
                "raise cov_tokens or set update_norm_lambda > 0"
            ) from None
        d = keys.T @ c_inv_k
        if d.shape[0] > 1:  # emmet_main.py:237-238: only for batches, "to counter ill-conditioned D"
            d = d + self.params.emmet_lambda * torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
        try:
            d_inv = torch.linalg.inv(d)
        except torch.linalg.LinAlgError:  # emmet_main.py:240-244: the pseudo-inverse when D is singular
            self._pseudo_inverse.append(layer)
            d_inv = torch.linalg.pinv(d)
        # adj_k = (D⁻¹ Kᵀ C⁻¹)ᵀ = C⁻¹ K D⁻ᵀ, Δ = R adj_kᵀ (emmet_main.py:250, 256)
        return residual, c_inv_k @ d_inv.T

    def step_report(self) -> dict:
        report: dict = dict(super().step_report())
        if self._pseudo_inverse:
            report["pseudo_inverse_layers"] = list(self._pseudo_inverse)
        return report

    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        self._pseudo_inverse = []
        return super().apply(lm, batch)
