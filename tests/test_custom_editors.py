"""Editors of one's own: an installed package's entry point, a module:Class path, register_editor."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lifelong.core.names import unknown_editor
from lifelong.editors import EDITORS, UnknownEditorError, make_editor, register_editor

ROOT = Path(__file__).resolve().parent.parent

PACKAGE = """
import sys
sys.path.insert(0, {docs!r})
from template_editor import NudgeEditor


class MineEditor(NudgeEditor):
    name = "mine"
    description = "a test package's editor (the template's nudge under another name)"
"""


@pytest.fixture
def installed_package(tmp_path):
    """A package on sys.path with the dist-info metadata pip would write, declaring one editor."""
    site = tmp_path / "site"
    (site / "mine_pkg").mkdir(parents=True)
    (site / "mine_pkg" / "__init__.py").write_text(PACKAGE.format(docs=str(ROOT / "docs")))
    info = site / "mine_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mine-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lifelong.editors]\nmine = mine_pkg:MineEditor\n")
    return site


def run(site, *argv, cwd):
    env = {**os.environ, "PYTHONPATH": f"{site}:{ROOT}", "OMP_NUM_THREADS": "1", "LIFELONG_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lifelong.cli", *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def test_an_installed_packages_editor_runs_from_the_cli(installed_package, tmp_path, stream_file):
    listing = run(installed_package, "editors", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "mine        a test package's editor" in listing.stdout and "--set alpha=" in listing.stdout
    out = tmp_path / "run"
    done = run(
        installed_package,
        "replay",
        "--model",
        "tiny-llama",
        "--editor",
        "mine",
        "--stream",
        str(stream_file),
        "--steps",
        "2",
        "--quiet",
        "--out",
        str(out),
        "--set",
        "alpha=2",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "run directory:" in done.stdout
    typo = run(
        installed_package,
        "replay",
        "--model",
        "tiny-llama",
        "--editor",
        "mnie",
        "--out",
        str(tmp_path / "x"),
        cwd=tmp_path,
    )
    assert typo.returncode == 2 and "unknown editor 'mnie' (did you mean 'mine'?): expected one of " in typo.stderr
    assert "mine" in typo.stderr.split("expected one of ")[1] and not (tmp_path / "x").exists()


def test_a_class_path_and_register_editor(tmp_path):
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from template_editor import NudgeEditor

        editor = make_editor("template_editor:NudgeEditor", {"alpha": "0.5"})
        assert isinstance(editor, NudgeEditor) and editor.params.alpha == 0.5
        assert unknown_editor("template_editor:NudgeEditor") is None
        with pytest.raises(UnknownEditorError, match="editor class template_editor:Missing: cannot be loaded"):
            make_editor("template_editor:Missing")
        with pytest.raises(UnknownEditorError, match="not a subclass of lifelong.editors.Editor"):
            make_editor("template_editor:dataclass")

        class Renamed(NudgeEditor):
            name = "renamed-nudge"

        try:
            assert register_editor(Renamed) is Renamed
            assert isinstance(make_editor("renamed-nudge"), Renamed)
        finally:
            EDITORS.pop("renamed-nudge", None)
        with pytest.raises(ValueError, match="'rome' is a built-in editor"):
            register_editor(NudgeEditor, "rome")
        with pytest.raises(TypeError, match="not a subclass"):
            register_editor(dict)
    finally:
        sys.path.remove(str(ROOT / "docs"))
