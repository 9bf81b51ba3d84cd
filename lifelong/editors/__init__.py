"""The editor registry: every editor is listed here, and only here."""

from __future__ import annotations

from lifelong.editors.base import Editor, HyperparameterError, parse_overrides
from lifelong.editors.ft import FTEditor
from lifelong.editors.grace import GRACEEditor
from lifelong.editors.kn import KNEditor
from lifelong.editors.memory import MemoryEditor
from lifelong.editors.mend import MENDEditor
from lifelong.editors.memit import AlphaEditEditor, MEMITEditor
from lifelong.editors.rome import ROMEEditor, RROMEEditor
from lifelong.editors.wise import WISEEditor

EDITORS: dict[str, type[Editor]] = {cls.name: cls for cls in (
    FTEditor, ROMEEditor, RROMEEditor, MEMITEditor, AlphaEditEditor, KNEditor, MENDEditor,
    GRACEEditor, WISEEditor, MemoryEditor)}


class UnknownEditorError(ValueError):
    pass


def make_editor(name: str, overrides: dict[str, str] | None = None) -> Editor:
    """An editor by registered name, with hyperparameter overrides given as strings."""
    if name not in EDITORS:
        raise UnknownEditorError(f"unknown editor '{name}': expected one of {', '.join(sorted(EDITORS))}")
    cls = EDITORS[name]
    return cls(parse_overrides(cls.Params, overrides, name))


__all__ = ["EDITORS", "Editor", "HyperparameterError", "UnknownEditorError", "make_editor", "parse_overrides"]
