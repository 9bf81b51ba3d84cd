"""Names of the registered editors and probes, importable without torch or transformers.

The command line checks ``--editor`` and ``--probe`` against these before it imports anything
heavy, so a typo is refused in well under two seconds. The editor registry
(:data:`lifelong.editors.EDITORS`) is built from :data:`EDITOR_CLASSES`; the probe registry
lives in ``probes`` (which must not import ``lifelong``), and ``tests/test_cli.py`` checks that
:data:`PROBE_NAMES` lists exactly its probes.
"""

from __future__ import annotations

EDITOR_CLASSES: dict[str, str] = {  # name -> "module:Class"
    "ft": "lifelong.editors.ft:FTEditor",
    "rome": "lifelong.editors.rome:ROMEEditor",
    "r-rome": "lifelong.editors.rome:RROMEEditor",
    "memit": "lifelong.editors.memit:MEMITEditor",
    "alphaedit": "lifelong.editors.memit:AlphaEditEditor",
    "kn": "lifelong.editors.kn:KNEditor",
    "mend": "lifelong.editors.mend:MENDEditor",
    "grace": "lifelong.editors.grace:GRACEEditor",
    "wise": "lifelong.editors.wise:WISEEditor",
    "memory": "lifelong.editors.memory:MemoryEditor",
}

PROBE_NAMES: tuple[str, ...] = ("chains", "downstream", "edit_quality", "perplexity", "retention", "weight_drift")


def unknown_editor(name: str) -> str | None:
    """The one-line refusal for an editor name that is not registered, else None."""
    if name in EDITOR_CLASSES:
        return None
    return f"unknown editor '{name}': expected one of {', '.join(sorted(EDITOR_CLASSES))}"


def unknown_probe(spec: str) -> str | None:
    """The one-line refusal for a ``--probe`` spec naming no registered probe, else None."""
    name = spec.split(":", 1)[0].strip()
    if name in PROBE_NAMES:
        return None
    return f"unknown probe '{name}': expected one of {', '.join(sorted(PROBE_NAMES))}"
