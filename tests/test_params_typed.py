"""Editors' params and probes' options are typed: mypy refuses a misspelt setting
(``params.no_such_setting``), and reads a setting that bind() resolves (``layer: int | None``) through a
typed accessor."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SNIPPET = """
from lifelong.editors.emmet import EMMETEditor
from lifelong.editors.ft import FTEditor
from lifelong.editors.grace import GRACEEditor
from lifelong.editors.memit import AlphaEditEditor, MEMITEditor
from lifelong.editors.memory import MemoryEditor
from lifelong.editors.rome import ROMEEditor
from probes.chains import ChainProbe
from probes.perplexity import PerplexityProbe


def fine(rome: ROMEEditor, alpha: AlphaEditEditor, emmet: EMMETEditor, grace: GRACEEditor, ft: FTEditor,
         memory: MemoryEditor) -> None:
    stabilise: str = rome.params.stabilise
    threshold: float | None = alpha.params.nullspace_threshold  # AlphaEdit's own setting, on its own params
    lam: float = emmet.params.emmet_lambda
    eps: float = grace.params.eps_init
    layers: int = ft.layer + grace.layer  # resolved by bind(): int, where the setting is int | None
    retrieval: float = memory.threshold + 0.0


def probes_fine(ppl: PerplexityProbe, chains: ChainProbe) -> None:
    collapse: float = ppl.options.threshold
    every: int = chains.options.remeasure


def misspelt(rome: ROMEEditor, memit: MEMITEditor, alpha: AlphaEditEditor, grace: GRACEEditor) -> None:
    rome.params.no_such_setting  # refused
    memit.params.nullspace_threshold  # refused: AlphaEdit's setting, not MEMIT's
    alpha.params.no_such_setting  # refused
    grace.params.no_such_setting  # refused
    layer: int = grace.params.layer  # refused: int | None until bind() resolves it


def probes_misspelt(ppl: PerplexityProbe, chains: ChainProbe) -> None:
    ppl.options.no_such_setting  # refused
    chains.options.no_such_setting  # refused
"""


@pytest.mark.slow  # mypy reads torch's stubs: seconds with the project's cache warm, a minute or more cold
@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="needs mypy (the dev extra)")
def test_mypy_refuses_a_setting_an_editor_or_probe_does_not_have(tmp_path):
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    # The project's mypy settings and cache, and this checkout's lifelong (MYPYPATH) before any installed one.
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "--no-error-summary", str(snippet)],
        cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    lines = sorted(int(m[1]) for m in (re.match(r".*snippet\.py:(\d+):", e) for e in errors) if m)
    refused = [i for i, line in enumerate(SNIPPET.splitlines(), start=1) if "# refused" in line]
    assert len(refused) == 7 and lines == refused, done.stdout + done.stderr
    assert sum('has no attribute "no_such_setting"' in e for e in errors) == 5
    assert '"MEMITParams" has no attribute "nullspace_threshold"' in done.stdout


def test_a_setting_resolved_by_bind_is_refused_before_bind_in_one_line():
    from lifelong.editors.ft import FTEditor, FTParams
    from lifelong.editors.memory import MemoryEditor

    with pytest.raises(RuntimeError, match=r"^ft: 'layer' is resolved by bind\(lm\): bind the editor"):
        _ = FTEditor().layer
    assert FTEditor(FTParams(layer=3)).layer == 3
    assert MemoryEditor().threshold == 1.0  # resolved from the retriever at construction
