"""The editor contract (docs/DESIGN.md §3) and typed hyperparameters.

An editor changes the live model in place for one batch of edits and returns the
:class:`~lifelong.core.delta.Delta` of exactly what it changed. Anything it carries
from step to step (accumulated keys, a codebook, cached statistics) goes through
``state_dict``/``load_state_dict`` so runs can resume and check out any step.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, Generic, TypeVar

import torch

from lifelong.core.delta import Delta, ParamChange
from lifelong.core.machine import choose_dtype
from lifelong.core.memory import step_estimate
from lifelong.core.models import LoadedModel
from lifelong.core.options import check_range, parse_options
from streams import Edit
from streams.errors import UserError


class HyperparameterError(UserError):
    """A ``--set key=value`` override that does not fit the editor's hyperparameters."""


def parse_overrides(params_cls: type, overrides: dict[str, str] | None, editor: str):
    """Build ``params_cls`` from string overrides (CLI ``--set key=value``), converting types."""
    return parse_options(params_cls, overrides, editor, HyperparameterError, "hyperparameter", "editor")


def validate_params(params, editor: str) -> None:
    """Every setting's declared range (lifelong.core.options' tables: the same check ``--set`` gets, so
    Params built in Python are held to it too), then the Params class's own ``validate(editor)``."""
    if dataclasses.is_dataclass(params):
        for f in dataclasses.fields(params):
            check_range(f.name, getattr(params, f.name), f"{editor}.{f.name}", HyperparameterError)
    validate = getattr(params, "validate", None)
    if callable(validate):
        validate(editor)


T = TypeVar("T")


def resolved(value: T | None, editor: str, setting: str) -> T:
    """A setting whose None means "the model's default", as ``bind`` (or the constructor) resolved it;
    a clear error where it is read before then. Typed accessors use it so mypy sees the resolved type."""
    if value is None:
        raise RuntimeError(f"{editor}: '{setting}' is resolved by bind(lm): bind the editor to a model first")
    return value


def default_layer(num_layers: int) -> int:
    """An early-middle layer, where causal tracing (ROME/MEMIT) finds factual recall in
    the MLPs, scaled to depth: layer 6 of SmolLM2's 30, which took 6/6 trial FT edits at
    lr = bound = 1e-2 where layers 3 and 10 kept fewer of them to the end."""
    return num_layers // 5


def resolve_layer(layer: int | None, lm: LoadedModel, editor: str) -> int:
    """``layer``, or the default for ``lm`` when None; refused when outside the model."""
    layer = default_layer(lm.num_layers) if layer is None else layer
    if not 0 <= layer < lm.num_layers:
        raise UserError(f"{editor}: layer {layer} out of range for a {lm.num_layers}-layer model")
    return layer


def from_hparams_file(params, lm: LoadedModel, family_files: dict[str, str], files: dict[str, dict], editor: str):
    """``params`` with every setting left at None taken from an original's hparams file: the one
    ``family_files`` names for ``lm``'s family when ``params.hparams`` is "family" (a family without
    one gets "none", this project's own defaults), else the file ``params.hparams`` names. The file's
    name replaces "family" in ``hparams`` (so the manifest records it) and the layer is resolved for
    ``lm``; a file's layer beyond a smaller model of the family gives way to num_layers // 5."""
    name = family_files.get(lm.adapter.family, "none") if params.hparams == "family" else params.hparams
    filled = {k: v for k, v in files[name].items() if getattr(params, k) is None}
    if filled.get("layer") is not None and filled["layer"] >= lm.num_layers:
        filled["layer"] = None
    params = dataclasses.replace(params, hparams=name, **filled)
    return dataclasses.replace(params, layer=resolve_layer(params.layer, lm, editor))


def check_hparams_name(hparams: str, files: dict[str, dict], editor: str) -> None:
    """Refuse an ``hparams`` setting that is neither "family" nor a known file's name."""
    if hparams != "family" and hparams not in files:
        raise HyperparameterError(f"{editor}: hparams must be 'family' or one of {', '.join(files)}, got '{hparams}'")


