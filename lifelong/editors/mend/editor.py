"""The MEND editor: applies a trained hypernetwork (see :mod:`lifelong.editors.mend.training`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lifelong.core.delta import Delta
from lifelong.core.models import LoadedModel
from lifelong.editors.base import Editor
from lifelong.editors.locate import lowrank_change
from lifelong.editors.mend.network import (
    Hypernetwork,
    edit_gradient_factors,
    edit_targets,
    resolve_layers,
    resolve_params,
    target_param_name,
)
from lifelong.editors.mend.training import (
    hypernet_dir,
    load_hypernetwork,
    model_key,
    record_keys,
    training_preset,
    training_summary,
)
from streams import Edit
from streams.errors import MissingFileError, UserError

# CounterFact's training split (the data set the reproduction edits), less the evaluated records' subjects
DEFAULT_TRAIN_DATA = "split:counterfact"


@dataclass
class MENDParams:
    layers: str = ""  # e.g. "27-29", "28,29" or "all"; empty: the last three layers
    # edited MLP weights of each layer: comma-separated gate, up, down; empty: all of them (gate,up,down
    # for Llama-style MLPs, up,down = c_fc,c_proj for GPT-2); "down": the former down-only editor
    params: str = ""
    train_data: str = DEFAULT_TRAIN_DATA  # the hypernetwork's training data: split:counterfact, split:zsre or streams
    training: str = "published"  # its training settings: published (the toolkit's Llama file) or cpu-small (former)
    hypernet: str = ""  # an explicit hypernetwork file instead of the cached one


def _describe(targets: Sequence[tuple[int, str]]) -> str:
    return " ".join(f"{layer}.{kind}" for layer, kind in targets)


def refuse_training_overlap(method: str, command: str, meta: dict, stream: Sequence[Edit]) -> None:
    """Refuse an evaluation stream that shares a (subject, prompt) with a hypernetwork's training records."""
    trained = set(meta["train_keys"])
    clashes = [e for e in stream if record_keys(e) & trained]
    if clashes:
        e = clashes[0]
        raise OverlapError(
            f"evaluation stream overlaps the {method} hypernetwork's training records "
            f"({meta['identity']['data']}): {len(clashes)} of {len(stream)} edits share a subject+prompt, "
            f"e.g. {e.id} {e.rendered_prompt!r}; evaluate on other records or {command} on other data"
        )


def checked_hypernetwork(method: str, command: str, lm: LoadedModel, layers, kinds, params, path: Path, load, targets):
    """(network, its metadata) from ``path``, refused in one line when absent (naming the ``lifelong
    command`` that trains it) or trained for other weights or, unless given by file, another model.
    ``params`` carries train_data, training and hypernet; ``load(path, device)`` reads the file; ``targets``:
    the (layer, projection) list the editor edits, in its network's order."""
    if not path.is_file():
        spec = ",".join(map(str, layers))
        raise MissingFileError(
            f"no trained {method} hypernetwork for model '{lm.name}', layers {spec}, params {','.join(kinds)}, "
            f"data '{params.train_data}' (looked in {path}): run `lifelong {command} --model {lm.name} "
            f"--layers {spec} --params {','.join(kinds)} --data {params.train_data} "
            f"--training {params.training}` first"
        )
    net, meta = load(path, lm.device)
    other_model = not params.hypernet and meta["identity"]["model"] != model_key(lm)
    if net.targets != targets or other_model:
        raise UserError(
            f"{path}: {method} hypernetwork trained for model {meta['identity']['model']} weights "
            f"{_describe(net.targets)}, not {model_key(lm)} weights {_describe(targets)}"
        )
    return net, meta


class OverlapError(UserError):
    """The evaluation stream shares records with the hypernetwork's training data."""


class MENDEditor(Editor[MENDParams]):
    name = "mend"
    description = "MEND: a trained hypernetwork maps the edit's rank-one gradient factors to a low-rank update"
    Params = MENDParams

    def __init__(self, params=None):
        super().__init__(params)
        self._net: Hypernetwork | None = None
        self._meta: dict = {}
        self._weights: list[str] = []

    def layers(self, lm: LoadedModel) -> list[int]:
        return resolve_layers(self.params.layers, lm.num_layers, self.name)

    def kinds(self, lm: LoadedModel) -> tuple[str, ...]:
        return resolve_params(self.params.params, lm.adapter, self.name)

    def targets(self, lm: LoadedModel) -> list[tuple[int, str]]:
        return edit_targets(self.layers(lm), self.kinds(lm))

    def hypernet_path(self, lm: LoadedModel) -> Path:
        if self.params.hypernet:
            return Path(self.params.hypernet)
        config = training_preset(self.params.training)
        return (
            hypernet_dir(lm, self.layers(lm), self.params.train_data, self.kinds(lm), config) / "hypernet.safetensors"
        )

    def bind(self, lm: LoadedModel) -> MENDEditor:
        layers, kinds = self.layers(lm), self.kinds(lm)
        # the resolved edited weights go to the manifest: layers and params by role, edited_weights by name
        self.params = dataclasses.replace(self.params, layers=",".join(map(str, layers)), params=",".join(kinds))
        self._weights = [target_param_name(lm, t) for t in edit_targets(layers, kinds)]
        if self._net is not None:
            return self
        path = self.hypernet_path(lm)
        net, meta = checked_hypernetwork(
            "MEND", "train-mend", lm, layers, kinds, self.params, path, load_hypernetwork, edit_targets(layers, kinds)
        )
        self._net, self._meta = net, meta
        if self.params.hypernet and "training" in meta:  # a given file: record the settings it was trained with
            self.params = dataclasses.replace(self.params, training=meta["training"]["preset"])
        return self

    def hyperparameters(self) -> dict:
        out = asdict(self.params)
        if self._weights:
            out["edited_weights"] = list(self._weights)
        if self._meta:  # what the run used: the hypernetwork's training set-up
            out["hypernet_identity"] = self._meta["identity"]
            out["hypernet_steps"] = self._meta["steps"]
            out["hypernet_training"] = training_summary(self._meta)  # shown by `show` beside every MEND figure
        return out

    def check_stream(self, stream: Sequence[Edit]) -> None:
        """Refuse an evaluation stream that shares a (subject, prompt) with the training records."""
        if self._net is None:
            raise RuntimeError("MENDEditor.check_stream needs bind(lm) first")
        refuse_training_overlap("MEND", "train-mend", self._meta, stream)

    def scope(self, lm: LoadedModel) -> list[str]:
        return [target_param_name(lm, t) for t in self.targets(lm)]

    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        if not batch:
            return Delta.empty()
        self.bind(lm)
        net = self._net
        assert net is not None  # bind() loads it or raises
        grads = edit_gradient_factors(lm, net.targets, [(e.rendered_prompt, e.target_new) for e in batch])
        changes = {}
        with torch.no_grad():
            for i, (target, (u, delta)) in enumerate(zip(net.targets, grads)):
                left, right = net.factors(i, u, delta)
                name = target_param_name(lm, target)
                changes[name] = lowrank_change(lm.adapter, left, right, lm.model.get_parameter(name).dtype)
        out = Delta(changes)
        out.apply(lm.model)
        return out
