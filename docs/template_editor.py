"""A template for your own editor: copy this file, rename the class, and change ``apply``.

It edits like the simplest method there is: a rank-one nudge of one MLP output projection,
W ← W + (α / ‖k‖²) · e(target) kᵀ, where k is the projection's input at the prompt's last
token and e(target) the new answer's first-token output embedding. It is not a good editor;
it shows every part of the contract (docs/EDITORS.md) in a few lines, and
``tests/test_editor_template.py`` runs the property-testing kit on it.

    from lifelong.testing import check_editor
    check_editor(lambda: NudgeEditor(), model="tiny-llama").raise_if_failed()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lifelong.core.delta import Delta, ParamChange
from lifelong.core.models import LoadedModel
from lifelong.core.scorer import answer_token_ids
from lifelong.editors.base import Editor, resolve_layer, resolved
from lifelong.editors.locate import capture_keys
from streams import Edit


@dataclass
class NudgeParams:
    """Every hyperparameter with its default and a comment: `lifelong editors` prints the comments."""

    layer: int | None = None  # None: num_layers // 5 (editors.base.default_layer)
    alpha: float = 1.0  # size of the nudge, in units of the output embedding


class NudgeEditor(Editor[NudgeParams]):  # Editor[...]: mypy knows self.params is a NudgeParams
    name = "nudge"
    description = "template: rank-one nudge of one MLP output projection toward the new answer's embedding"
    Params = NudgeParams

    def bind(self, lm: LoadedModel) -> NudgeEditor:
        # Fill model-dependent defaults once; the replay records the resolved values in the manifest.
        self.params = dataclasses.replace(self.params, layer=resolve_layer(self.params.layer, lm, self.name))
        return self

    @property
    def layer(self) -> int:
        """The layer as bind() resolved it: typed int, where the setting is int | None."""
        return resolved(self.params.layer, self.name, "layer")

    def scope(self, lm: LoadedModel) -> list[str]:
        # Every parameter apply() may change; the kit checks that nothing else moves.
        return [lm.adapter.out_proj_param_name(self.bind(lm).layer)]

    @torch.no_grad()
    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        if not batch:
            return Delta.empty()  # an empty batch changes nothing
        name = self.scope(lm)[0]
        us, vs = [], []
        for edit in batch:
            ids = lm.tokenizer(edit.rendered_prompt, return_tensors="pt").input_ids.to(lm.device)
            with capture_keys(lm.adapter, self.layer) as seen:
                lm.model(input_ids=ids)
            key = seen[0][0, -1].float()
            target = answer_token_ids(lm.tokenizer, edit.target_new)[0]
            direction = lm.model.get_output_embeddings().weight[target].float()
            us.append(self.params.alpha * direction)
            vs.append(key / key.dot(key))
        # A low-rank change u @ vᵀ is kept as its factors, never dense, in the parameter's storage
        # orientation: (out, in) for nn.Linear, (in, out) for GPT-2's Conv1D.
        u, v = torch.stack(us, 1), torch.stack(vs, 1)
        if lm.adapter.spec.transposed:
            u, v = v, u
        delta = Delta({name: ParamChange(u=u.to(lm.model.dtype), v=v.to(lm.model.dtype))})
        delta.apply(lm.model)  # change the live model through the Delta, so checkout repeats the same ops
        return delta
