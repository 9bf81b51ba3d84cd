"""The replay's settings, each declared once: type, default, range, meaning, and whether it is part of
a run's identity. :class:`lifelong.run.RunConfig` is built from these declarations, and the command
line's flags (``lifelong replay --help``), the TOML config keys, a manifest's options and a sweep
spec's keys are all generated from them, so the four accept exactly the same settings.

Settings with a special form elsewhere are declared here too and marked: ``editor_overrides`` is
``--set KEY=VALUE`` (a ``[set]`` table in files), ``probes`` is ``--probe SPEC`` (a ``probes`` list).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from streams.errors import UserError

IN_IDENTITY = "always"
UNLESS_DEFAULT = "unless-default"  # left out of the identity at its default (runs from before it lack it)


@dataclass(frozen=True)
class Setting:
    """One replay setting: ``kind`` is its value type (None allowed where ``optional``), ``least`` the
    smallest whole number it takes, ``choices`` its allowed values, ``identity`` whether a run that differs
    in it is a different run (always, or unless it is at its default), ``sweep`` how a sweep spec takes it
    ("scalar": one value for every cell; "swept": the spec has its own list form; "no": not in sweeps)."""

    name: str
    kind: type
    default: Any
    meaning: str
    optional: bool = False
    least: int | None = None
    choices: tuple[str, ...] | None = None
    identity: str = IN_IDENTITY
    sweep: str = "scalar"
    form: str = "flag"  # "flag": --NAME VALUE; "set": --set KEY=VALUE; "probe": --probe SPEC

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, where: str) -> Any:
        """``value`` if it is a valid value of this setting, else a one-line UserError naming ``where``."""
        if value is None and self.optional:
            return None
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{where} must be a whole number, got {value!r}")
        if self.kind is str and not (isinstance(value, str) and value):
            raise UserError(f"{where} must be a non-empty string, got {value!r}")
        if self.least is not None and value < self.least:
            raise UserError(f"{where} must be at least {self.least} ({self.meaning}), got {value}")
        if self.choices is not None and value not in self.choices:
            raise UserError(f"{where} must be one of {', '.join(self.choices)}, got {value!r}")
        return value


def declare(default: Any, meaning: str, kind: type, **options: Any) -> Any:
    """A dataclass field carrying its :class:`Setting` (its name is filled in by :func:`run_settings`)."""
    declared = Setting(name="", kind=kind, default=default, meaning=meaning, **options)
    if isinstance(default, (list, dict)):
        return field(default_factory=type(default), metadata={"setting": declared})
    return field(default=default, metadata={"setting": declared})


def settings_of(config_class: type) -> tuple[Setting, ...]:
    """The declared settings of a dataclass built with :func:`declare`, in field order."""
    return tuple(dataclasses.replace(f.metadata["setting"], name=f.name) for f in dataclasses.fields(config_class))


def flag_settings(config_class: type) -> tuple[Setting, ...]:
    """The settings a plain ``--flag VALUE`` (and a TOML scalar, and a manifest entry) carries."""
    return tuple(s for s in settings_of(config_class) if s.form == "flag")


def check_values(config_class: type, values: dict[str, Any], where: str = "--") -> None:
    """Check every declared flag setting present in ``values``; ``where`` prefixes the name in errors
    (``--`` for the command line: ``--batch-size``; ``config FILE: key`` for a file)."""
    for s in flag_settings(config_class):
        if s.name in values:
            name = s.flag if where == "--" else f"{where}{s.name}"
            s.check(values[s.name], name)


def normalised_number_text(raw: str, kind: type) -> str:
    """One spelling of a number given as text, so ``2e-2`` and ``0.02`` (or ``1_000`` and ``1000``) name
    the same setting: floats by ``repr``, whole numbers in decimal; other text as given."""
    try:
        if kind is float:
            return repr(float(raw))
        if kind is int:
            return str(int(raw))
    except (TypeError, ValueError):
        pass
    return raw