def parse_layers(
    spec: str | int | None, num_layers: int, editor: str, default: Callable[[int], list[int]] | None = None
) -> list[int]:
    """Every editor's layer-range spelling: None or '' -> ``default(num_layers)``; 'all'; '6'; '4-8';
    '4,5,6'; or a mix ('1-2,7') -> those layers, sorted, each once, checked against the model."""
    text = "" if spec is None else str(spec).strip()
    if not text:
        if default is None:
            raise UserError(f"{editor}: layers must be given (e.g. '6', '4-8', '4,5,6' or 'all')")
        return default(num_layers)
    if text == "all":
        return list(range(num_layers))
    layers: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            layers.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise UserError(f"{editor}: cannot read layers '{spec}': expected e.g. '6', '4-8', '4,5,6' or 'all'") from None
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad or not layers:
        raise UserError(f"{editor}: layers '{spec}' out of range for a {num_layers}-layer model")
    return sorted(set(layers))


def each_edit(batch: Sequence[Edit], what: str) -> Sequence[Edit]:
    """``batch``, with a transient progress bar (ETA) under the replay's when it holds several edits:
    a step of 100 MEMIT edits takes minutes, and the step bar alone would not move. Silenced by
    ``--quiet`` (TQDM_DISABLE) like every bar."""
    if len(batch) < 2:
        return batch
    from lifelong.core.bars import bar

    return bar(batch, desc=f"  {what}", unit="edit", leave=False)


