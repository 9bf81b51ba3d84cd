"""The import contract (docs/DESIGN.md §2, ``[tool.importlinter]`` in pyproject.toml): it holds on this
tree, and the checker does catch a break of it (a probe importing the engine, the core importing an
editor, a cycle between sibling modules), so a green ``make lint`` means something."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lifelong", "probes", "streams")

pytest.importorskip("importlinter", reason="import-linter comes with the dev extra")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """Run lint-imports on ``tree`` (its packages first on the path, its pyproject's contracts)."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", code, "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_contract_holds_on_this_tree(tree_copy: Path):
    result = lint_imports(tree_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, line, broken",
    [
        ("probes/base.py", "import lifelong.replay", "probes stand on lifelong.core"),
        ("probes/perplexity.py", "from lifelong.editors import base", "probes stand on lifelong.core"),
        ("lifelong/core/scorer.py", "import lifelong.editors.rome", "lifelong is layered"),
        ("lifelong/editors/ft.py", "import lifelong.run", "lifelong is layered"),
        ("lifelong/core/stats.py", "import lifelong.core.scorer", "no import cycles"),
        ("streams/edit.py", "import probes.metrics", "core imports neither"),
    ],
)
def test_a_break_of_the_contract_is_caught(tree_copy: Path, module: str, line: str, broken: str):
    path = tree_copy / module
    path.write_text(path.read_text() + f"\n{line}  # injected by the test\n")
    if "cycles" in broken:  # stats -> scorer; close the circle scorer -> stats
        scorer = tree_copy / "lifelong/core/scorer.py"
        scorer.write_text(scorer.read_text() + "\nimport lifelong.core.stats  # injected by the test\n")
    result = lint_imports(tree_copy)
    assert result.returncode != 0
    summary = " ".join(result.stdout.split())  # contract names may wrap
    assert f"{broken}" in summary and "BROKEN" in summary.split(broken, 1)[1].split("KEPT", 1)[0], result.stdout


def test_a_new_top_level_module_of_lifelong_must_be_placed(tree_copy: Path):
    """The layers are exhaustive: a module added to ``lifelong/`` without a place in them is refused."""
    (tree_copy / "lifelong" / "newcomer.py").write_text('"""Not yet placed in a layer."""\n')
    result = lint_imports(tree_copy)
    assert result.returncode != 0
    assert "newcomer" in result.stdout
