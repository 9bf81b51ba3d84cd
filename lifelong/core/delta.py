"""What one stream step changed in the model's weights, and where every step is kept.

A :class:`Delta` holds, per parameter, either a dense difference (fine-tuning),
low-rank factors ``U @ V.T`` (ROME is rank one, MEMIT/AlphaEdit rank <= batch), or
a sparse set of whole rows/columns (Knowledge Neurons touch a few value vectors), in
the parameter's storage orientation. Editors change the live model *through*
:meth:`Delta.apply`, so that rebuilding a step from the base plus the stored deltas
performs the same float operations in the same order and gives a bitwise-equal model.

Subtracting a delta again is not bitwise exact in floating point, so exact reverts
go through :class:`DeltaStore`, which keeps the base values of every parameter the
editor may touch and rebuilds any step from them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lifelong.core.durable import make_dirs, publish, writing
from lifelong.core.keep import KeepPolicy
from streams.errors import MissingFileError, UserError

_DENSE, _U, _V, _INDEX, _VALUES, _DIM = "dense", "u", "v", "index", "values", "dim"


@dataclass
class ParamChange:
    """The change of one parameter, in storage orientation: ``dense``; ``u @ v.T``; or sparse,
    ``values`` added to the slices ``index`` (unique, sorted) along dimension ``dim`` of a
    parameter of ``shape`` (``values.shape[dim] == len(index)``)."""

    dense: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    index: torch.Tensor | None = None
    values: torch.Tensor | None = None
    dim: int | torch.Tensor | None = None
    shape: tuple[int, ...] | torch.Tensor | None = None

    def __post_init__(self):
        kinds = [
            self.dense is not None,
            self.u is not None or self.v is not None,
            any(x is not None for x in (self.index, self.values, self.dim, self.shape)),
        ]
        if sum(kinds) != 1 or (kinds[1] and (self.u is None or self.v is None)):
            raise ValueError(
                "a ParamChange is exactly one of dense, low-rank (u and v) or sparse (index, values, dim, shape)"
            )
        if kinds[2]:
            self._check_sparse()

    def _check_sparse(self) -> None:
        if self.index is None or self.values is None or self.dim is None or self.shape is None:
            raise ValueError("a sparse ParamChange needs index, values, dim and shape")
        self.dim = dim = int(self.dim)
        self.shape = shape = tuple(int(n) for n in self.shape)
        self.index = index = self.index.to(torch.long)
        values = self.values
        if index.dim() != 1 or len(shape) != values.dim() or not 0 <= dim < len(shape):
            raise ValueError(f"sparse ParamChange: index must be 1-D and dim {dim} within shape {shape}")
        expected = list(shape)
        expected[dim] = len(index)
        if list(values.shape) != expected:
            raise ValueError(
                f"sparse ParamChange: values have shape {tuple(values.shape)}, "
                f"expected {tuple(expected)} for {len(index)} slices of {shape}"
            )
        if len(index) and (index.min() < 0 or index.max() >= shape[dim] or not bool((index[1:] > index[:-1]).all())):
            raise ValueError(f"sparse ParamChange: index must be sorted, unique and within 0..{shape[dim] - 1}")

    def _sparse_parts(self) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, ...]]:
        """A sparse change's index, values, dim and shape, as ``_check_sparse`` normalized them."""
        index, values, dim, shape = self.index, self.values, self.dim, self.shape
        assert index is not None and values is not None and isinstance(dim, int) and isinstance(shape, tuple)
        return index, values, dim, shape

    def _low_rank_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A low-rank change's u and v (``__post_init__`` refuses one without both)."""
        assert self.u is not None and self.v is not None
        return self.u, self.v

    @property
    def sparse(self) -> bool:
        return self.index is not None

    def materialize(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        if self.sparse:  # zeros elsewhere: x + 0 == x, so adding this is bitwise the sparse add
            index, values, dim, shape = self._sparse_parts()
            full = torch.zeros(shape, dtype=values.dtype, device=values.device)
            return full.index_copy_(dim, index.to(values.device), values)
        u, v = self._low_rank_parts()
        return u @ v.T

    @property
    def rank(self) -> int | None:
        return self.u.shape[1] if self.u is not None else None

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.dense is not None:
            return {_DENSE: self.dense}
        if self.sparse:
            index, values, dim, shape = self._sparse_parts()
            return {_INDEX: index, _VALUES: values, _DIM: torch.tensor(dim), "shape": torch.tensor(shape)}
        u, v = self._low_rank_parts()
        return {_U: u, _V: v}

    @torch.no_grad()
    def add_to(self, param: torch.Tensor, sign: float = 1.0) -> None:
        """``param += sign * change`` in place; a sparse change touches only its slices."""
        if not self.sparse:
            update = self.materialize().to(device=param.device, dtype=param.dtype)
            param.add_(update) if sign > 0 else param.sub_(update)
            return
        index, values, dim, shape = self._sparse_parts()
        if tuple(param.shape) != shape:
            raise ValueError(f"sparse change of shape {shape} applied to a parameter of shape {tuple(param.shape)}")
        index = index.to(param.device)
        values = values.to(device=param.device, dtype=param.dtype)
        current = param.index_select(dim, index)
        param.index_copy_(dim, index, current + values if sign > 0 else current - values)


@dataclass
class Delta:
    """Per-parameter changes made by one editor step, keyed by parameter name."""

    changes: dict[str, ParamChange] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> Delta:
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
            change.add_to(params[name], sign)

    def save(self, path: Path, metadata: dict | None = None) -> None:
        tensors = {
            f"{name}::{kind}": t.detach().to("cpu").contiguous()
            for name, change in self.changes.items()
            for kind, t in change.tensors().items()
        }
        meta = {"lifelong_delta": "1", "extra": json.dumps(metadata or {})}
        atomic_save_tensors(tensors, Path(path), meta)

    @classmethod
    def load(cls, path: Path) -> Delta:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in load_tensors(path).items():
            name, _, kind = key.rpartition("::")
            grouped.setdefault(name, {})[kind] = t
        return cls({name: ParamChange(**parts) for name, parts in grouped.items()})


DIGEST_KEY = "lifelong_blake2b"  # metadata entry: a hash of every tensor's name, dtype, shape and bytes


class DamagedFileError(UserError):
    """A stored file that cannot be read back as written (truncated, or its bytes changed)."""


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        # an ndarray is a buffer, but numpy's stubs do not declare it one (they do only for Python >= 3.12)
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # type: ignore[arg-type]
    return h.hexdigest()


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors write to a temporary name, then rename: a killed run never leaves half a file.
    The file carries a digest of its tensors, which :func:`load_tensors` checks."""
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path, tmp):  # a full disk: one error naming the file (safetensors names none)
        save_file(tensors, str(tmp), metadata={**(metadata or {}), DIGEST_KEY: tensors_digest(tensors)})
    publish(tmp, path)  # flushed before and after the rename: a power cut cannot leave it half-written


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a file :func:`atomic_save_tensors` wrote, refused (naming the file) when it
    is unreadable or its tensors no longer match the digest stored with them."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get(DIGEST_KEY)
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as err:  # safetensors raises several kinds for a truncated or garbled file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DamagedFileError(f"{path}: damaged file, cannot be read ({reason})") from None
    if stored is not None and stored != tensors_digest(tensors):
        raise DamagedFileError(f"{path}: damaged file: its contents no longer match the checksum stored with them")
    return tensors


class StepNotKept(UserError):
    """A checkout of a step whose weights the run's retention policy did not keep."""


class DeltaStore:
    """Per-step deltas and editor state on disk, plus the base values needed for exact checkout.

    ``base`` holds the θ0 values of every parameter the editor may touch (its scope). Under the
    ``all`` policy any step is rebuilt as base + delta_1 + ... + delta_k, applied in order. Under
    any other policy each step also writes a snapshot of the scope's values, and :meth:`prune`
    removes the files of steps the policy does not keep: a kept step checks out bitwise from its
    snapshot, the latest step is always kept (resume), and disk stays bounded by the kept steps.
    Editors whose state is saved incrementally keep every step's state (each is one step's increment).
    """

    def __init__(self, directory: Path, base: dict[str, torch.Tensor], policy: KeepPolicy | str | None = None):
        self.directory = make_dirs(directory)
        self.base = {name: t.detach().clone() for name, t in base.items()}
        self.policy = KeepPolicy.parse(policy)

    @classmethod
    def for_scope(
        cls, directory: Path, model: nn.Module, scope: list[str], policy: KeepPolicy | str | None = None
    ) -> DeltaStore:
        params = dict(model.named_parameters())
        missing = [name for name in scope if name not in params]
        if missing:
            raise KeyError(f"editor scope names unknown parameters: {', '.join(missing)}")
        return cls(directory, {name: params[name] for name in scope}, policy)

    def delta_path(self, step: int) -> Path:
        return self.directory / f"step_{step:06d}.safetensors"

    def state_path(self, step: int) -> Path:
        return self.directory / f"state_{step:06d}.safetensors"

    def snapshot_path(self, step: int) -> Path:
        return self.directory / f"snap_{step:06d}.safetensors"

    def commit(
        self, step: int, delta: Delta, state: dict[str, torch.Tensor] | None = None, model: nn.Module | None = None
    ) -> None:
        """Save step ``step``: its delta, the editor's state, and (under a policy other than
        ``all``) a snapshot of ``model``'s scoped parameters, which must already hold the step."""
        outside = [name for name in delta.changes if name not in self.base]
        if outside:
            raise ValueError(f"step {step}: delta touches parameters outside the editor's scope: {outside}")
        if not self.policy.keeps_all:
            if model is None:
                raise ValueError(f"step {step}: the {self.policy} policy snapshots the model: pass it to commit")
            params = dict(model.named_parameters())
            atomic_save_tensors(
                {name: params[name].detach().cpu().contiguous() for name in self.base}, self.snapshot_path(step)
            )
        delta.save(self.delta_path(step), {"step": step})
        if state:
            atomic_save_tensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, self.state_path(step))
        elif self.state_path(step).exists():
            self.state_path(step).unlink()

    def prune(self, head: int, incremental_state: bool) -> None:
        """Remove what the policy does not keep of the steps before ``head`` (the latest completed step:
        call it only once that step is recorded as complete, so a kill in between loses nothing)."""
        if self.policy.keeps_all:
            return
        for path in self.directory.glob("*_*.safetensors"):
            kind, _, number = path.stem.partition("_")
            step = int(number)
            if step < head and not self.policy.keeps(step, head) and not (kind == "state" and incremental_state):
                path.unlink()

    def kept_steps(self) -> list[int]:
        """The steps that can be checked out, from the files on disk (0, the base, always can)."""
        snaps = {int(p.stem.split("_")[1]) for p in self.directory.glob("snap_*.safetensors")}
        deltas = {int(p.stem.split("_")[1]) for p in self.directory.glob("step_*.safetensors")}
        run = 0
        while run + 1 in deltas:
            run += 1
        return sorted({0, *range(1, run + 1), *snaps})

    def load_delta(self, step: int) -> Delta:
        path = self.delta_path(step)
        if not path.is_file():
            raise MissingFileError(f"{path}: no delta stored for step {step}")
        return Delta.load(path)

    def load_state(self, step: int) -> dict[str, torch.Tensor]:
        path = self.state_path(step)
        return load_tensors(path) if step > 0 and path.is_file() else {}

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

    @torch.no_grad()
    def checkout(self, model: nn.Module, step: int) -> None:
        """Put ``model`` in the state it had right after ``step`` (0 = the base): from the step's
        snapshot when there is one, else base + every delta up to it. A store made with an empty
        base takes ``model`` to be the base (a freshly loaded model)."""
        snapshot = self.snapshot_path(step)
        if step > 0 and snapshot.is_file():
            params = dict(model.named_parameters())
            for name, value in load_tensors(snapshot).items():
                params[name].copy_(value)
            return
        missing = [k for k in range(1, step + 1) if not self.delta_path(k).is_file()]
        if missing:
            kept = self.kept_steps()
            shown = ", ".join(map(str, kept[:12])) + (f", ... {kept[-1]}" if len(kept) > 12 else "")
            raise StepNotKept(
                f"{self.directory.parent}: step {step} was not kept (this run keeps deltas "
                f"{self.policy}); steps that can be checked out: {shown}"
            )
        self.revert_to_base(model)
        for k in range(1, step + 1):
            self.load_delta(k).apply(model)

    def nbytes_on_disk(self, step: int) -> int:
        paths = (self.delta_path(step), self.state_path(step), self.snapshot_path(step))
        return sum(p.stat().st_size for p in paths if p.exists())

    def nbytes_total(self) -> int:
        """Bytes of every delta, state and snapshot file the store holds now."""
        return sum(p.stat().st_size for p in self.directory.glob("*_*.safetensors"))

    def discard_after(self, step: int) -> None:
        """Remove deltas, state and snapshots of steps after ``step`` (leftovers of a killed run)."""
        for path in self.directory.glob("*_*.safetensors"):
            if int(path.stem.split("_")[-1]) > step:
                path.unlink()
