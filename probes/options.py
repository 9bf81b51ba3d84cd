"""Typed options from strings: editor hyperparameters (``--set key=value``) and probe options
(``--probe name:key=value,...``) are dataclasses filled from the command line's strings."""

from __future__ import annotations

import dataclasses
import typing


class OptionError(ValueError):
    """A ``key=value`` option that does not fit the dataclass it is meant for."""


def parse_options(cls: type, overrides: dict[str, str] | None, owner: str, error: type[ValueError] = OptionError,
                  noun: str = "option", kind: str = "probe"):
    """Build dataclass ``cls`` from string overrides, converting each to its annotated type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, raw in (overrides or {}).items():
        if key not in names:
            expected = f"expected one of {', '.join(names)}" if names else f"it takes no {noun}s"
            raise error(f"{kind} '{owner}' has no {noun} '{key}': {expected}")
        values[key] = convert(raw, hints[key], f"{owner}.{key}", error)
    return cls(**values)


def convert(raw, annotation, where: str, error: type[ValueError] = OptionError):
    """``raw`` as ``annotation`` (bool, int, float, str or Optional of one of them)."""
    if not isinstance(raw, str):
        return raw
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    target = args[0] if args else annotation
    if raw.lower() in ("none", "null") and type(None) in typing.get_args(annotation):
        return None
    try:
        if target is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        return target(raw)
    except (TypeError, ValueError):
        raise error(f"{where}: cannot read '{raw}' as {getattr(target, '__name__', target)}") from None


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``name:key=value,key=value`` -> (name, {key: value}); values may contain ':' but not ','."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"'{spec}': expected name:key=value,key=value (bad item '{item}')")
        options[key.strip()] = value.strip()
    return name.strip(), options
