"""The comparison notebook runs end to end (on a tiny model and a few steps) so that it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_editors.ipynb"

TINY_PARAMS = """MODEL = "tiny-llama"
STREAM = {stream!r}
STEPS = 3
EDITORS = {{"ft": {ft!r}, "rome": {rome!r}}}
PROBES = ["perplexity:schedule=every:1,chunk_tokens=64,max_tokens=256,max_sentences=8",
          "downstream:schedule=every:3,tasks=sentiment+facts,items=4", "weight_drift"]
PROBE_EVERY = 1
OUT = {out!r}
THREADS = 1
"""


def test_compare_notebook_executes(tmp_path, stream_file, monkeypatch):
    from tests.conftest import TINY_FT

    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    rome = {"layer": "1", "v_steps": "8", "templates": "4", "mom2": "false"}
    cell.source = TINY_PARAMS.format(stream=str(stream_file), ft=dict(TINY_FT), rome=rome, out=str(tmp_path / "nb"))
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parents[1])}}
    ).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "ft: 3 steps" in outputs and "rome: 3 steps" in outputs
    assert "perplexity ratio to θ0 at last step" in outputs
    assert (tmp_path / "nb" / "compare.png").stat().st_size > 10_000
    shown = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(shown) == 3, "the compare figure and one dashboard per run are displayed inline as figures"
    warned = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "IProgress" not in warned and "Loading weights" not in warned
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3  # the comparison and one dashboard per editor
    assert "after its step" in outputs and "θ0" in outputs  # the before/after view


def test_saved_notebooks_hold_no_progress_bar_output():
    """Saved outputs are read on GitHub and in the docs: no carriage returns, cursor-movement escape codes
    or bar lines (strip them before committing a re-run notebook)."""
    import re

    for path in sorted(NOTEBOOK.parent.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                text = out.get("text", "") + "".join(str(v) for k, v in out.get("data", {}).items() if "text" in k)
                assert not re.search(r"\x1b\[|\r|\d+%\|", text), f"{path.name}: progress-bar output: {text[:120]!r}"
