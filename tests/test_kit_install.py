"""The testing kit's install: ``lifelong.testing`` imports without hypothesis (a plain install), and what
needs hypothesis raises an ImportError naming the ``testing`` extra, which pyproject declares."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from lifelong.testing._requires import INSTALL_HINT

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Each line tries one thing and prints what happened: "<what> ok <detail>" or "<what> <ErrorType>: <message>".
PROBE = """
import lifelong.testing as kit

def attempt(what, thunk):
    try:
        print(what, "ok", thunk())
    except Exception as err:
        print(what, f"{type(err).__name__}: {err}")

attempt("import", lambda: len(kit.INVARIANTS))
attempt("names", lambda: [kit.check_editor.__name__, kit.Report.__name__, kit.register_equation.__name__])
attempt("from_import", lambda: exec("from lifelong.testing import edit_streams") or "imported")
attempt("tiny_models", lambda: type(kit.tiny_models()).__name__)
attempt("check_editor", lambda: kit.check_editor(lambda: None))
"""


def run_probe(without_hypothesis: bool) -> dict[str, str]:
    block = "import sys; sys.modules['hypothesis'] = None  # as if it were not installed\n"
    code = (block if without_hypothesis else "") + textwrap.dedent(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return dict(line.split(" ", 1) for line in done.stdout.splitlines())


def test_pyproject_has_the_testing_extra_at_the_dev_bounds():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert set(extras["testing"]) <= set(extras["dev"])
    assert {req.split(">")[0] for req in extras["testing"]} == {"hypothesis", "pytest"}
    name = PYPROJECT["project"]["name"]
    assert f"pip install '{name}[testing]'" in INSTALL_HINT and "\n" not in INSTALL_HINT


def test_without_hypothesis_the_kit_imports_and_says_which_extra_is_missing():
    got = run_probe(without_hypothesis=True)
    assert got["import"] == "ok 8"
    assert got["names"] == "ok ['check_editor', 'Report', 'register_equation']"
    for what in ("from_import", "tiny_models", "check_editor"):  # before calling the factory, too
        assert got[what] == f"ImportError: {INSTALL_HINT}"


def test_with_hypothesis_the_strategies_and_check_editor_load():
    got = run_probe(without_hypothesis=False)
    assert got["from_import"] == "ok imported"
    assert got["tiny_models"].startswith("ok ") and "Error" not in got["tiny_models"]
    assert got["check_editor"].startswith("TypeError: editor_factory must return a lifelong Editor")
