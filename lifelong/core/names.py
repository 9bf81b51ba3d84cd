"""Names of the registered editors and probes, importable without torch or transformers.

The command line checks ``--editor`` and ``--probe`` against these before it imports anything
heavy, so a typo is refused in well under two seconds. The editor registry
(:data:`lifelong.editors.EDITORS`) is built from :data:`EDITOR_CLASSES`; the probe registry
lives in ``probes`` (which stands on ``lifelong.core`` alone), and ``tests/test_cli.py`` checks that
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
    "ultraedit": "lifelong.editors.ultraedit:UltraEditEditor",
}

ENTRY_POINT_GROUP = "lifelong.editors"  # an installed package's editors: name = "module:Class"


def installed_editors() -> dict[str, str]:
    """Editors that installed packages declare in the ``lifelong.editors`` entry-point group
    (``[project.entry-points."lifelong.editors"] mine = "mypkg.editor:MyEditor"``), read from
    package metadata without importing them; a built-in name cannot be taken over."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in EDITOR_CLASSES}


def is_class_path(name: str) -> bool:
    """``module.path:Class``: an editor class named by where it lives (no registration needed)."""
    module, sep, cls = name.partition(":")
    return bool(sep) and all(part.isidentifier() for part in module.split(".")) and cls.isidentifier()


PROBE_NAMES: tuple[str, ...] = ("chains", "downstream", "edit_quality", "perplexity", "retention", "weight_drift")


def unknown_editor(name: str) -> str | None:
    """The one-line refusal for an editor name that is not registered, else None."""
    if name in EDITOR_CLASSES or is_class_path(name):
        return None
    known = {**EDITOR_CLASSES, **installed_editors()}
    if name in known:
        return None
    return (
        f"unknown editor '{name}': expected one of {', '.join(sorted(known))}, or module.path:Class "
        "for an editor class of your own"
    )


def unknown_probe(spec: str) -> str | None:
    """The one-line refusal for a ``--probe`` spec naming no registered probe, else None."""
    name = spec.split(":", 1)[0].strip()
    if name in PROBE_NAMES:
        return None
    return f"unknown probe '{name}': expected one of {', '.join(sorted(PROBE_NAMES))}"
