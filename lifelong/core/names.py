"""Names of the registered editors and probes, importable without torch or transformers.

The command line checks ``--editor`` and ``--probe`` against these before it imports anything
heavy, so a typo is refused in well under two seconds. The editor registry
(:data:`lifelong.editors.EDITORS`) is built from :data:`EDITOR_CLASSES` and the probe registry
(:data:`probes.PROBES`) from :data:`PROBE_CLASSES`. Editors and probes of installed packages join
through the entry-point groups ``lifelong.editors`` and ``lifelong.probes``, and either kind can be
named by where its class lives (``module.path:Class``).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
TINY_MODELS = ("tiny-llama", "tiny-gpt2")  # seeded random models for tests: NAME or NAME:SEED


def did_you_mean(name: str, known) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` to a mistyped ``name``, else ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_model(spec: str) -> str | None:
    """The one-line refusal for a ``--model`` that is neither registered nor a directory, else None."""
    if spec == DEFAULT_MODEL or os.path.isdir(spec):
        return None
    family, _, seed = spec.partition(":")
    if family in TINY_MODELS and (not seed or seed.isdigit()):
        return None
    known = (DEFAULT_MODEL, *TINY_MODELS)
    return (
        f"unknown model '{spec}'{did_you_mean(spec, known)}: expected {', '.join(known)} or a local Hugging Face "
        "directory (no such directory here)"
    )


def unavailable_device(device: str) -> str | None:
    """The refusal for a ``--device`` that cannot be right here, decided without importing torch: a
    malformed name, or CUDA on a machine without an NVIDIA driver. torch decides the rest when it loads."""
    if not re.fullmatch(r"cpu|mps|auto|cuda(:\d+)?", device):
        hint = did_you_mean(device, ("cpu", "cuda", "mps", "auto"))
        return f"unknown device '{device}'{hint}: expected cpu, cuda, cuda:N, mps or auto"
    if device.startswith("cuda") and not os.path.exists("/proc/driver/nvidia") and not os.path.exists("/dev/nvidia0"):
        return f"device '{device}' requested but this machine has no NVIDIA driver (so no CUDA)"
    return None


EDITOR_CLASSES: dict[str, str] = {  # name -> "module:Class"
    "ft": "lifelong.editors.ft:FTEditor",
    "rome": "lifelong.editors.rome:ROMEEditor",
    "r-rome": "lifelong.editors.rome:RROMEEditor",
    "memit": "lifelong.editors.memit:MEMITEditor",
    "alphaedit": "lifelong.editors.memit:AlphaEditEditor",
    "emmet": "lifelong.editors.emmet:EMMETEditor",
    "kn": "lifelong.editors.kn:KNEditor",
    "mend": "lifelong.editors.mend:MENDEditor",
    "grace": "lifelong.editors.grace:GRACEEditor",
    "wise": "lifelong.editors.wise:WISEEditor",
    "memoir": "lifelong.editors.memoir:MEMOIREditor",
    "memory": "lifelong.editors.memory:MemoryEditor",
    "ultraedit": "lifelong.editors.ultraedit:UltraEditEditor",
    "rledit": "lifelong.editors.rledit:RLEditEditor",
}

PROBE_CLASSES: dict[str, str] = {  # name -> "module:Class"
    "edit_quality": "probes.edit_quality:EditQualityProbe",
    "retention": "probes.edit_quality:RetentionProbe",
    "chains": "probes.chains:ChainProbe",
    "perplexity": "probes.perplexity:PerplexityProbe",
    "weight_drift": "probes.weight_drift:WeightDriftProbe",
    "downstream": "probes.downstream:DownstreamProbe",
    "fluency": "probes.paper:FluencyProbe",  # the paper presets' (lifelong/presets.py)
    "final_quality": "probes.paper:FinalQualityProbe",
}

ENTRY_POINT_GROUP = "lifelong.editors"  # an installed package's editors: name = "module:Class"
PROBE_ENTRY_POINT_GROUP = "lifelong.probes"  # and its probes


def _installed(group: str, builtin: dict[str, str]) -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=group) if ep.name not in builtin}


def installed_editors() -> dict[str, str]:
    """Editors that installed packages declare in the ``lifelong.editors`` entry-point group
    (``[project.entry-points."lifelong.editors"] mine = "mypkg.editor:MyEditor"``), read from
    package metadata without importing them; a built-in name cannot be taken over."""
    return _installed(ENTRY_POINT_GROUP, EDITOR_CLASSES)


def installed_probes() -> dict[str, str]:
    """Probes that installed packages declare in the ``lifelong.probes`` entry-point group, likewise."""
    return _installed(PROBE_ENTRY_POINT_GROUP, PROBE_CLASSES)


def is_class_path(name: str) -> bool:
    """``module.path:Class``: an editor class named by where it lives (no registration needed)."""
    module, sep, cls = name.partition(":")
    return bool(sep) and all(part.isidentifier() for part in module.split(".")) and cls.isidentifier()


PROBE_NAMES: tuple[str, ...] = tuple(sorted(PROBE_CLASSES))


def probe_name(spec: str) -> tuple[str, str]:
    """(the probe's name, the rest) of a ``--probe`` spec: ``name[:options]`` or
    ``module.path:Class[:options]`` (options are ``key=value`` items, so a bare identifier after the
    first colon is a class name)."""
    head, sep, rest = spec.strip().partition(":")
    cls, sep2, options = rest.partition(":")
    if sep and head not in PROBE_CLASSES and cls.isidentifier() and is_class_path(f"{head}:{cls}"):
        return f"{head}:{cls}", options if sep2 else ""
    return head, rest


def _unknown(kind: str, name: str, builtin: dict[str, str], installed) -> str | None:
    """The one-line refusal for a ``kind`` name that is neither built in, installed nor a class path."""
    if name in builtin or is_class_path(name):
        return None
    known = {**builtin, **installed()}
    if name in known:
        return None
    return (
        f"unknown {kind} '{name}'{did_you_mean(name, known)}: expected one of {', '.join(sorted(known))}, or "
        f"module.path:Class for {'an' if kind[0] in 'aeiou' else 'a'} {kind} class of your own"
    )


def unknown_editor(name: str) -> str | None:
    """The one-line refusal for an editor name that is not registered, else None."""
    return _unknown("editor", name, EDITOR_CLASSES, installed_editors)


def unknown_probe(spec: str) -> str | None:
    """The one-line refusal for a ``--probe`` spec naming no registered probe, else None."""
    return _unknown("probe", probe_name(spec)[0], PROBE_CLASSES, installed_probes)


def load_class(path: str, base: type, error: type[Exception], kind: str, public: str) -> type:
    """The class at ``module.path:Class``, which must subclass ``base`` (``public``: its public name, for
    the message); else ``error`` in one line."""
    import importlib

    module, _, name = path.partition(":")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise error(f"{kind} class {path}: cannot be loaded ({err})") from None
    if not (isinstance(found, type) and issubclass(found, base)):
        raise error(f"{kind} class {path}: not a subclass of {public}")
    return found


# The settings of each built-in editor, by name, written by tools/write_editor_settings.py from the
# editors' Params (tests/test_cli.py fails when it is stale): the command line refuses a mistyped
# --set before torch is imported, in well under two seconds, instead of after loading every editor.
EDITOR_SETTINGS_FILE = "editor_settings.json"


def unknown_setting(editor: str, key: str) -> str | None:
    """The one-line refusal for ``--set key=…`` that a built-in editor does not have, else None (an
    editor not built in is checked when it is loaded)."""
    import importlib.resources
    import json

    if editor not in EDITOR_CLASSES:
        return None
    settings = json.loads((importlib.resources.files("lifelong.core") / EDITOR_SETTINGS_FILE).read_text())
    names = settings.get(editor)
    if names is None or key in names:
        return None
    return (
        f"editor '{editor}' has no hyperparameter '{key}'{did_you_mean(key, names)}: expected one of {', '.join(names)}"
    )


# The key-statistics corpus that samples text from the model itself (lifelong.editors.covariance); any
# other cov_corpus is a text file or a directory of them, checked here so that the command line
# refuses a missing one before torch is imported.
MODEL_SAMPLE = "model-sample"


def corpus_files(corpus: str) -> list[Path]:
    """The text files of a covariance corpus (a file, or a directory's ``*.txt``), refused when missing."""
    from streams.errors import MissingFileError

    path = Path(corpus)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if files:
            return files
        raise MissingFileError(f"{corpus}: no .txt files in this directory")
    raise MissingFileError(f"covariance corpus {corpus!r}: expected '{MODEL_SAMPLE}', a text file or a directory")
