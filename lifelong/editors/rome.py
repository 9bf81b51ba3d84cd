"""ROME (Meng et al. 2022) and r-ROME (Gupta et al. 2024): a rank-one update of one MLP output projection.

With k the subject's last-token key, v* the projection output that yields the new
target (see ``locate.optimize_value``), C = E[k kᵀ] (identity without the covariance
adjustment) and u = C⁻¹ k̄ for the key k̄ averaged over context templates:

    ΔW = (v* − W k_x − b) uᵀ / (uᵀ k_x),    so that (W + ΔW) k_x + b = v*.

The original implementation takes k_x = the key of the bare prompt while u uses the
averaged key; r-ROME uses k_x = k̄ in every part, which avoids the "disabling edits"
that collapse models in sequential use. A batch is edited one fact after another
within the step; the step's delta holds the rank-one factors side by side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence, cast

import torch

from lifelong.core.delta import Delta
from lifelong.editors.base import Editor, Snapshot, each_edit, resolve_layer
from lifelong.editors.covariance import MODEL_SAMPLE, corpus_files, key_second_moment
from lifelong.editors.locate import FitLog, UpperStacks, ValueParams, fit_value, lowrank_change
from lifelong.editors.stabilise import StabiliseParams, Stabilised
from lifelong.core.models import LoadedModel
from streams import Edit


@dataclass
class ROMEParams(StabiliseParams, ValueParams):
    layer: int | None = None  # None: num_layers // 5 (layer 6 of SmolLM2's 30)
    mom2: bool = True  # covariance adjustment (C = E[kkᵀ]); False: C = I
    cov_corpus: str = MODEL_SAMPLE  # text for C: "model-sample" (seeded text from the model) or a .txt file/dir
    cov_tokens: int = 20000  # tokens of that text C is estimated from
    cov_reg: float = 1e-3  # ridge added to C, relative to its mean diagonal

    def validate(self, editor: str) -> None:
        super().validate(editor)
        if self.mom2 and self.cov_corpus != MODEL_SAMPLE:  # a missing corpus is refused before the run begins
            corpus_files(self.cov_corpus)


class ROMEEditor(Stabilised, Editor):
    name = "rome"
    description = "ROME: rank-one update of one MLP output projection (key of the bare prompt in the residual)"
    Params = ROMEParams
    averaged_key_everywhere = False

    def __init__(self, params=None):
        super().__init__(params)
        self._inverse_cache: dict[int, torch.Tensor] = {}
        self._stacks = UpperStacks()
        self._fits = FitLog()

    def bind(self, lm: LoadedModel) -> "ROMEEditor":
        layer = resolve_layer(self.params.layer, lm, self.name)
        self.params = dataclasses.replace(self.params, layer=layer)
        return self

    def scope(self, lm: LoadedModel) -> list[str]:
        self.bind(lm)
        return [lm.adapter.out_proj_param_name(self.params.layer)]

    def prepare(self, lm: LoadedModel) -> None:
        self.bind(lm)
        self._inverse(lm)
        self.prepare_stabiliser(lm)

    def nas_layers(self, lm: LoadedModel) -> list[int]:
        return [self.bind(lm).params.layer]

    def _inverse(self, lm: LoadedModel) -> torch.Tensor | None:
        """(C + reg·I)⁻¹ in float64, computed once per layer (None without the adjustment)."""
        p = self.params
        if not p.mom2:
            return None
        if p.layer not in self._inverse_cache:
            c = key_second_moment(lm, p.layer, p.cov_corpus, p.cov_tokens)
            c = c + p.cov_reg * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
            self._inverse_cache[p.layer] = torch.linalg.inv(c).to(lm.device)
        return self._inverse_cache[p.layer]

    def rank_one(self, lm: LoadedModel, edit: Edit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(left, right, k_x, v*) in float64 with ΔW = left ⊗ right for one edit on the live model."""
        p = self.params
        fit = self._fits.add(self.stabilise_fit(lm, p.layer, fit_value(lm, p.layer, edit, p, self.name, self._stacks)))
        k_avg = fit.keys.mean(0)  # over context templates; row 0 is the bare prompt
        k_x = k_avg if self.averaged_key_everywhere else fit.keys[0]
        weight = lm.adapter.out_proj_weight_view(p.layer).double()
        bias = cast("torch.Tensor | None", lm.adapter.out_proj(p.layer).bias)
        current = weight @ k_x + (bias.double() if bias is not None else 0)
        inverse = self._inverse(lm)
        u = inverse @ k_avg if inverse is not None else k_avg
        right = u / (u @ k_x)
        return fit.value - current, right, k_x, fit.value

    def step_report(self) -> dict:
        return {**self._fits.summary(self.params), **self.stabiliser_report()}

    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        self._fits.clear()
        if not batch:
            return Delta.empty()
        self.prepare(lm)
        name = self.scope(lm)[0]
        param = lm.model.get_parameter(name)
        snapshot = Snapshot(lm.model, [name])
        lefts, rights = [], []
        for edit in each_edit(batch, "rank-one updates"):  # one fact after another: each sees the previous one's change
            left, right, _, _ = self.rank_one(lm, edit)
            lefts.append(left)
            rights.append(right)
            single = Delta({name: lowrank_change(lm.adapter, left, right, param.dtype)})
            single.apply(lm.model)
        change = lowrank_change(lm.adapter, torch.stack(lefts, 1), torch.stack(rights, 1), param.dtype)
        return snapshot.restore_and_apply(self.stabilise_changes(lm, snapshot, {name: change}))  # one delta


class RROMEEditor(ROMEEditor):
    name = "r-rome"
    description = "r-ROME: ROME with the template-averaged key in every part of the update (stable when sequential)"
    averaged_key_everywhere = True