class Snapshot:
    """The values of some parameters before an editor's step, for re-applying the step as one Delta.

    Editors that change weights as they go (optimiser steps, one fact after another) end the step
    with :meth:`restore_and_apply`: the weights go back to these values and the step's whole change
    is added through :meth:`Delta.apply`, the very float operations a checkout (base + deltas) repeats,
    so the edited model and its checkout are bitwise equal."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]):
        self.model = model
        self.values = {name: model.get_parameter(name).detach().clone() for name in names}

    def __getitem__(self, name: str) -> torch.Tensor:
        """The value ``name`` had when the snapshot was taken."""
        return self.values[name]

    def restore_and_apply(self, changes: dict[str, ParamChange]) -> Delta:
        """Put every snapshotted parameter back, then apply ``changes`` (computed from the edited
        weights beforehand) as one :class:`Delta`, which is returned."""
        with torch.no_grad():
            for name, value in self.values.items():
                self.model.get_parameter(name).copy_(value)
        delta = Delta(changes)
        delta.apply(self.model)
        return delta


P = TypeVar("P")  # an editor's Params: ``class ROMEEditor(Editor[ROMEParams])`` types ``self.params``


class Editor(ABC, Generic[P]):
    """Base class of every editor: subclasses set ``name``, ``Params`` and implement ``apply``.

    ``self.params`` has the editor's Params type (``Editor[MyParams]``), so mypy refuses a misspelt
    setting; a setting that ``bind`` resolves (``layer: int | None``) is read through a typed accessor
    built on :func:`resolved` (e.g. ``FTEditor.layer``)."""

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type]
    adaptor: ClassVar[bool] = False  # True: edits live outside the weights (hooks, prompts), in editor state

    def __init__(self, params: P | None = None):
        self.params: P = params if params is not None else self.Params()
        # The one place settings are checked: at construction, before any model is loaded. A Params
        # class checks what it can without a model in ``validate(editor)``; bind() checks only what
        # needs the model (layer ranges, the model's weights).
        validate_params(self.params, getattr(self, "name", type(self).__name__))

    @abstractmethod
    def scope(self, lm: LoadedModel) -> list[str]:
        """Names of the parameters this editor may change (everything else must stay bitwise equal)."""

    @abstractmethod
    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        """Edit ``lm.model`` in place for ``batch`` and return exactly what changed."""

    # True when each step's saved state holds only what that step added (so run directories
    # grow linearly, not quadratically); restoring step k then reads the states of steps 1..k.
    incremental_state: ClassVar[bool] = False

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole state carried between steps (in memory)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"editor '{self.name}' carries no state but was given {sorted(state)}")

    def step_state(self) -> dict[str, torch.Tensor]:
        """What the delta store saves with a step: the whole state, or this step's increment."""
        return self.state_dict()

    def load_step_states(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Restore from saved step states: steps 1..k when ``incremental_state``, else step k only."""
        self.load_state_dict(states[-1] if states else {})

    def bind(self, lm: LoadedModel) -> Editor:
        """Fill model-dependent defaults (e.g. ``layer=None``) for ``lm``; returns self."""
        return self

    def prepare(self, lm: LoadedModel) -> None:
        """Compute what must come from the base model θ0 (e.g. key covariance statistics).

        The replay calls it on θ0 before the first step and before checking out a step
        to resume; editors also call it at the start of ``apply`` (it must be idempotent).
        """

    def prompt_rewriter(self, lm: LoadedModel):
        """A function mapping a list of probe prompts to the prompts the model sees, or None (unchanged)."""
        return None

    def release(self) -> None:
        """Detach whatever ``bind`` attached to a model (hooks); editors without any need nothing."""

    def memory_estimate(self, lm: LoadedModel, batch: Sequence[Edit]) -> int:
        """Bytes a step applying ``batch`` may hold at its peak beyond the model, checked against the
        memory available before the step starts. Generic and conservative (:mod:`lifelong.core.memory`);
        an editor that knows its own cost may override it (it must stay cheap: no forward pass)."""
        return step_estimate(lm.model, self.scope(lm), batch)

    def check_stream(self, stream: Sequence[Edit]) -> None:
        """Raise ValueError for a stream this editor must not be evaluated on (e.g. its own training
        records, for a trained editor); called by the replay after ``bind``. Default: any stream."""

    def step_report(self) -> dict:
        """Figures about the last ``apply`` (e.g. how its v* fits ended), written with the step's
        line in ``steps.jsonl`` under ``editor``; {} (nothing written) by default."""
        return {}

    def numerics(self, lm: LoadedModel) -> dict:
        """Each compute-precision setting (a ``*_dtype`` hyperparameter, e.g. ``v_dtype=auto``) as
        it resolves on ``lm``'s device, with the reason: recorded in run manifests."""
        if not dataclasses.is_dataclass(self.params):
            return {}
        return {
            f.name: choose_dtype(getattr(self.params, f.name), lm.device, f"{self.name}: {f.name}").describe()
            for f in dataclasses.fields(self.params)
            if f.name.endswith("_dtype")
        }

    # The method's numerically sensitive parts and the dtype each is computed in whatever the weights'
    # (as the originals do): a dtype name, or the name of a ``*_dtype`` setting, resolved on the model.
    precision_parts: ClassVar[dict[str, str]] = {}

    def precision(self, lm: LoadedModel) -> dict[str, str]:
        """The dtype of the weights and of each of :attr:`precision_parts` as this editor computes it
        on ``lm`` (settings such as ``v_dtype=auto`` as they resolve): recorded in run manifests."""
        resolved = {name: info["dtype"] for name, info in self.numerics(lm).items()}
        weights = next(lm.model.parameters()).dtype
        out = {"weights": str(weights).removeprefix("torch.")}
        out.update({part: resolved.get(dtype, dtype) for part, dtype in self.precision_parts.items()})
        return out

    def hyperparameters(self) -> dict:
        """The hyperparameters recorded in run manifests ({} when ``Params`` is not a dataclass)."""
        params = self.params
        return dataclasses.asdict(params) if dataclasses.is_dataclass(params) and not isinstance(params, type) else {}
