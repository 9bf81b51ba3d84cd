"""ROME (Meng et al. 2022) and r-ROME (Gupta et al. 2024): a rank-one update of one MLP output projection.

With k the subject's last-token key, v* the projection output that yields the new
target (see ``locate.optimize_value``), C = E[k kᵀ] (identity without the covariance
adjustment) and u = C⁻¹ k̄ for the key k̄ averaged over context templates:

    ΔW = (v* − W k_x − b) uᵀ / (uᵀ k_x),    so that (W + ΔW) k_x + b = v*.

The original implementation takes k_x = the key of the bare prompt while u uses the
averaged key; r-ROME uses k_x = k̄ in every part, which avoids the "disabling edits"
that collapse models in sequential use. A batch is edited one fact after another
within the step; the step's delta holds the rank-one factors side by side.

Settings left unset follow the hparams file the originals publish for the model's family
(``HPARAMS_FILES``; Llama-family models: EasyEdit's llama-7b.yaml), and the context templates are
generated from the model θ0 as the original does (``locate.generated_templates``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, cast

import torch

from lifelong.core.delta import Delta
from lifelong.core.models import LoadedModel
from lifelong.editors.base import Editor, Snapshot, check_hparams_name, each_edit, from_hparams_file, resolved
from lifelong.editors.covariance import MODEL_SAMPLE, corpus_files, key_second_moment
from lifelong.editors.locate import (
    GENERATION_STARTS,
    FitLog,
    UpperStacks,
    ValueParams,
    generated_templates,
    lowrank_change,
)
from lifelong.editors.stabilise import Stabilised, StabiliseParams
from streams import Edit
from streams.errors import UserError

# The originals publish one hyperparameter file per model. A setting left at None takes the value
# of the file for the model's family (``hparams=family``); the file's name is recorded in its place.
# Values read from those files: the layer, v_num_grad_steps, v_lr, v_weight_decay, mom2_adjustment,
# and the context templates (generated from the model; which start strings, see locate.py). Every
# file also has clamp_norm_factor 4, kl_factor 0.0625, context_template_length_params
# [[5, 10], [10, 10]] and fact_token subject_last, which are ours for every family.
EASYEDIT = "zjunlp/EasyEdit@14cea82"
KMENG = "kmeng01/rome@0874014"
HPARAMS_FILES: dict[str, dict] = {
    f"{EASYEDIT}:hparams/ROME/llama-7b.yaml": dict(
        layer=5, v_steps=25, v_lr=0.5, v_weight_decay=1e-3, mom2=False, context="generated"
    ),  # mistral-7b.yaml, qwen2-7b.yaml and qwen2.5-7b.yaml hold the same values
    f"{KMENG}:hparams/ROME/gpt2-xl.json": dict(
        layer=17, v_steps=20, v_lr=0.5, v_weight_decay=0.5, mom2=True, context="generated-eot"
    ),
    f"{KMENG}:hparams/ROME/EleutherAI_gpt-j-6B.json": dict(
        layer=5, v_steps=20, v_lr=0.5, v_weight_decay=0.5, mom2=True, context="generated-eot"
    ),
    f"{EASYEDIT}:hparams/R-ROME/llama-7b.yaml": dict(
        layer=5, v_steps=25, v_lr=0.5, v_weight_decay=1e-3, mom2=False, context="generated"
    ),
    f"{EASYEDIT}:hparams/R-ROME/gpt2-xl.yaml": dict(
        layer=17, v_steps=20, v_lr=0.5, v_weight_decay=0.5, mom2=False, context="generated"
    ),
    f"{EASYEDIT}:hparams/R-ROME/gpt-j-6B.yaml": dict(
        layer=5, v_steps=20, v_lr=0.5, v_weight_decay=0.5, mom2=False, context="generated"
    ),
    # This project's own defaults before the files were followed (GPT-2 XL's numbers, a layer
    # scaled to depth, C from the model's text, 21 fixed context sentences): the named variant.
    "none": dict(layer=None, v_steps=20, v_lr=0.5, v_weight_decay=0.5, mom2=True, context="fixed21"),
}
ROME_FAMILY_FILES = {
    "llama": f"{EASYEDIT}:hparams/ROME/llama-7b.yaml",
    "mistral": f"{EASYEDIT}:hparams/ROME/llama-7b.yaml",
    "qwen2": f"{EASYEDIT}:hparams/ROME/llama-7b.yaml",
    "gpt2": f"{KMENG}:hparams/ROME/gpt2-xl.json",
    "gptj": f"{KMENG}:hparams/ROME/EleutherAI_gpt-j-6B.json",
}
R_ROME_FAMILY_FILES = {
    "llama": f"{EASYEDIT}:hparams/R-ROME/llama-7b.yaml",
    "mistral": f"{EASYEDIT}:hparams/R-ROME/llama-7b.yaml",
    "qwen2": f"{EASYEDIT}:hparams/R-ROME/llama-7b.yaml",
    "gpt2": f"{EASYEDIT}:hparams/R-ROME/gpt2-xl.yaml",
    "gptj": f"{EASYEDIT}:hparams/R-ROME/gpt-j-6B.yaml",
}
CONTEXTS = ("generated", "generated-eot", "fixed21")
FAMILY_SETTINGS = ("layer", "v_steps", "v_lr", "v_weight_decay", "mom2", "context")


@dataclass
class ROMEParams(StabiliseParams, ValueParams):
    # Where the settings left at None come from: "family" (the model family's file, see
    # HPARAMS_FILES; a family without one gets "none"), "none" (this project's former defaults),
    # or one of HPARAMS_FILES' names. After bind() it names the file the values came from.
    hparams: str = "family"
    layer: int | None = None  # None: the file's (Llama: 5); "none": num_layers // 5 (6 of SmolLM2's 30)
    mom2: bool | None = None  # covariance adjustment (C = E[kkᵀ]); False: C = I. None: the file's (Llama: off)
    v_steps: int | None = None  # None: the file's v_num_grad_steps (Llama: 25; GPT-2 XL, GPT-J: 20)
    v_lr: float | None = None  # None: the file's (0.5 in each)
    v_weight_decay: float | None = None  # None: the file's (Llama: 1e-3; GPT-2 XL, GPT-J: 0.5)
    # Context templates: "generated" (sampled from the model θ0 after EasyEdit's five start words),
    # "generated-eot" (after the end-of-text token, as kmeng01/rome), "fixed21" (21 fixed sentences).
    context: str | None = None
    context_seed: int = 0  # seeds the sampling of generated templates
    cov_corpus: str = MODEL_SAMPLE  # text for C: "model-sample" (seeded text from the model) or a .txt file/dir
    cov_tokens: int = 20000  # tokens of that text C is estimated from
    cov_reg: float = 1e-3  # ridge added to C, relative to its mean diagonal

    def validate(self, editor: str) -> None:
        super().validate(editor)
        if self.mom2 is not False and self.cov_corpus != MODEL_SAMPLE:  # a missing corpus is refused before the run
            corpus_files(self.cov_corpus)
        check_hparams_name(self.hparams, HPARAMS_FILES, editor)
        if self.stabilise == "encore":
            raise UserError(
                f"{editor}: stabilise=encore needs a least-squares solve (memit, alphaedit, emmet); "
                "the authors define it on MEMIT, not on ROME's equality-constrained update"
            )
        if self.context is not None and self.context not in CONTEXTS:
            raise UserError(f"{editor}: context must be one of {', '.join(CONTEXTS)}, got '{self.context}'")


def family_hparams(params: ROMEParams, lm: LoadedModel, files: dict[str, str], editor: str) -> ROMEParams:
    """``params`` with every family setting left at None taken from its hparams file (see
    HPARAMS_FILES and ``from_hparams_file``)."""
    tables = {name: {k: v for k, v in values.items() if k in FAMILY_SETTINGS} for name, values in HPARAMS_FILES.items()}
    return from_hparams_file(params, lm, files, tables, editor)


class ROMEEditor(Stabilised, Editor[ROMEParams]):
    name = "rome"
    description = "ROME: rank-one update of one MLP output projection (key of the bare prompt in the residual)"
    Params = ROMEParams
    params: ROMEParams  # the Stabilised mixin's StabiliseParams, narrowed
    precision_parts: ClassVar[dict[str, str]] = {
        "covariance": "float64",  # key_second_moment (layer_stats' double)
        "inverse": "float64",  # (C + reg·I)⁻¹, rome_main.py's get_inv_cov
        "rank_one_update": "float64",
        "v_fit": "v_dtype",  # the layers above the edited one while v* is fitted
    }

    def precision(self, lm: LoadedModel) -> dict[str, str]:
        out = super().precision(lm)
        if not self.params.mom2:  # no covariance adjustment: neither is computed
            del out["covariance"], out["inverse"]
        return out

    averaged_key_everywhere = False

    def __init__(self, params=None):
        super().__init__(params)
        self._inverse_cache: dict[int, torch.Tensor] = {}
        self._stacks = UpperStacks()
        self._fits = FitLog()
        self._templates: tuple[str, ...] | None = None
        self._templates_for: torch.nn.Module | None = None  # the model they were generated from

    family_files = ROME_FAMILY_FILES

    def bind(self, lm: LoadedModel) -> ROMEEditor:
        self.params = family_hparams(self.params, lm, self.family_files, self.name)
        return self

    def context_templates(self, lm: LoadedModel) -> tuple[str, ...]:
        """The context templates (the first is the bare prompt): fixed, or generated once from the
        model as it is at the first call (θ0: ``prepare`` runs before any edit and before a resume's
        checkout), seeded by ``context_seed`` so that a resumed run gets the same ones."""
        p = self.params
        if p.context == "fixed21":
            return p.context_templates(self.name)
        if self._templates is None or self._templates_for is not lm.model:
            starts = GENERATION_STARTS["kmeng" if p.context == "generated-eot" else "easyedit"]
            eot = lm.tokenizer.eos_token if p.context == "generated-eot" else None
            if eot is not None:  # kmeng01/rome's "<|endoftext|>", spelled as this model's end-of-text token
                starts = (eot,)
            self._templates = generated_templates(lm, p.context_seed, starts, who=self.name)
            self._templates_for = lm.model
        return self._templates[: p.templates]

    @property
    def layer(self) -> int:
        """The layer edited, as ``bind`` resolved it (the family file's, or the setting's)."""
        return resolved(self.params.layer, self.name, "layer")

    def scope(self, lm: LoadedModel) -> list[str]:
        self.bind(lm)
        return [lm.adapter.out_proj_param_name(self.layer)]

    def prepare(self, lm: LoadedModel) -> None:
        self.bind(lm)
        self.context_templates(lm)
        self._inverse(lm)
        self.prepare_stabiliser(lm)

    def nas_layers(self, lm: LoadedModel) -> list[int]:
        return [self.bind(lm).layer]

    def _inverse(self, lm: LoadedModel) -> torch.Tensor | None:
        """(C + reg·I)⁻¹ in float64, computed once per layer (None without the adjustment)."""
        p = self.params
        if not p.mom2:
            return None
        if self.layer not in self._inverse_cache:
            c = key_second_moment(lm, self.layer, p.cov_corpus, p.cov_tokens)
            c = c + p.cov_reg * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
            self._inverse_cache[self.layer] = torch.linalg.inv(c).to(lm.layer_device(self.layer))
        return self._inverse_cache[self.layer]

    def rank_one(self, lm: LoadedModel, edit: Edit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(left, right, k_x, v*) in float64 with ΔW = left ⊗ right for one edit on the live model."""
        templates = self.context_templates(lm)
        fit = self._fits.add(self.stabilised_fit(lm, self.layer, edit, templates))
        k_avg = fit.keys.mean(0)  # over context templates; row 0 is the bare prompt
        k_x = k_avg if self.averaged_key_everywhere else fit.keys[0]
        weight = lm.adapter.out_proj_weight_view(self.layer).double()
        bias = cast("torch.Tensor | None", lm.adapter.out_proj(self.layer).bias)
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
    family_files = R_ROME_FAMILY_FILES
