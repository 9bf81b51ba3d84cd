"""Which steps of a run stay available for checkout: the ``--keep-deltas`` policy.

Torch-free, so the command line can refuse a bad policy before loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.errors import UserError


@dataclass(frozen=True)
class KeepPolicy:
    """Which steps a run keeps for checkout (``--keep-deltas``): ``all`` (every step's delta: the
    default), ``every:K`` (steps K, 2K, ...), ``last:N`` (the N most recent), ``log`` (steps 1, 2, 4,
    8, ...). The latest completed step is always kept, so a killed run resumes exactly."""

    kind: str = "all"
    n: int = 0

    KINDS = ("all", "every", "last", "log")

    @classmethod
    def parse(cls, spec: str | KeepPolicy | None) -> KeepPolicy:
        if isinstance(spec, KeepPolicy):
            return spec
        text = (spec or "all").strip()
        kind, _, arg = text.partition(":")
        if kind in ("all", "log") and not arg:
            return cls(kind)
        if kind in ("every", "last") and arg.isdigit() and int(arg) >= 1:
            return cls(kind, int(arg))
        raise UserError(f"--keep-deltas {text!r}: expected all, log, every:K or last:N (K, N >= 1)")

    def __str__(self) -> str:
        return self.kind if self.kind in ("all", "log") else f"{self.kind}:{self.n}"

    @property
    def keeps_all(self) -> bool:
        return self.kind == "all"

    def keeps(self, step: int, head: int) -> bool:
        """Whether ``step`` stays available for checkout once the run has completed step ``head``."""
        if self.kind == "all" or step == head or step <= 0:
            return True
        if self.kind == "every":
            return step % self.n == 0
        if self.kind == "last":
            return step > head - self.n
        return step & (step - 1) == 0  # log: powers of two
