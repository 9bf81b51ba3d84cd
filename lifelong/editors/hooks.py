"""Forward hooks, registered in one place so that none outlives its use.

Every hook an editor puts on a model goes through :class:`Hooks`, which owns the handles:
used as a ``with`` block it removes them on the way out, whatever the block raised; kept
(an adaptor installed until released) it removes them on :meth:`Hooks.remove`. Hook
functions have PyTorch's signatures: ``fn(module, args, out)`` after a forward,
``fn(module, args)`` (or ``fn(module, args, kwargs)`` with ``with_kwargs``) before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; :func:`stop_after` and :func:`stop_before` catch their own."""


class Hooks:
    """Hook handles removed together. Methods return ``self`` so registrations chain; prefer
    ``with Hooks() as hooks: hooks.on_output(...)`` so that a registration failing half-way
    still removes the ones before it."""

    def __init__(self):
        self._handles: list = []

    def on_output(self, module: nn.Module, fn: Callable) -> Hooks:
        """``fn(module, args, out)`` after each forward of ``module``; a non-None return replaces the output."""
        self._handles.append(module.register_forward_hook(fn))
        return self

    def on_input(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False) -> Hooks:
        """``fn(module, args)`` before each forward of ``module`` (``fn(module, args, kwargs)`` with ``with_kwargs``);
        a non-None return replaces the inputs (``args``, or ``(args, kwargs)`` with ``with_kwargs``)."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))
        return self

    def add_to_output(self, module: nn.Module, fn: Callable) -> Hooks:
        """The output of ``module`` becomes ``out + fn(module, args, out)`` (differentiable)."""
        return self.on_output(module, lambda mod, args, out: out + fn(mod, args, out))

    def remove(self) -> None:
        """Detach every hook registered so far (safe to call twice; the object can be reused)."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def first_input(module: nn.Module, args: tuple, out: Any) -> torch.Tensor:
    """A :func:`capture` pick: the module's first positional input, detached."""
    return args[0].detach()


def output(module: nn.Module, args: tuple, out: Any) -> Any:
    """A :func:`capture` pick: the module's output, detached when it is a tensor."""
    return out.detach() if isinstance(out, torch.Tensor) else out


@contextmanager
def capture(module: nn.Module, pick: Callable = first_input) -> Iterator[list]:
    """Within the block, each forward of ``module`` appends ``pick(module, args, out)`` to the yielded list."""
    seen: list = []
    with Hooks().on_output(module, lambda mod, args, out: seen.append(pick(mod, args, out))):
        yield seen


@contextmanager
def stop_after(module: nn.Module, pick: Callable | None = None) -> Iterator[list]:
    """Within the block, a forward pass ends once ``module`` has run (the block goes on after the
    call that ran it); ``pick(module, args, out)``, when given, is appended to the yielded list first.
    Saves the layers a pass does not need (everything above the one whose output is wanted)."""
    seen: list = []
    token = object()  # marks this block's own stop: a nested helper's is not swallowed here

    def hook(mod, args, out):
        if pick is not None:
            seen.append(pick(mod, args, out))
        raise StopForward(token)  # fresh each time: no cycle keeps the pass's frames alive

    with Hooks().on_output(module, hook):
        try:
            yield seen
        except StopForward as err:
            if err.args != (token,):
                raise


@contextmanager
def stop_before(module: nn.Module) -> Iterator[list[tuple[tuple, dict]]]:
    """Within the block, a forward pass ends on entering ``module``, whose ``(args, kwargs)``
    are appended to the yielded list: the exact inputs to rerun it (and what follows) from."""
    seen: list = []
    token = object()

    def hook(mod, args, kwargs):
        seen.append((args, kwargs))
        raise StopForward(token)

    with Hooks().on_input(module, hook, with_kwargs=True):
        try:
            yield seen
        except StopForward as err:
            if err.args != (token,):
                raise


__all__ = ("Hooks", "StopForward", "capture", "first_input", "output", "stop_after", "stop_before")
