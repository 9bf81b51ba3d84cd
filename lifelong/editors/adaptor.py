"""Shared machinery of editors that wrap one MLP output projection with a forward hook (GRACE, WISE).

The base weights are never touched: ``apply`` returns an empty Delta and everything
the adaptor knows lives in editor state. ``bind`` installs the hooks on the model
(once per model); the hooks read the editor's current state, so loading a state
after binding (resume, checkout) takes effect at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, TypeVar, cast

import torch

from lifelong.core.delta import Delta
from lifelong.core.model_access import Codec
from lifelong.core.models import LoadedModel
from lifelong.editors.base import Editor, each_edit, resolved
from lifelong.editors.hooks import Hooks, stop_before
from streams import Edit
from streams.errors import UserError


def default_adaptor_layer(num_layers: int) -> int:
    """Four fifths of the depth: layer 24 of SmolLM2's 30, where last-token keys of different
    facts lie far apart (min distance 14.2 over 12 built-in facts; neighbors >= 8.7)."""
    return (4 * num_layers) // 5


class AdaptorParams(Protocol):
    """What the adaptor machinery reads of its editor's Params: a dataclass with a ``layer``."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def layer(self) -> int | None: ...


AP = TypeVar("AP", bound=AdaptorParams)


class AdaptorEditor(Editor[AP]):
    """An editor acting through a forward hook on ``out_proj(layer)``; subclasses define ``_hook``."""

    adaptor = True

    def __init__(self, params=None):
        super().__init__(params)
        self._hooks = Hooks()  # installed by bind, kept until release
        self._bound_to = None
        self._mask: torch.Tensor | None = None  # attention mask of the body's current forward

    def bind(self, lm: LoadedModel) -> AdaptorEditor:
        layer = self.params.layer
        layer = default_adaptor_layer(lm.num_layers) if layer is None else layer
        if not 0 <= layer < lm.num_layers:
            raise UserError(f"{self.name}: layer {layer} out of range for a {lm.num_layers}-layer model")
        self.params = dataclasses.replace(self.params, layer=layer)
        if self._bound_to is not lm.model:
            self.release()
            self._attach(lm)
            self._bound_to = lm.model
        return self

    @property
    def layer(self) -> int:
        """The layer wrapped, as ``bind`` resolved it."""
        return resolved(self.params.layer, self.name, "layer")

    def _attach(self, lm: LoadedModel) -> None:
        self._hooks.on_output(lm.adapter.out_proj(self.layer), self._hook)
        self._hooks.on_input(lm.adapter.body(), self._remember_mask, with_kwargs=True)

    def _remember_mask(self, module, args, kwargs):
        self._mask = kwargs.get("attention_mask")

    def token_mask(self, shape: torch.Size) -> torch.Tensor:
        """(batch, seq) bool mask of real tokens for the hooked forward (padding is False)."""
        mask = self._mask
        if mask is None or mask.dim() != 2 or mask.shape[0] != shape[0] or mask.shape[1] < shape[1]:
            return torch.ones(shape[0], shape[1], dtype=torch.bool)
        return mask[:, -shape[1] :].bool().cpu()  # with a KV cache, the mask also covers past positions

    def release(self) -> None:
        self._hooks.remove()
        self._bound_to = None

    def scope(self, lm: LoadedModel) -> list[str]:
        return []  # no weight is ever changed

    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        """Edit the adaptor one fact after another; the weights stay as they are (an empty delta)."""
        self.bind(lm)
        for edit in each_edit(batch, f"{self.name} edits"):
            self.edit_one(lm, edit)
        return Delta.empty()

    def edit_one(self, lm: LoadedModel, edit: Edit):
        raise NotImplementedError

    def _hook(self, module, args, out):
        raise NotImplementedError


class UpperLayers:
    """Answer logits of a collated batch computed from layer ``start`` up.

    While an adaptor at layer ``start`` is trained, nothing below that layer changes: the
    inputs of layer ``start`` are captured once (with every argument the model passes it)
    and each training step runs only layers ``start``.. and the head (6 of SmolLM2's 30
    layers for the default GRACE/WISE layer).
    """

    def __init__(self, lm: LoadedModel, start: int, batch):
        self.lm, self.start, self.batch = lm, start, batch
        with torch.no_grad(), stop_before(lm.adapter.layer(start)) as seen:
            lm.adapter.body()(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
        self.args, self.kwargs = seen[0]

    def answer_logits(self) -> torch.Tensor:
        hidden = self.args[0]
        for i in range(self.start, self.lm.num_layers):
            hidden = self.lm.adapter.layer(i)(hidden, *self.args[1:], **self.kwargs)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        hidden = self.lm.adapter.final_norm()(hidden)
        return self.lm.adapter.unembedding()(hidden[self.batch.rows, self.batch.cols]).float()


def edit_batch(lm: LoadedModel, edit: Edit):
    """The edit's prompt + new target, collated for teacher-forced training (one row)."""
    codec = Codec(lm.tokenizer)
    return codec.collate([codec.encode(edit.rendered_prompt, edit.target_new)], lm.device)


def target_nll(upper: UpperLayers) -> torch.Tensor:
    """Mean NLL of the target tokens of a one-row collated batch (differentiable)."""
    logits = upper.answer_logits()
    return -logits.log_softmax(-1).gather(1, upper.batch.targets[:, None]).mean()


# The WISE/MEMOIR code's context-template starts and the new tokens generated after each (5 and 10).
TEMPLATE_STARTS = ("I", "You", "Because", "Yes", "Q: ")
TEMPLATE_LENGTHS = (5, 10)


def generated_prefixes(lm: LoadedModel) -> list[str]:
    """Greedy continuations of :data:`TEMPLATE_STARTS` by ``lm`` (5, then 10 new tokens each), with
    braces doubled for ``str.format``: the context prefixes the WISE and MEMOIR code train on (their
    ``get_context_templates`` with ``length_params=[[5,5],[10,5]]``, one beam). The caller bypasses
    its own hook while this runs."""
    prefixes = []
    pad = lm.tokenizer.eos_token_id if lm.tokenizer.eos_token_id is not None else 0
    with torch.no_grad():
        for length in TEMPLATE_LENGTHS:
            for start in TEMPLATE_STARTS:
                ids = lm.tokenizer(start, return_tensors="pt").input_ids.to(lm.device)
                # a transformers model's method; nn.Module types attribute access as Tensor | Module
                out = lm.model.generate(  # type: ignore[operator]
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=length,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad,
                )
                # one sequence decodes to one string (the stubs type decode for batches too)
                text = cast(str, lm.tokenizer.decode(out[0], skip_special_tokens=True))
                prefixes.append(text.replace("{", "{{").replace("}", "}}"))
    return prefixes


def label_id(text: str) -> int:
    """A stable 63-bit id of a label string (state must be tensors)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def last_prompt_index(lm: LoadedModel, edit: Edit) -> int:
    return len(Codec(lm.tokenizer).prompt_ids(edit.rendered_prompt)) - 1


__all__: Sequence[str] = (
    "AdaptorEditor",
    "default_adaptor_layer",
    "edit_batch",
    "generated_prefixes",
    "target_nll",
    "label_id",
)
