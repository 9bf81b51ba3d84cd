"""The RLEdit editor: applies a hypernetwork trained over edit sequences (:mod:`lifelong.editors.rledit.training`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lifelong.core.delta import Delta, ParamChange
from lifelong.core.models import LoadedModel
from lifelong.editors.base import Editor
from lifelong.editors.mend.editor import checked_hypernetwork, refuse_training_overlap
from lifelong.editors.rledit.network import (
    Hypernetwork,
    edit_targets,
    keys_and_grads,
    resolve_layers,
    resolve_params,
    target_param_name,
)
from lifelong.editors.rledit.training import (
    hypernet_dir,
    load_hypernetwork,
    training_preset,
    training_summary,
)
from streams import Edit


@dataclass
class RLEditParams:
    layers: str = ""  # e.g. "20-28" or "all"; empty: the nine layers before the last (the authors' 22-30 of 32)
    params: str = ""  # edited MLP projections, comma-separated; empty: gate,up (up alone without a gate)
    train_data: str = "split:counterfact"  # the hypernetwork's training data (CounterFact's training split)
    training: str = "published"  # its training settings: published (the authors') or cpu-capped (a CPU cap)
    hypernet: str = ""  # an explicit hypernetwork file instead of the cached one


class RLEditEditor(Editor[RLEditParams]):
    name = "rledit"
    description = (
        "RLEdit: a hypernetwork trained over whole edit sequences maps edit gradients to a least-squares update"
    )
    Params = RLEditParams

    def __init__(self, params=None):
        super().__init__(params)
        self._net: Hypernetwork | None = None
        self._meta: dict = {}
        self._initial: dict[str, torch.Tensor] = {}  # the normaliser as trained (the state before any edit)
        self._pending: dict[str, torch.Tensor] | None = None

    def layers(self, lm: LoadedModel) -> list[int]:
        return resolve_layers(self.params.layers, lm.num_layers)

    def kinds(self, lm: LoadedModel) -> tuple[str, ...]:
        return resolve_params(self.params.params, lm.adapter)

    def hypernet_path(self, lm: LoadedModel) -> Path:
        if self.params.hypernet:
            return Path(self.params.hypernet)
        config = training_preset(self.params.training)
        return (
            hypernet_dir(lm, self.layers(lm), self.params.train_data, self.kinds(lm), config) / "hypernet.safetensors"
        )

    def bind(self, lm: LoadedModel) -> RLEditEditor:
        layers, kinds = self.layers(lm), self.kinds(lm)
        self.params = dataclasses.replace(self.params, layers=",".join(map(str, layers)), params=",".join(kinds))
        if self._net is None:
            path = self.hypernet_path(lm)
            targets = edit_targets(layers, kinds)
            net, meta = checked_hypernetwork(
                "RLEdit", "train-rledit", lm, layers, kinds, self.params, path, load_hypernetwork, targets
            )
            self._net, self._meta, self._initial = net, meta, net.normaliser_state()
            if self.params.hypernet:  # a given file: record the settings it was trained with
                self.params = dataclasses.replace(self.params, training=meta["training"]["preset"])
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)
        return self

    def hyperparameters(self) -> dict:
        out = asdict(self.params)
        if self._meta:
            out["hypernet_identity"] = self._meta["identity"]
            out["hypernet_steps"] = self._meta["steps"]
            out["hypernet_training"] = training_summary(self._meta)  # shown by `show` beside every figure
        return out

    # the normaliser keeps accumulating the edits' keys and gradients (the authors' cache()): editor state
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._net is None:
            return {}
        return {f"norm.{k}": v for k, v in self._net.normaliser_state().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        bad = [k for k in state if not k.startswith("norm.")]
        if bad:
            raise ValueError(f"rledit: unexpected state entry '{bad[0]}'")
        if self._net is None:
            self._pending = dict(state)
            return
        own = {k[len("norm.") :]: v for k, v in state.items()} or self._initial
        if set(own) != set(self._initial):
            raise ValueError(f"rledit: state has normaliser entries {sorted(own)}, expected {sorted(self._initial)}")
        self._net.load_normaliser_state({k: v.clone() for k, v in own.items()})

    def check_stream(self, stream: Sequence[Edit]) -> None:
        """Refuse an evaluation stream that shares a (subject, prompt) with the training records."""
        if self._net is None:
            raise RuntimeError("RLEditEditor.check_stream needs bind(lm) first")
        refuse_training_overlap("RLEdit", "train-rledit", self._meta, stream)

    def scope(self, lm: LoadedModel) -> list[str]:
        return [target_param_name(lm, t) for t in edit_targets(self.layers(lm), self.kinds(lm))]

    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        if not batch:
            return Delta.empty()
        self.bind(lm)
        net = self._net
        assert net is not None  # bind() loads it or raises
        kd = keys_and_grads(lm, net, [(e.rendered_prompt, e.target_new) for e in batch], self._meta["chunk"])
        changes = {}
        with torch.no_grad():
            for i, (target, (k, d)) in enumerate(zip(net.targets, kd)):
                shift = net.shift(i, k, d)  # ΔWᵀ (in, out)
                name = target_param_name(lm, target)
                dense = shift if lm.adapter.spec.transposed else shift.T
                changes[name] = ParamChange(dense=dense.to(lm.model.get_parameter(name).dtype).contiguous())
        out = Delta(changes)
        out.apply(lm.model)
        return out
