"""Architecture adapters: where each model family keeps the modules editors touch.

Editors speak of "layer l's MLP output projection" and "the key entering it"; an
adapter maps those words onto module paths for one family. GPT-2's ``Conv1D``
stores its weight as (in, out), transposed relative to ``nn.Linear``; that is
handled here, in :meth:`ArchAdapter.out_proj_weight_view` and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from streams.errors import UserError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class UnsupportedArchitectureError(UserError):
    """The model's family has no adapter."""


@dataclass(frozen=True)
class FamilySpec:
    """Module paths of one family, relative to the ``*ForCausalLM`` model."""

    layers: str  # the list of transformer blocks
    mlp_in: str  # within a block: the MLP's input projection (up/fc)
    mlp_out: str  # within a block: the MLP's output projection (down/proj)
    final_norm: str
    transposed: bool = False  # weight stored as (in, out) — GPT-2's Conv1D
    positions: str | None = None  # a learned absolute position embedding added to the input (GPT-2)
    mlp_gate: str | None = None  # within a block: the gated MLP's gate projection (Llama-style families)


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec("model.layers", "mlp.up_proj", "mlp.down_proj", "model.norm", mlp_gate="mlp.gate_proj"),
    "qwen2": FamilySpec("model.layers", "mlp.up_proj", "mlp.down_proj", "model.norm", mlp_gate="mlp.gate_proj"),
    "mistral": FamilySpec("model.layers", "mlp.up_proj", "mlp.down_proj", "model.norm", mlp_gate="mlp.gate_proj"),
    "gpt2": FamilySpec(
        "transformer.h", "mlp.c_fc", "mlp.c_proj", "transformer.ln_f", transposed=True, positions="transformer.wpe"
    ),
    "gptj": FamilySpec("transformer.h", "mlp.fc_in", "mlp.fc_out", "transformer.ln_f"),
    "gpt_neox": FamilySpec("gpt_neox.layers", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"),
}


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _weight(module: nn.Module) -> torch.Tensor:
    """A projection's weight (``nn.Module`` types attribute access as ``Tensor | Module``)."""
    return cast(torch.Tensor, module.weight)


class ArchAdapter:
    """Names and handles of the editable modules of one loaded model."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in FAMILIES:
            raise UnsupportedArchitectureError(
                f"unsupported model architecture '{model_type}': supported families are " + ", ".join(sorted(FAMILIES))
            )
        self.model = model
        self.family = model_type
        self.spec = FAMILIES[model_type]

    @property
    def num_layers(self) -> int:
        return len(cast(nn.ModuleList, _get(self.model, self.spec.layers)))

    def layer(self, index: int) -> nn.Module:
        return cast(nn.ModuleList, _get(self.model, self.spec.layers))[index]

    def out_proj_name(self, index: int) -> str:
        """Module path of layer ``index``'s MLP output projection."""
        return f"{self.spec.layers}.{index}.{self.spec.mlp_out}"

    def out_proj(self, index: int) -> nn.Module:
        return _get(self.model, self.out_proj_name(index))

    def out_proj_param_name(self, index: int) -> str:
        return self.out_proj_name(index) + ".weight"

    def out_proj_weight_view(self, index: int) -> torch.Tensor:
        """Layer ``index``'s MLP output weight as an (out, in) view: ``W @ k`` maps a key to a value.

        It is a view of the live parameter, so in-place changes to it edit the model.
        """
        weight = _weight(self.out_proj(index))
        return weight.T if self.spec.transposed else weight

    def as_stored(self, matrix: torch.Tensor) -> torch.Tensor:
        """Turn an (out, in) matrix into the parameter's storage orientation."""
        return matrix.T if self.spec.transposed else matrix

    def mlp_kinds(self) -> tuple[str, ...]:
        """The MLP's projections by role: ("gate", "up", "down") for gated MLPs, else ("up", "down").

        "up" is the input projection (up_proj, c_fc, fc_in, dense_h_to_4h), "down" the output one."""
        return ("gate", "up", "down") if self.spec.mlp_gate else ("up", "down")

    def mlp_proj_name(self, index: int, kind: str) -> str:
        """Module path of layer ``index``'s MLP projection ``kind`` (one of :meth:`mlp_kinds`)."""
        paths = {"gate": self.spec.mlp_gate, "up": self.spec.mlp_in, "down": self.spec.mlp_out}
        if kind not in self.mlp_kinds():
            raise UserError(f"a {self.family} MLP has no '{kind}' projection: it has {', '.join(self.mlp_kinds())}")
        return f"{self.spec.layers}.{index}.{paths[kind]}"

    def mlp_proj(self, index: int, kind: str) -> nn.Module:
        return _get(self.model, self.mlp_proj_name(index, kind))

    def mlp_weight_view(self, index: int, kind: str) -> torch.Tensor:
        """Layer ``index``'s MLP projection ``kind`` as an (out, in) view of the live weight."""
        weight = _weight(self.mlp_proj(index, kind))
        return weight.T if self.spec.transposed else weight

    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    @property
    def config(self) -> PretrainedConfig:
        """The model's transformers config (``nn.Module`` types attribute access as ``Tensor | Module``)."""
        return cast("PretrainedConfig", self.model.config)

    def embedding(self) -> nn.Module:
        """The input (token) embedding."""
        # a transformers model's method; nn.Module types attribute access as Tensor | Module
        return self.model.get_input_embeddings()  # type: ignore[operator]

    def unembedding(self) -> nn.Module:
        # a transformers model's method; nn.Module types attribute access as Tensor | Module
        return self.model.get_output_embeddings()  # type: ignore[operator]

    def body(self) -> nn.Module:
        """The model without its LM head: returns final-normed hidden states."""
        return getattr(self.model, cast(str, self.model.base_model_prefix))
