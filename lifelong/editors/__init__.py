"""The editor registry: the built-in editors of :mod:`lifelong.core.names` (the one list), editors that
installed packages declare in the ``lifelong.editors`` entry-point group, and editors registered at
run time with :func:`register_editor`. An editor class can also be named by its path,
``module.path:Class``, anywhere a name is accepted (``--editor``, sweeps, :func:`make_editor`)."""

from __future__ import annotations

from lifelong.core.names import EDITOR_CLASSES, installed_editors, is_class_path, load_class, unknown_editor
from lifelong.editors.base import Editor, HyperparameterError, parse_overrides
from streams.errors import UserError


class UnknownEditorError(UserError):
    pass


def _load(path: str) -> type[Editor]:
    return load_class(path, Editor, UnknownEditorError, "editor", "lifelong.editors.Editor")


EDITORS: dict[str, type[Editor]] = {name: _load(path) for name, path in EDITOR_CLASSES.items()}
"""Every built-in editor by name (from :data:`lifelong.core.names.EDITOR_CLASSES`), plus any added by
:func:`register_editor`; installed packages' editors join on first use (:func:`editor_class`)."""


def register_editor(cls: type[Editor], name: str | None = None) -> type[Editor]:
    """Make ``cls`` available by ``name`` (default: ``cls.name``) to :func:`make_editor` and
    :func:`lifelong.replay.replay` in this process. Usable as a class decorator. A built-in name
    cannot be replaced. For the command line, declare the class in the ``lifelong.editors``
    entry-point group of an installed package, or pass ``--editor module.path:Class``."""
    if not (isinstance(cls, type) and issubclass(cls, Editor)):
        raise TypeError(f"register_editor: {cls!r} is not a subclass of lifelong.editors.Editor")
    name = name or getattr(cls, "name", None)
    if not name:
        raise ValueError(f"register_editor: {cls.__name__} needs a name (set its class attribute 'name')")
    if name in EDITOR_CLASSES and EDITORS[name] is not cls:
        raise ValueError(f"register_editor: '{name}' is a built-in editor; choose another name")
    EDITORS[name] = cls
    return cls


def editor_class(name: str) -> type[Editor]:
    """The editor class for a registered or installed name, or a ``module.path:Class``."""
    if name in EDITORS:
        return EDITORS[name]
    if is_class_path(name):
        return _load(name)
    installed = installed_editors()
    if name in installed:
        EDITORS[name] = _load(installed[name])
        return EDITORS[name]
    raise UnknownEditorError(unknown_editor(name) or f"unknown editor '{name}'")


def make_editor(name: str, overrides: dict[str, str] | None = None) -> Editor:
    """An editor by registered name (or ``module.path:Class``), with hyperparameter overrides as strings."""
    cls = editor_class(name)
    return cls(parse_overrides(cls.Params, overrides, getattr(cls, "name", name)))


__all__ = [
    "EDITORS",
    "Editor",
    "HyperparameterError",
    "UnknownEditorError",
    "editor_class",
    "make_editor",
    "parse_overrides",
    "register_editor",
]
