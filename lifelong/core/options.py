"""Typed options from strings: editor hyperparameters (``--set key=value``) and probe options
(``--probe name:key=value,...``) are dataclasses filled from the command line's strings.

Shared by the editor base class and ``probes``; it imports nothing of ``lifelong`` or ``probes``."""

from __future__ import annotations

import dataclasses
import math
import typing

from lifelong.core.names import EDITOR_CLASSES, MODEL_SAMPLE, corpus_files, did_you_mean
from streams.errors import UserError


class OptionError(UserError):
    """A ``key=value`` option that does not fit the dataclass it is meant for."""


def parse_options(
    cls: type,
    overrides: dict[str, str] | None,
    owner: str,
    error: type[ValueError] = OptionError,
    noun: str = "option",
    kind: str = "probe",
):
    """Build dataclass ``cls`` from string overrides, converting each to its annotated type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, raw in (overrides or {}).items():
        if key not in names:
            expected = f"expected one of {', '.join(names)}" if names else f"it takes no {noun}s"
            raise error(f"{kind} '{owner}' has no {noun} '{key}'{did_you_mean(key, names)}: {expected}")
        values[key] = convert(raw, hints[key], f"{owner}.{key}", error)
        check_range(key, values[key], f"{owner}.{key}", error)
    return cls(**values)


# The declared ranges of settings, by name, shared by every editor and probe that uses the name
# (a name means the same thing wherever it appears). Every float must also be finite.
# ("templates" is not here: ROME counts the bare prompt among them, WISE does not, and each editor
# checks its own; a negative stop_loss is a way to say "never stop early".)
_AT_LEAST_ONE = (
    "steps",
    "max_steps",
    "v_steps",
    "top_k",
    "batch_size",
    "rank",
    "cov_tokens",
    "save_freq",
    "merge_freq",
    "nas_samples",
    "mpes_hits",
)
_NOT_NEGATIVE = (
    "norm_constraint",
    "clamp_norm",
    "weight_decay",
    "v_weight_decay",
    "kl_factor",
    "eps_init",
    "l2",
    "mom2_weight",
    "emmet_lambda",
    "update_norm_lambda",
    "cov_reg",
    "max_tokens",
    "max_sentences",
    "items",
    "rect_eps",
    "encore_norm",
)
_POSITIVE = ("lr", "v_lr", "edit_lr", "nullspace_threshold", "nas_skip", "mom2_update_weight")


def range_text(name: str) -> str:
    """The declared range of a setting as the listings print it (``≥ 1``, ``≥ 0``, ``> 0``), or ''."""
    if name in _AT_LEAST_ONE:
        return "≥ 1"
    if name in _NOT_NEGATIVE:
        return "≥ 0"
    return "> 0" if name in _POSITIVE else ""


def check_range(name: str, value, where: str, error: type[ValueError] = OptionError) -> None:
    """Refuse a setting outside its declared range (see the tables above), naming it."""
    if isinstance(value, bool) or value is None or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{where}: must be a finite number, got {value}")
    if name in _AT_LEAST_ONE and value < 1:
        raise error(f"{where}: must be at least 1, got {value}")
    if name in _NOT_NEGATIVE and value < 0:
        raise error(f"{where}: must not be negative, got {value}")
    if name in _POSITIVE and value <= 0:
        raise error(f"{where}: must be greater than 0, got {value}")


def quick_setting_problem(editor: str, key: str, raw: str) -> str | None:
    """The one-line refusal of ``--set key=raw`` for a built-in editor that the setting's name alone
    decides (its declared range; a covariance corpus that does not exist), else None: the command line
    asks it before torch and the editors are imported. The rest is checked when the editor is built."""
    if editor not in EDITOR_CLASSES:
        return None
    try:
        if key == "cov_corpus" and raw != MODEL_SAMPLE:
            corpus_files(raw)
        if key in (*_AT_LEAST_ONE, *_NOT_NEGATIVE, *_POSITIVE):
            for kind in (int, float) if key in _AT_LEAST_ONE else (float,):  # counts are whole numbers
                try:
                    value = kind(raw)
                except ValueError:
                    continue
                check_range(key, value, f"{editor}.{key}")
                break
    except UserError as err:
        return str(err)
    return None


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
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            hint = "; several values of one key are joined with '+'" if options and not sep else ""
            raise OptionError(f"'{spec}': expected name:key=value,key=value (bad item '{item}'{hint})")
        options[key.strip()] = value.strip()
    return name.strip(), options
