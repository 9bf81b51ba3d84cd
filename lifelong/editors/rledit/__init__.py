"""RLEdit (Li et al., "Reinforced Lifelong Editing for Language Models", ICML 2025).

A MALMEN-style hypernetwork turns each edit batch's keys and cross-entropy gradients at the edited
MLP projections into a least-squares update (:mod:`~lifelong.editors.rledit.network`), and is
trained as the authors train it: over whole edit sequences, each step's update scored on the
current and the previous ``back_depth`` batches with a discount γ, so that later edits are trained
not to undo earlier ones (:mod:`~lifelong.editors.rledit.training`, ``lifelong train-rledit``).
The training data, records split, learning curve, cache and overlap refusal are MEND's machinery
(:mod:`lifelong.editors.mend.training`). Defaults and every deviation: docs/EDITORS.md."""

from lifelong.editors.rledit.editor import RLEditEditor, RLEditParams
from lifelong.editors.rledit.network import (
    Hypernetwork,
    RLEditNet,
    RunningMeanStd,
    build_hypernetwork,
    default_layers,
    edit_targets,
    keys_and_grads,
    resolve_layers,
    resolve_params,
)
from lifelong.editors.rledit.training import (
    TRAINING_PRESETS,
    TrainConfig,
    format_curve,
    hypernet_dir,
    load_hypernetwork,
    sequence_objective,
    train_hypernetwork,
    training_preset,
    training_summary,
)

__all__ = [
    "Hypernetwork",
    "RLEditEditor",
    "RLEditNet",
    "RLEditParams",
    "RunningMeanStd",
    "TRAINING_PRESETS",
    "TrainConfig",
    "build_hypernetwork",
    "default_layers",
    "edit_targets",
    "format_curve",
    "hypernet_dir",
    "keys_and_grads",
    "load_hypernetwork",
    "resolve_layers",
    "resolve_params",
    "sequence_objective",
    "train_hypernetwork",
    "training_preset",
    "training_summary",
]
