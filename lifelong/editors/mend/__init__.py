"""MEND (Mitchell et al., ICLR 2022): a trained hypernetwork turns an edit's fine-tuning gradient into the update.

For a linear map W (out, in) inside the MLP, the gradient of the edit loss is a sum of
rank-one terms over tokens, ∇W = Σ_t δ_t u_tᵀ (u_t: the map's input, δ_t: the loss
gradient w.r.t. its output). For the gate and up projections u_t is the MLP's input
(the hidden state after the block's second norm); for the down projection it is the
activation product act(gate) ⊙ up. MEND maps each (u_t, δ_t) through a small network g:
the concatenation z = [u; δ] is normalised with running statistics from training, then

    h = z + ReLU(s₁ ⊙ (U₁V₁z + b₁) + t₁),   g(z) = h + s₂ ⊙ (U₂V₂h + b₂) + t₂,   [ũ_t; δ̃_t] = g(z_t),

with low-rank U_iV_i (rank r = 1920, the original's) and U_i initialised to zero, so g starts as the identity.
The update is W̃ = W − α_w Σ_t δ̃_t ũ_tᵀ with a learned step α_w per edited weight w
(initialised to ``edit_lr`` = 1e-4, as the original's ``edit_lrs``); it is stored as its
factors (−α_w δ̃, ũ), never as the dense product.

Which weights (``params``): by default, as the original MEND (``inner_params`` of its
``config/model/*.yaml``: ``mlp.c_fc`` and ``mlp.c_proj`` of GPT-2's last three layers) and
EasyEdit's MEND for Llama (``gate_proj``, ``up_proj``, ``down_proj`` of the last three),
every MLP projection of the last three layers: gate, up and down for gated (Llama-style)
MLPs, up (``c_fc``/``fc_in``/…) and down (``c_proj``/…) otherwise. As the original's
``mend.shared: true``, one network g is shared by all edited weights of the same shape
(gate and up: one, down: another), its normalisation statistics included, and the
per-weight conditioning is the original's ``n_modes`` scale and shift (s, t: one row per
weight of that shape, initialised to 1 and 0) on each layer's pre-activation.

``params=down`` is this editor as it was before: the down projections only, one unshared
network per layer and no per-weight scale/shift.

The gradient network is the original's ``IDMLP`` of two ``LRLinear`` layers, each
x + clamp(u v x + b, 0) (``NETWORK_FORM = "clamp"``, recorded in every trained file and its cache
key); files trained with the former form (ReLU, then nothing) are refused.

Differences from the original (``algs/mend.py``, ``nn.py``), named here:
* the update is W − α δ̃ũᵀ with α > 0 (kept as log α); the original adds ``edit_lrs × g``;
* normalisation statistics are merged per batch exactly (Chan et al.), not per token by
  Welford updates (the same numbers up to rounding), and they stop at the end of training;
* training stops at a cap sized for a CPU (``TrainConfig.steps``, 2,000 iterations) where the
  toolkit allows 100,000; a hypernetwork that reached it says "stopped at the cap".

Training (:func:`train_hypernetwork`, the ``lifelong train-mend`` command) minimises
c_edit·L_edit + c_loc·L_loc over the training split of the edited data set (``split:counterfact``
by default: the toolkit's CounterFact file less the subjects the reproduction edits): L_edit is
the new target's NLL on the edit prompt and its paraphrases after the update, L_loc the KL
divergence of the unedited from the edited model's predictions on locality prompts. Only the
hypernetworks and α learn; the model stays frozen. The settings are the toolkit's for Llama
models (``training=published``: lr 1e-6, lr_lr 1e-4, rank 1920, gradients of 10 one-edit
iterations per Adam step clipped at 100, validation every 1,000 iterations on 500 held-out
records, early stopping after 30,000 iterations without a better validation edit accuracy,
keeping the best network); ``training=cpu-small`` is the former CPU configuration. The result
is cached under the cache root keyed by model, layers, edited weights, training data and
settings, with the training records' prompts, so that a replay can refuse an evaluation stream
that overlaps them, and with how training ended (plateau or cap, steps, validation scores),
which the run manifest and ``show`` print. Training writes its learning curve (per step: edit
and locality loss; every ``eval_every`` steps: the validation scores) to ``curve.csv`` beside
the hypernetwork.

Modules: ``network`` (edited weights, the network, edit gradients), ``training`` (training loop,
learning curve, cached hypernetwork files), ``editor`` (:class:`MENDEditor`). The registry's
class path ``lifelong.editors.mend:MENDEditor`` (recorded by runs given it) imports from here.
"""

from lifelong.editors.mend.editor import MENDEditor, MENDParams, OverlapError
from lifelong.editors.mend.network import (
    GradientTransform,
    RunningNorm,
    build_hypernetwork,
    edit_gradient_factors,
    edit_targets,
    resolve_layers,
    resolve_params,
)
from lifelong.editors.mend.training import (
    TRAIN_SPLITS,
    TRAINING_PRESETS,
    TrainConfig,
    format_curve,
    hypernet_dir,
    load_hypernetwork,
    model_key,
    read_curve,
    train_hypernetwork,
    training_preset,
    training_split,
    training_summary,
)

__all__ = [
    "GradientTransform",
    "MENDEditor",
    "MENDParams",
    "OverlapError",
    "RunningNorm",
    "TrainConfig",
    "build_hypernetwork",
    "edit_gradient_factors",
    "edit_targets",
    "format_curve",
    "hypernet_dir",
    "load_hypernetwork",
    "model_key",
    "read_curve",
    "resolve_layers",
    "resolve_params",
    "train_hypernetwork",
    "training_preset",
    "training_split",
    "training_summary",
    "TRAIN_SPLITS",
    "TRAINING_PRESETS",
]
