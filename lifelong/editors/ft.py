"""FT-L: constrained fine-tuning of one MLP output projection (Zhu et al. 2020, as in ROME's baselines).

For each batch, Adam minimises the mean NLL of every edit's new target on its prompt,
changing only one layer's MLP output weight; after every step the change is clamped
to an L∞ ball of radius ``norm_constraint`` around the weight before this batch.
Training stops early once every edit's target NLL is below ``stop_loss``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lifelong.core.delta import Delta, ParamChange
from lifelong.core.models import LoadedModel
from lifelong.core.scorer import Scorer
from lifelong.editors.base import Editor, Snapshot, resolve_layer, resolved
from streams import Edit


@dataclass
class FTParams:
    layer: int | None = None  # None: num_layers // 5 (editors.base.default_layer)
    lr: float = 1e-2  # Adam learning rate
    max_steps: int = 25  # optimisation steps per batch at most
    norm_constraint: float = 1e-2  # L∞ bound on the change of each weight, per batch
    stop_loss: float = 0.05  # stop when every edit's mean target NLL is below this


class FTEditor(Editor[FTParams]):
    name = "ft"
    description = "constrained fine-tuning (FT-L) of one MLP output projection, Adam, L-inf bound, early stop"
    Params = FTParams

    def bind(self, lm: LoadedModel) -> FTEditor:
        self.params = dataclasses.replace(self.params, layer=resolve_layer(self.params.layer, lm, self.name))
        return self

    @property
    def layer(self) -> int:
        """The layer edited, as ``bind`` resolved it."""
        return resolved(self.params.layer, self.name, "layer")

    def scope(self, lm: LoadedModel) -> list[str]:
        return [lm.adapter.out_proj_param_name(self.bind(lm).layer)]

    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        if not batch:
            return Delta.empty()
        p = self.params
        name = self.scope(lm)[0]
        weight = lm.model.get_parameter(name)
        snapshot = Snapshot(lm.model, [name])
        before = snapshot[name]
        scorer = Scorer(lm.model, lm.tokenizer)
        data = scorer.collate([scorer.encode(e.rendered_prompt, e.target_new) for e in batch])
        counts = torch.bincount(torch.as_tensor(data.owner), minlength=len(batch)).to(lm.device)
        owner = torch.as_tensor(data.owner, device=lm.device)

        weight.requires_grad_(True)
        optimizer = torch.optim.Adam([weight], lr=p.lr)
        try:
            for _ in range(p.max_steps):
                token_nll = -scorer.answer_logits(data).log_softmax(-1).gather(1, data.targets[:, None])[:, 0]
                per_edit = torch.zeros(len(batch), device=lm.device).index_add(0, owner, token_nll) / counts
                if per_edit.max().item() < p.stop_loss:
                    break
                optimizer.zero_grad(set_to_none=True)
                per_edit.mean().backward()
                optimizer.step()
                with torch.no_grad():
                    torch.clamp(weight, before - p.norm_constraint, before + p.norm_constraint, out=weight)
        finally:
            weight.requires_grad_(False)
            weight.grad = None

        # The trained change, re-applied through a Delta from the weights before it (bitwise checkout).
        with torch.no_grad():
            change = weight.detach() - before
        return snapshot.restore_and_apply({name: ParamChange(dense=change)})
