"""Stabilisers for sequential locate-and-edit editors: NAS, PRUNE, RECT and ENCORE, as their authors code them.

Each composes with ROME, r-ROME, MEMIT, AlphaEdit and EMMET through their ``stabilise`` setting
(``--set stabilise=nas``); the active one and its hyperparameters are editor hyperparameters, so
they are part of the run's identity. The rules (docs/EDITORS.md, "Stabilisers", gives file:line):

- **NAS** (SasyaTitech/NAS ``NAS/compute_z.py``, ``util/vstar_stats.py``) acts on the fitted value
  before the solve: v* = v_orig + δ is rescaled to the anchor norm ‖v*‖ → a, where a is the mean
  ‖v*‖ of ``nas_samples`` fits on θ0 with the largest (1 − ``nas_trim``) fraction dropped; a v*
  longer than ``nas_skip`` × a is dropped instead (v* = v_orig, δ = 0). The update stays the
  editor's own (low-rank) solve.
- **PRUNE** (jianghoucheng/AlphaEdit ``experiments/evaluate.py``) bounds the spectrum of the
  accumulated update A = W − W₀: singular values σ above σ_max(W₀) become
  log σ − log σ_max(W₀) + σ_max(W₀); the step's change is W₀ + F(A) − W_prev. It is full rank,
  stored **dense**: out × in values of the parameter's dtype per edited matrix per step.
- **RECT** (jianghoucheng/AlphaEdit ``memit/memit_rect_main.py``) keeps only the top
  ``rect_percent`` % of a step's entries by relative change |ΔW / (W + ε)| against the
  weights before the step, the rest set to zero. Also stored **dense** (the kept entries are
  scattered; a dense out × in tensor per edited matrix per step).
- **ENCORE** (scalable-model-editing/encore ``encore/compute_z.py``, ``encore/encore_main.py``) has two
  rules: MPES stops the v*/z* fit at the ``mpes_hits``-th evaluation at which the target is the most
  probable token at every answer position of every context template; the norm term
  ``encore_norm`` · ‖ΔW‖²_F joins the least-squares objective, so ``encore_norm`` · I joins the matrix
  the editor inverts (MEMIT: λC + KKᵀ + αI; AlphaEdit: its L2 · I; EMMET: its C); and on MEMIT past
  edits' keys are preserved (Σ KₚKₚᵀ joins the matrix, the authors' add_prev_edits). Not for ROME and
  r-ROME, whose equality-constrained update the authors do not constrain.

Storage of PRUNE and RECT: on the default model (SmolLM2-135M, down_proj 576 × 1536) a dense step
is 3.4 MiB per matrix in float32, 17 MiB over MEMIT's five layers, whatever the batch size (the
low-rank factors of a 100-edit step: 0.8 MiB per matrix); a run's keep policy bounds what is kept.
PRUNE also holds W₀ of each edited matrix in memory (float64: 6.8 MiB each there).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import ClassVar, cast

import torch

from lifelong.core.delta import ParamChange
from lifelong.core.models import LoadedModel
from lifelong.editors.base import Snapshot
from lifelong.editors.locate import MPES_RULES, UpperStacks, ValueFit, ValueParams, fit_value
from streams.errors import UserError

STABILISERS = ("none", "nas", "prune", "rect", "encore")
CHANGE_STABILISERS = ("prune", "rect")
# Each stabiliser's own settings: a run's recorded hyperparameters (its identity) hold only the active one's,
# so a stabiliser added later, or a default of one not in use, leaves other runs' identities alone.
STABILISER_SETTINGS = {
    "none": (),
    "nas": ("nas_samples", "nas_trim", "nas_skip"),
    "prune": (),
    "rect": ("rect_percent", "rect_eps"),
    "encore": ("mpes_hits", "mpes_count", "encore_norm"),
}  # those that act on the solved update (NAS acts on v* before it)
NAS_EPS = 1e-10  # scale_vector_to_norm's eps (util/vstar_stats.py:35)


@dataclass
class StabiliseParams:
    """The stabiliser of a locate-and-edit editor and each one's settings at its authors' defaults."""

    stabilise: str = "none"  # "none", "nas", "prune", "rect" or "encore" (docs/EDITORS.md, Stabilisers)
    nas_samples: int = 1000  # NAS: θ0 fits the anchor is averaged over (nas_restart, NAS_hparams.py:42)
    nas_trim: float = 0.95  # NAS, in (0, 1]: the anchor drops norms above this quantile (_NAS_OUTLIER_UPPER_QUANTILE)
    nas_skip: float = 2.0  # NAS: a v* longer than nas_skip × anchor is dropped (compute_z.py:222)
    rect_percent: float = 40.0  # RECT, in (0, 100]: percent of entries kept, by relative change (k_percent)
    rect_eps: float = 1e-8  # RECT: ε in |ΔW / (W + ε)| (epsilon)
    mpes_hits: int = 2  # ENCORE: the fit stops at this many all-argmax evaluations (|prob_cutoff|, llama3-8b.json)
    # ENCORE: what makes an evaluation a hit: "all" positions of every prompt on top, or "authors":
    # compute_z.py's count of positions on top, over the prompts after the first, equal to 5
    mpes_count: str = "all"
    encore_norm: float = 20.0  # ENCORE: α of α‖ΔW‖²_F in the solve (update_norm_lambda, llama3-8b.json)

    def validate(self, editor: str) -> None:
        """nas_samples ≥ 1, nas_skip > 0, rect_eps ≥ 0, mpes_hits ≥ 1 and encore_norm ≥ 0 are declared
        ranges (lifelong.core.options)."""
        if self.stabilise not in STABILISERS:
            raise UserError(f"{editor}: stabilise must be one of {', '.join(STABILISERS)}, got '{self.stabilise}'")
        if not 0 < self.nas_trim <= 1:
            raise UserError(f"{editor}: nas_trim must be in (0, 1], got {self.nas_trim}")
        if self.mpes_count not in MPES_RULES:
            raise UserError(f"{editor}: mpes_count must be one of {', '.join(MPES_RULES)}, got '{self.mpes_count}'")
        if not 0 < self.rect_percent <= 100:
            raise UserError(f"{editor}: rect_percent must be in (0, 100], got {self.rect_percent}")
        super().validate(editor)  # type: ignore[misc]  # the next Params class in the MRO (ValueParams)


# --- the rules, on tensors -------------------------------------------------------------------


def trimmed_mean(norms: list[float], keep: float) -> float:
    """Mean of ``norms`` without the floor((1 − keep) · n) largest (_upper_trimmed_mean)."""
    values = sorted(norms)
    drop = int(math.floor((1.0 - keep) * len(values)))
    kept = values[:-drop] if drop > 0 else values
    if not kept:
        raise UserError("nas: every anchor sample was trimmed away; raise nas_samples or nas_trim")
    return sum(kept) / len(kept)


def nas_value(value: torch.Tensor, original: torch.Tensor, anchor: float, skip: float) -> torch.Tensor:
    """NAS's v*: ``value`` (= original + δ) scaled to norm ``anchor``, or ``original`` (δ dropped)
    when ‖value‖ > skip × anchor (compute_z.py:222-229, scale_vector_to_norm)."""
    norm = value.norm()
    if anchor > 0 and float(norm) > skip * anchor:
        return original
    if anchor <= 0 or norm + NAS_EPS <= NAS_EPS:
        return value
    return value * (anchor / (norm + NAS_EPS))


def prune_spectrum(accumulated: torch.Tensor, bound: float) -> torch.Tensor:
    """F(A): A's singular values σ > bound become log σ − log bound + bound (evaluate.py:310-320)."""
    u, s, vh = torch.linalg.svd(accumulated, full_matrices=False)
    adjusted = torch.where(s > bound, torch.log(s) - math.log(bound) + bound, s)
    return (u * adjusted) @ vh


