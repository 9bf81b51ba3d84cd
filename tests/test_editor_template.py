"""The template editor of docs/EDITORS.md keeps the contract: the property-testing kit passes it."""

import importlib.util
import sys
from pathlib import Path

import pytest

from lifelong.testing import check_editor

TEMPLATE = Path(__file__).resolve().parents[1] / "docs" / "template_editor.py"


def load_template():
    spec = importlib.util.spec_from_file_location("template_editor", TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["template_editor"] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_template_editor_passes_the_kit(model):
    editor = load_template().NudgeEditor
    report = check_editor(
        lambda: editor(editor.Params(layer=1)),
        model=model,
        max_examples=2,
        max_edits=2,
        invariants=[
            "revert_restores_base",
            "checkout_equals_live",
            "empty_batch_is_noop",
            "scope_respected",
            "delta_matches_change",
        ],
    )
    report.raise_if_failed()
