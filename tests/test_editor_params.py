"""Editor settings are checked in one place (at construction, before a model is loaded) and every
default that depends on the model is recorded resolved after bind (nothing left as None or "")."""

from __future__ import annotations

import pytest

from lifelong.editors import EDITORS, make_editor
from streams.errors import MissingFileError, UserError

BAD = [
    ("ft", "lr", "0"),
    ("ft", "max_steps", "0"),
    ("rome", "templates", "0"),
    ("r-rome", "v_stack", "mine"),
    ("rome", "stop_on", "sometimes"),
    ("memit", "key_average", "median"),
    ("alphaedit", "nullspace_rule", "loose"),
    ("emmet", "emmet_lambda", "-1"),
    ("emmet", "mom2_update_weight", "0"),
    ("grace", "query", "first"),
    ("grace", "same_key", "merge"),
    ("memory", "retriever", "dense"),
    ("memory", "top_k", "0"),
    ("memory", "template", "no placeholder"),
    ("wise", "variant", "both"),
    ("wise", "density", "0"),
    ("wise", "merge_freq", "30"),
    ("kn", "ig_steps", "0"),
    ("kn", "rule", "mine"),
    ("kn", "prompts", "all"),
    ("ultraedit", "solve", "cholesky"),
    ("ultraedit", "ridge", "0"),
    ("ultraedit", "eps", "-1"),
    ("ultraedit", "sub_batch", "0"),
    ("ultraedit", "modules", "sideways_proj:1"),
    ("memoir", "irr_threshold", "1.5"),
    ("memoir", "aggregate", "max"),
]


@pytest.mark.parametrize("editor,key,value", BAD)
def test_a_bad_setting_is_refused_when_the_editor_is_made(editor, key, value):
    with pytest.raises(UserError) as err:
        make_editor(editor, {key: value})
    message = str(err.value)
    assert message.startswith((f"{editor}: ", f"{editor}.{key}: ")) and "\n" not in message


def test_params_built_in_python_get_the_same_checks():
    from lifelong.editors.ft import FTEditor, FTParams
    from lifelong.editors.grace import GRACEEditor, GRACEParams

    with pytest.raises(UserError, match=r"^ft\.lr: must be greater than 0"):
        FTEditor(FTParams(lr=-1.0))
    with pytest.raises(UserError, match=r"^grace: query must be"):
        GRACEEditor(GRACEParams(query="first"))


def test_every_editor_with_checks_is_exercised():
    """A new editor with a ``validate`` should be added to BAD above."""
    checked = {name for name, cls in EDITORS.items() if hasattr(cls.Params, "validate")}
    assert checked <= {editor for editor, _, _ in BAD}, sorted(checked - {editor for editor, _, _ in BAD})


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_bind_records_every_model_dependent_default(name):
    from lifelong.core.models import load_model

    lm = load_model("tiny-llama")
    editor = make_editor(name)
    try:
        editor.bind(lm)
    except MissingFileError:  # MEND without a trained hypernetwork: its settings are resolved first
        pass
    finally:
        editor.release()
    unresolved = {k: v for k, v in editor.hyperparameters().items() if v is None or v == ""}
    unresolved.pop("hypernet", None)  # MEND: "" means the cached hypernetwork, not a default to resolve
    assert not unresolved, f"{name} leaves {unresolved} unresolved in the manifest"