def rect_mask(update: torch.Tensor, weight: torch.Tensor, percent: float, eps: float) -> torch.Tensor:
    """``update`` with only its top ``percent`` % entries by |ΔW / (W + ε)| kept, the rest zero
    (memit_rect_main.py:50-61: the threshold is the kthvalue at int(n·(100 − percent)/100))."""
    relative = torch.abs(update / (weight + eps))
    k = int(relative.numel() * (100 - percent) / 100)
    if k < 1:  # every entry kept
        return update.clone()
    threshold = torch.kthvalue(relative.reshape(-1), k).values
    return torch.where(relative >= threshold, update, torch.zeros_like(update))


# --- the editors' side -----------------------------------------------------------------------


class Stabilised:
    """Mixin for ROME, r-ROME, MEMIT and AlphaEdit: ``params`` carries :class:`StabiliseParams`.

    The editor calls :meth:`prepare_stabiliser` in its ``prepare`` (on θ0), :meth:`stabilise_fit`
    on each v*/z* fit before its solve, and :meth:`stabilise_changes` on a step's proposed changes
    (against a :class:`Snapshot` of the weights before the step) before applying them as one Delta."""

    params: StabiliseParams  # the editor's Params: a StabiliseParams and a ValueParams (each editor narrows it)
    name: ClassVar[str]
    _stacks: UpperStacks

    def _stabiliser_state(self) -> dict:
        if "_stab" not in self.__dict__:
            # anchors: layer -> NAS anchor; base: param name -> (W₀ float64, σ_max(W₀))
            # report: what the stabiliser did since the last step report
            self.__dict__["_stab"] = {"anchors": {}, "base": {}, "report": {}}
        return self.__dict__["_stab"]

    def nas_layers(self, lm: LoadedModel) -> list[int]:
        """The layer(s) whose v*/z* is fitted (ROME's layer; MEMIT's last)."""
        raise NotImplementedError

    def prepare_stabiliser(self, lm: LoadedModel) -> None:
        """What the stabiliser needs from θ0: NAS's anchor, PRUNE's W₀ and its σ_max. Called by
        ``prepare``, which a run calls on θ0 before any checkout (and each ``apply`` calls again: only
        what is missing is computed)."""
        state = self._stabiliser_state()
        mode = self.params.stabilise
        if mode == "nas":
            for layer in self.nas_layers(lm):
                if layer not in state["anchors"]:
                    state["anchors"][layer] = self.nas_anchor(lm, layer)
        elif mode == "prune":
            for name in self.scope(lm):  # type: ignore[attr-defined]
                if name not in state["base"]:
                    w0 = lm.model.get_parameter(name).detach().double().clone()
                    state["base"][name] = (w0, float(torch.linalg.matrix_norm(w0, ord=2)))

    def nas_anchor(self, lm: LoadedModel, layer: int) -> float:
        """Mean ‖v*‖ of fits on the current model (θ0) over up to ``nas_samples`` built-in facts
        (all of them when there are fewer, else a seed-0 sample), the top (1 − nas_trim) dropped."""
        from streams.facts import builtin_stream

        p = self.params
        if not isinstance(p, ValueParams):  # the mixin fits values with the editor's own settings
            raise TypeError(f"{self.name}: a stabilised editor's Params must be ValueParams too")
        edits = list(builtin_stream())
        if p.nas_samples < len(edits):
            edits = random.Random(0).sample(edits, p.nas_samples)
        templates = self.value_templates(lm)
        norms = [float(fit_value(lm, layer, e, p, self.name, self._stacks, templates).value.norm()) for e in edits]
        return trimmed_mean(norms, p.nas_trim)

    def value_templates(self, lm: LoadedModel):
        """The context templates the editor's own fits use (ROME's may be generated from θ0); None: the
        fixed ones of its settings."""
        templates = getattr(self, "context_templates", None)
        return templates(lm) if callable(templates) else None

    def hyperparameters(self) -> dict:
        """The editor's hyperparameters with the active stabiliser's settings only (see STABILISER_SETTINGS)."""
        out = super().hyperparameters()  # type: ignore[misc]  # the editor class this is mixed into
        unused = {f.name for f in dataclasses.fields(StabiliseParams)} - {"stabilise"}
        unused -= set(STABILISER_SETTINGS[self.params.stabilise])
        return {k: v for k, v in out.items() if k not in unused}

    def stabilised_fit(self, lm: LoadedModel, layer: int, edit, templates=None) -> ValueFit:
        """The editor's v*/z* fit under its stabiliser: ENCORE's MPES stop rule in the fit, NAS's
        rescale after it (:meth:`stabilise_fit`)."""
        p = self.params
        mpes = p.mpes_hits if p.stabilise == "encore" else 0
        # the editors that mix this in have Params deriving from both ValueParams and StabiliseParams
        fit = fit_value(
            lm,
            layer,
            edit,
            cast("ValueParams", p),
            self.name,
            self._stacks,
            templates,
            stop_argmax=mpes,
            argmax_rule=p.mpes_count,
        )
        if mpes:
            report = self._stabiliser_state()["report"]
            report["mpes_stopped"] = report.get("mpes_stopped", 0) + int(fit.argmax_hits >= mpes)
        return self.stabilise_fit(lm, layer, fit)

    def norm_weight(self) -> float:
        """α of ENCORE's α‖ΔW‖²_F, which adds α·I to the matrix the solve inverts (0 otherwise)."""
        return float(self.params.encore_norm) if self.params.stabilise == "encore" else 0.0

    def nas_anchors(self) -> dict[int, float]:
        return dict(self._stabiliser_state()["anchors"])

    def stabilise_fit(self, lm: LoadedModel, layer: int, fit: ValueFit) -> ValueFit:
        """NAS's v* in place of the fitted one (the fit unchanged for every other stabiliser)."""
        if self.params.stabilise != "nas":
            return fit
        self.prepare_stabiliser(lm)
        state = self._stabiliser_state()
        anchor = state["anchors"][layer]
        value = nas_value(fit.value, fit.original, anchor, self.params.nas_skip)
        report = state["report"]
        report["nas_anchor"] = anchor
        report["nas_dropped"] = report.get("nas_dropped", 0) + int(value is fit.original)
        return dataclasses.replace(fit, value=value)

    def stabilise_changes(
        self, lm: LoadedModel, before: Snapshot, changes: dict[str, ParamChange]
    ) -> dict[str, ParamChange]:
        """The changes to apply instead of ``changes`` (computed on the weights in ``before``)."""
        mode = self.params.stabilise
        if mode not in CHANGE_STABILISERS:
            return changes
        self.prepare_stabiliser(lm)
        out = {}
        for name, change in changes.items():
            previous = before[name].double()
            proposed = change.materialize().to(device=previous.device, dtype=torch.float64)
            if mode == "rect":
                applied = rect_mask(proposed, previous, self.params.rect_percent, self.params.rect_eps)
            else:
                w0, bound = self._stabiliser_state()["base"][name]
                w0 = w0.to(previous.device)
                accumulated = previous + proposed - w0
                self._count_compressed(accumulated, bound)
                applied = w0 + prune_spectrum(accumulated, bound) - previous
            out[name] = ParamChange(dense=applied.to(before[name].dtype).contiguous())
        return out

    def _count_compressed(self, accumulated: torch.Tensor, bound: float) -> None:
        report = self._stabiliser_state()["report"]
        top = float(torch.linalg.matrix_norm(accumulated, ord=2))
        report["prune_sigma_max"] = max(report.get("prune_sigma_max", 0.0), top)  # over the step's matrices
        report["prune_compressed"] = report.get("prune_compressed", 0) + int(top > bound)

    def stabiliser_report(self) -> dict:
        """For the step's line in steps.jsonl, since the last report: NAS's anchor and how many fits
        it dropped (‖v*‖ > nas_skip × anchor); PRUNE's largest σ of an accumulated update and how
        many matrices it compressed; ENCORE's ``mpes_stopped``, the fits MPES stopped ({} without a
        stabiliser, or for RECT)."""
        state = self._stabiliser_state()
        report, state["report"] = state["report"], {}
        return report
