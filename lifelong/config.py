"""Replay settings from a file: a TOML config, or a run's ``manifest.json`` to repeat that run.

A TOML config names any of the replay's declared settings by name (``model``, ``editor``, ``stream``,
``steps``, ``batch_size``, ``sample``, ``seed`` …: see ``lifelong replay --help``; ``lifelong/run.py``
declares them), ``probes`` as a list of ``--probe`` strings, ``out`` and ``threads``, and the editor's
settings in a ``[set]`` table::

    model = "smollm2-135m"
    editor = "rome"
    stream = "dataset:counterfact"
    steps = 50
    probes = ["perplexity:schedule=every:10"]

    [set]
    layer = 6

A manifest gives back the run's identity: the same model, editor settings, stream, probes (each as it
ran, schedule and options included) and seed, so the replay it describes runs again to the same
results. Options given on the command line win over the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lifelong.run import RUN_SETTINGS, RunConfig
from lifelong.settings import IN_IDENTITY, check_values
from streams.errors import MissingFileError, UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# The replay's declared flag settings (lifelong/run.py) plus the two options that are not run settings.
SCALARS: dict[str, type | tuple[type, ...]] = {
    **{s.name: s.kind for s in RUN_SETTINGS if s.form == "flag"},
    "out": str,
    "threads": (int, str),
}


def read_config(path: str | Path) -> dict:
    """The replay options a config file or manifest sets, by the command line's names (``probe`` and
    ``set`` as lists of strings). Refused in one line naming the file and key."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise MissingFileError(f"config {path}: no such file")
    if path.suffix == ".json":
        return _from_manifest(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"config {path}: not valid TOML: {err}") from None
    out: dict = {}
    for key, value in raw.items():
        if key in SCALARS:
            if not isinstance(value, SCALARS[key]) or isinstance(value, bool):
                raise UserError(f"config {path}: key '{key}' must be {_kind(SCALARS[key])}, got {value!r}")
            check_values(RunConfig, {key: value}, f"config {path}: key ")
            out[key] = value
        elif key == "probes":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UserError(f"config {path}: key 'probes' must be a list of probe strings")
            out["probe"] = value
        elif key == "set":
            if not isinstance(value, dict):
                raise UserError(f"config {path}: key 'set' must be a table of editor settings")
            out["set"] = [f"{k}={_text(v)}" for k, v in value.items()]
        else:
            raise UserError(
                f"config {path}: unknown key '{key}' (expected one of {', '.join([*SCALARS, 'probes', 'set'])})"
            )
    return out


def _from_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"config {path}: not a run manifest ({err})") from None
    return options_from_manifest(path, manifest)


def options_from_manifest(path: Path, manifest: dict) -> dict:
    """The replay options of a parsed manifest (``path`` names it in errors)."""
    try:
        return _manifest_options(path, manifest, manifest["identity"])
    except (KeyError, TypeError, AttributeError) as err:  # a manifest not written by a replay (or edited)
        raise UserError(f"config {path}: not a run manifest ({type(err).__name__}: {err})") from None


def _manifest_options(path: Path, manifest: dict, ident: dict) -> dict:
    sessions = manifest.get("sessions") or []
    stream = next((s["stream"] for s in reversed(sessions) if s.get("stream")), ident["stream"])
    if stream.endswith(".jsonl") and not Path(stream).is_file():
        raise UserError(f"config {path}: the run's stream file {stream} is not here; give it with --stream")
    # A setting always in the identity must be there (else this is no manifest of a replay).
    out = {
        s.name: ident[s.name] if s.identity == IN_IDENTITY else ident.get(s.name, s.default)
        for s in RUN_SETTINGS
        if s.form == "flag"
    }
    out.update(
        stream=stream,
        set=[f"{k}={_text(v)}" for k, v in (ident.get("editor_overrides") or {}).items()],
        probe=[probe_spec(p) for p in ident.get("probes") or []],
    )
    return out


def probe_spec(probe: dict) -> str:
    """A probe's ``--probe`` string from its recorded configuration (name, schedule, options)."""
    options = {"schedule": probe["schedule"], **(probe.get("options") or {})}
    return (
        (probe.get("source") or probe["name"])
        + ":"
        + ",".join(f"{k}={_text(v)}" for k, v in options.items() if v is not None)
    )


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _kind(kind) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
