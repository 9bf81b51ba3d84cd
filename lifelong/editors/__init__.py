"""The editor registry, built from the one list of editors in :mod:`lifelong.names`."""

from __future__ import annotations

import importlib

from lifelong.editors.base import Editor, HyperparameterError, parse_overrides
from lifelong.names import EDITOR_CLASSES, unknown_editor


def _load(path: str) -> type[Editor]:
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)


EDITORS: dict[str, type[Editor]] = {name: _load(path) for name, path in EDITOR_CLASSES.items()}
"""Every registered editor by name, from :data:`lifelong.names.EDITOR_CLASSES` (the one list)."""


class UnknownEditorError(ValueError):
    pass


def make_editor(name: str, overrides: dict[str, str] | None = None) -> Editor:
    """An editor by registered name, with hyperparameter overrides given as strings."""
    if name not in EDITORS:
        raise UnknownEditorError(unknown_editor(name))
    cls = EDITORS[name]
    return cls(parse_overrides(cls.Params, overrides, name))


__all__ = ["EDITORS", "Editor", "HyperparameterError", "UnknownEditorError", "make_editor", "parse_overrides"]
