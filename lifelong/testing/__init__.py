"""A property-testing kit for editors: hypothesis strategies, tiny models and invariant checks.

Any :class:`~lifelong.editors.base.Editor` — one of ours or your own — can be checked
against the contract of docs/DESIGN.md §3/§5 on tiny seeded models in a few seconds::

    from lifelong.testing import check_editor
    from lifelong.editors import make_editor

    report = check_editor(lambda: make_editor("ft", {"layer": "1", "max_steps": "15"}),
                          model="tiny-llama", max_examples=3)
    print(report)               # one line per invariant, and a minimal failing example for each failure
    report.raise_if_failed()    # AssertionError with that summary (works in pytest and in plain Python)

On a shared machine, ``torch.set_num_threads(1)`` first makes these tiny-model checks
several times faster (OpenMP threads spin when the cores are busy).

``editor_factory`` is called for a fresh editor every time one is needed, so no state
leaks between examples. Hypothesis draws short edit streams (:func:`edit_streams`)
over a small vocabulary, runs each invariant, and shrinks a failure to a minimal
stream, which the report prints.

The invariants (:data:`INVARIANTS`; pick a subset by name with ``invariants=[...]``):

- ``revert_restores_base``: after any steps, ``DeltaStore.revert_to_base`` / ``checkout(0)``
  give back θ0 bitwise, for every parameter of the model;
- ``checkout_equals_live``: ``lifelong.replay.checkout(run, k)`` equals the live model at step k;
- ``empty_batch_is_noop``: ``apply(lm, [])`` returns an empty Delta and changes nothing;
- ``deterministic``: same model, same seed, same edits -> bitwise equal weights and deltas;
- ``scope_respected``: parameters outside ``editor.scope(lm)`` stay bitwise unchanged;
- ``delta_matches_change``: live weights after a step == weights before + the returned Delta;
- ``resume_same_results``: a replay killed after some steps and resumed by a fresh process
  (fresh model, fresh editor, state from ``state_dict``) ends with the same results table;
- ``metric_bounds``: every score of a replay with the default probes and the chain probe lies in
  its range in ``probes.metric_table`` ([0, 1] for fractions, [0, ln 2] for Jensen-Shannon
  distortion, ...).

Editor-specific equations apply only to the editors they are registered for
(:data:`EQUATIONS`, :func:`register_equation`), or that an editor lists itself
through an optional ``testing_invariants()`` method returning :class:`Invariant` s;
``rome_writes_key_value`` (‖W'k + b − v*‖/‖v*‖ < 1e-4) is registered for ROME and r-ROME,
``alphaedit_preserves_nullspace_outputs`` (ΔW maps preserved keys to ~0) for AlphaEdit,
``ultraedit_solves_ridge`` (ΔW = solve(KᵀK + λI, KᵀV)ᵀ with the running normaliser) for UltraEdit,
``rledit_applies_hypernetwork`` (ΔWᵀ = (KᵀK + e^λI)⁻¹KᵀV through the trained network) for RLEdit.
A later editor adds its own, e.g. GRACE "identity outside the codebook radii"::

    register_equation(MyEditor, Invariant("my_equation", my_check, "what it checks"))

The kit drives the real replay loop for the run-level invariants, passing it a fresh
editor from the factory, so unregistered editors are tested the same way.

Modules: ``strategies`` (hypothesis strategies), ``invariants`` (the generic ones), ``equations``
(editor-specific ones), ``runner`` (:func:`check_editor`, :class:`Report`); every public name is
importable from ``lifelong.testing``. hypothesis comes with the ``testing`` extra
(``pip install 'lifelong-editing[testing]'``); without it this package still imports, and the
strategies and :func:`check_editor` raise an ImportError that names the extra.
"""

from __future__ import annotations

from importlib import import_module

from lifelong.testing.equations import EQUATIONS, invariants_for, register_equation
from lifelong.testing.invariants import INVARIANTS, EditorUnderTest, Invariant, InvariantViolation, fresh_model
from lifelong.testing.runner import Failure, Report, check_editor, format_stream

# The strategies need hypothesis at import: loaded on first use, so that the rest imports without it.
_STRATEGIES = ("SUBJECTS", "RELATIONS", "facts", "edits", "edit_streams", "tiny_model_specs", "tiny_models")


def __getattr__(name: str):
    if name in _STRATEGIES:
        value = getattr(import_module("lifelong.testing.strategies"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SUBJECTS",
    "RELATIONS",
    "facts",
    "edits",
    "edit_streams",
    "tiny_model_specs",
    "tiny_models",
    "fresh_model",
    "format_stream",
    "Invariant",
    "InvariantViolation",
    "EditorUnderTest",
    "INVARIANTS",
    "EQUATIONS",
    "register_equation",
    "invariants_for",
    "Failure",
    "Report",
    "check_editor",
]
