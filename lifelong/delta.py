"""What one stream step changed in the model's weights, and where every step is kept.

A :class:`Delta` holds, per parameter, either a dense difference (fine-tuning) or
low-rank factors ``U @ V.T`` (ROME is rank one, MEMIT/AlphaEdit rank <= batch), in
the parameter's storage orientation. Editors change the live model *through*
:meth:`Delta.apply`, so that rebuilding a step from the base plus the stored deltas
performs the same float operations in the same order and gives a bitwise-equal model.

Subtracting a delta again is not bitwise exact in floating point, so exact reverts
go through :class:`DeltaStore`, which keeps the base values of every parameter the
editor may touch and rebuilds any step from them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

_DENSE, _U, _V = "dense", "u", "v"


@dataclass
class ParamChange:
    """The change of one parameter: ``dense``, or ``u @ v.T`` (storage orientation)."""

    dense: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def __post_init__(self):
        if (self.dense is None) == (self.u is None or self.v is None):
            raise ValueError("a ParamChange is either dense or low-rank (u and v), not both or neither")

    def materialize(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.u @ self.v.T

    @property
    def rank(self) -> int | None:
        return None if self.dense is not None else self.u.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.dense is not None:
            return {_DENSE: self.dense}
        return {_U: self.u, _V: self.v}


@dataclass
class Delta:
    """Per-parameter changes made by one editor step, keyed by parameter name."""

    changes: dict[str, ParamChange] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> "Delta":
        return cls({})

    def __bool__(self) -> bool:
        return bool(self.changes)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self.changes.values() for t in c.tensors().values())

    def apply(self, model: nn.Module) -> None:
        self._add(model, 1.0)

    def revert(self, model: nn.Module) -> None:
        """Subtract this delta (approximate in float; use DeltaStore.checkout for exact)."""
        self._add(model, -1.0)

    @torch.no_grad()
    def _add(self, model: nn.Module, sign: float) -> None:
        params = dict(model.named_parameters())
        for name, change in self.changes.items():
            p = params[name]
            update = change.materialize().to(device=p.device, dtype=p.dtype)
            p.add_(update) if sign > 0 else p.sub_(update)

    def save(self, path: Path, metadata: dict | None = None) -> None:
        tensors = {
            f"{name}::{kind}": t.detach().to("cpu").contiguous()
            for name, change in self.changes.items()
            for kind, t in change.tensors().items()
        }
        meta = {"lifelong_delta": "1", "extra": json.dumps(metadata or {})}
        atomic_save_tensors(tensors, Path(path), meta)

    @classmethod
    def load(cls, path: Path) -> "Delta":
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in load_file(str(path)).items():
            name, _, kind = key.rpartition("::")
            grouped.setdefault(name, {})[kind] = t
        return cls({name: ParamChange(**parts) for name, parts in grouped.items()})


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors write to a temporary name, then rename: a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class DeltaStore:
    """Per-step deltas and editor state on disk, plus the base values needed for exact checkout.

    ``base`` holds the θ0 values of every parameter the editor may touch (its scope);
    any step is rebuilt as base + delta_1 + ... + delta_k, applied in order.
    """

    def __init__(self, directory: Path, base: dict[str, torch.Tensor]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.base = {name: t.detach().clone() for name, t in base.items()}

    @classmethod
    def for_scope(cls, directory: Path, model: nn.Module, scope: list[str]) -> "DeltaStore":
        params = dict(model.named_parameters())
        missing = [name for name in scope if name not in params]
        if missing:
            raise KeyError(f"editor scope names unknown parameters: {', '.join(missing)}")
        return cls(directory, {name: params[name] for name in scope})

    def delta_path(self, step: int) -> Path:
        return self.directory / f"step_{step:06d}.safetensors"

    def state_path(self, step: int) -> Path:
        return self.directory / f"state_{step:06d}.safetensors"

    def commit(self, step: int, delta: Delta, state: dict[str, torch.Tensor] | None = None) -> None:
        outside = [name for name in delta.changes if name not in self.base]
        if outside:
            raise ValueError(f"step {step}: delta touches parameters outside the editor's scope: {outside}")
        delta.save(self.delta_path(step), {"step": step})
        if state:
            atomic_save_tensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, self.state_path(step))
        elif self.state_path(step).exists():
            self.state_path(step).unlink()

    def load_delta(self, step: int) -> Delta:
        path = self.delta_path(step)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no delta stored for step {step}")
        return Delta.load(path)

    def load_state(self, step: int) -> dict[str, torch.Tensor]:
        path = self.state_path(step)
        return load_file(str(path)) if step > 0 and path.is_file() else {}

    def step_states(self, step: int, incremental: bool) -> list[dict[str, torch.Tensor]]:
        """The saved editor states needed to restore ``step``: 1..step if ``incremental``, else step's own."""
        if step <= 0:
            return []
        return [self.load_state(k) for k in range(1, step + 1)] if incremental else [self.load_state(step)]

    @torch.no_grad()
    def revert_to_base(self, model: nn.Module) -> None:
        """Restore every scoped parameter to its θ0 value, bitwise."""
        params = dict(model.named_parameters())
        for name, value in self.base.items():
            params[name].copy_(value)

    def checkout(self, model: nn.Module, step: int) -> None:
        """Put ``model`` in the state it had right after ``step`` (0 = the base)."""
        self.revert_to_base(model)
        for k in range(1, step + 1):
            self.load_delta(k).apply(model)

    def nbytes_on_disk(self, step: int) -> int:
        return sum(p.stat().st_size for p in (self.delta_path(step), self.state_path(step)) if p.exists())

    def discard_after(self, step: int) -> None:
        """Remove deltas and state of steps after ``step`` (leftovers of a killed run)."""
        for path in self.directory.glob("*_*.safetensors"):
            if int(path.stem.split("_")[-1]) > step:
                path.unlink()
