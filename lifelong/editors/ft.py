"""FT-L: constrained fine-tuning of one MLP output projection (Zhu et al. 2020, as in ROME's baselines).

The default follows the baseline's public code (kmeng01/rome ``baselines/ft/ft_main.py``, and the
editing toolkit's copy, EasyEdit ``easyeditor/models/ft/ft_main.py`` with
``objective_optimization: prompt_last``) and the hparams file published for the model's family
(``FT_FILES``): for each epoch, the step's edits are taken in chunks of ``batch_size``; a chunk's
loss is the mean over its edits of the mean NLL of the new target's tokens, all read at the last
prompt position (``objective=prompt_last``); Adam steps only while that loss is at least
``stop_loss``, the change is clamped to an L∞ ball of radius ``norm_constraint`` around the weight
before the step (0: no bound, the files' ``norm_constraint: false``), and training ends when the
epoch's mean loss is below ``stop_loss``.

``hparams=none`` is this project's former FT (a named variant, close to FT-M): the loss on every
target token given the gold prefix (``objective=target_new``), lr = bound = 1e-2 at num_layers // 5,
one chunk, stopping once every edit's NLL is below 0.05 (``stop_rule=every-edit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from lifelong.core.delta import Delta, ParamChange
from lifelong.core.model_access import Collated
from lifelong.core.models import LoadedModel
from lifelong.core.scorer import Scorer
from lifelong.editors.base import Editor, HyperparameterError, Snapshot, check_hparams_name, from_hparams_file, resolved
from streams import Edit

EASYEDIT = "zjunlp/EasyEdit@14cea82"
KMENG = "kmeng01/rome@0874014"
_ORIGINAL = dict(max_steps=25, stop_loss=1e-2, objective="prompt_last", stop_rule="epoch-mean")
# Values read from the files (layers, lr, norm_constraint, batch_size; num_steps 25 in each;
# weight_decay and kl_factor 0 in each; kmeng01's files leave batch_size at FTHyperParams' 128).
FT_FILES: dict[str, dict] = {
    f"{EASYEDIT}:hparams/FT/llama-7b.yaml": dict(layer=21, lr=5e-4, norm_constraint=0.0, batch_size=1, **_ORIGINAL),
    f"{EASYEDIT}:hparams/FT/mistral-7b.yaml": dict(layer=21, lr=5e-4, norm_constraint=5e-5, batch_size=1, **_ORIGINAL),
    f"{EASYEDIT}:hparams/FT/qwen2-7b.yaml": dict(layer=27, lr=5e-4, norm_constraint=0.0, batch_size=1, **_ORIGINAL),
    f"{KMENG}:hparams/FT/gpt2-xl_constr.json": dict(
        layer=0, lr=5e-4, norm_constraint=5e-4, batch_size=128, **_ORIGINAL
    ),
    f"{KMENG}:hparams/FT/EleutherAI_gpt-j-6B_constr.json": dict(
        layer=0, lr=5e-4, norm_constraint=5e-5, batch_size=128, **_ORIGINAL
    ),
    # This project's FT before the files were followed: the named variant.
    "none": dict(
        layer=None,
        lr=1e-2,
        norm_constraint=1e-2,
        max_steps=25,
        stop_loss=0.05,
        batch_size=10_000,  # the whole step in one chunk (a step holds at most 10,000 edits)
        objective="target_new",
        stop_rule="every-edit",
    ),
}
FT_FAMILY_FILES = {
    "llama": f"{EASYEDIT}:hparams/FT/llama-7b.yaml",
    "mistral": f"{EASYEDIT}:hparams/FT/mistral-7b.yaml",
    "qwen2": f"{EASYEDIT}:hparams/FT/qwen2-7b.yaml",
    "gpt2": f"{KMENG}:hparams/FT/gpt2-xl_constr.json",
    "gptj": f"{KMENG}:hparams/FT/EleutherAI_gpt-j-6B_constr.json",
}
OBJECTIVES = ("prompt_last", "target_new")
STOP_RULES = ("epoch-mean", "every-edit")


@dataclass
class FTParams:
    # Where the settings left at None come from: "family" (the family's file, see FT_FILES),
    # "none" (this project's former FT), or one of FT_FILES' names; after bind() the file used.
    hparams: str = "family"
    layer: int | None = None  # None: the file's (Llama: 21; "none": num_layers // 5)
    lr: float | None = None  # Adam learning rate. None: the file's (5e-4; "none": 1e-2)
    max_steps: int | None = None  # epochs at most (the files' num_steps, 25)
    norm_constraint: float | None = None  # L∞ bound on the change per step, 0: none. None: the file's (Llama: 0)
    stop_loss: float | None = None  # the early-stop loss (the files' 1e-2; "none": 0.05)
    batch_size: int | None = None  # edits per Adam step within an epoch. None: the file's (Llama: 1)
    # "prompt_last": every target token's NLL read at the last prompt position (ROME's FT-L);
    # "target_new": each target token given the gold prefix (FT-M). None: the file's.
    objective: str | None = None
    # "epoch-mean": the original's rule (a chunk steps while its loss >= stop_loss; stop when the
    # epoch's mean is below); "every-edit": stop once every edit's NLL is below. None: the file's.
    stop_rule: str | None = None

    def validate(self, editor: str) -> None:
        check_hparams_name(self.hparams, FT_FILES, editor)
        for setting, allowed in (("objective", OBJECTIVES), ("stop_rule", STOP_RULES)):
            value = getattr(self, setting)
            if value is not None and value not in allowed:
                raise HyperparameterError(f"{editor}: {setting} must be one of {', '.join(allowed)}, got '{value}'")


@dataclass(frozen=True)
class FTSettings:
    """FTParams as ``bind`` resolved them (every setting filled in from the hparams file)."""

    layer: int
    lr: float
    max_steps: int
    norm_constraint: float
    stop_loss: float
    batch_size: int
    objective: str
    stop_rule: str


class FTEditor(Editor[FTParams]):
    name = "ft"
    description = "FT-L: fine-tuning of one MLP output projection, Adam, L-inf bound, loss at the last prompt token"
    Params = FTParams

    def bind(self, lm: LoadedModel) -> FTEditor:
        self.params = from_hparams_file(self.params, lm, FT_FAMILY_FILES, FT_FILES, self.name)
        return self

    @property
    def layer(self) -> int:
        """The layer edited, as ``bind`` resolved it."""
        return resolved(self.params.layer, self.name, "layer")

    @property
    def settings(self) -> FTSettings:
        """The settings as ``bind`` resolved them."""
        values = {f.name: resolved(getattr(self.params, f.name), self.name, f.name) for f in fields(FTSettings)}
        return FTSettings(**values)

    def scope(self, lm: LoadedModel) -> list[str]:
        return [lm.adapter.out_proj_param_name(self.bind(lm).layer)]

    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        if not batch:
            return Delta.empty()
        name = self.scope(lm)[0]
        p = self.settings
        weight = lm.model.get_parameter(name)
        snapshot = Snapshot(lm.model, [name])
        before = snapshot[name]
        scorer = Scorer(lm.model, lm.tokenizer)
        encoded = [scorer.encode(e.rendered_prompt, e.target_new) for e in batch]
        chunks = [scorer.collate(encoded[i : i + p.batch_size]) for i in range(0, len(batch), p.batch_size)]

        weight.requires_grad_(True)
        try:
            self._train(scorer, chunks, weight, before, len(batch))
        finally:
            weight.requires_grad_(False)
            weight.grad = None
        # The trained change, re-applied through a Delta from the weights before it (bitwise checkout).
        with torch.no_grad():
            change = weight.detach() - before
        return snapshot.restore_and_apply({name: ParamChange(dense=change)})

    def _train(self, scorer: Scorer, chunks: list[Collated], weight: torch.Tensor, before: torch.Tensor, n: int):
        p = self.settings
        optimizer = torch.optim.Adam([weight], lr=p.lr)
        for _ in range(p.max_steps):
            epoch_sum = 0.0
            for data in chunks:
                per_edit = self._per_edit_nll(scorer, data)
                loss = per_edit.mean()
                epoch_sum += loss.item() * len(per_edit)
                if p.stop_rule == "every-edit" and per_edit.max().item() < p.stop_loss:
                    return
                if p.stop_rule == "epoch-mean" and loss.item() < p.stop_loss:
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if p.norm_constraint:
                    with torch.no_grad():
                        torch.clamp(weight, before - p.norm_constraint, before + p.norm_constraint, out=weight)
            if p.stop_rule == "epoch-mean" and epoch_sum / n < p.stop_loss:
                return

    def _per_edit_nll(self, scorer: Scorer, data: Collated) -> torch.Tensor:
        """Each edit's mean target-token NLL under the objective (differentiable)."""
        logits = scorer.answer_logits(data)
        owner = torch.as_tensor(data.owner, device=logits.device)
        edits = int(data.owner.max()) + 1
        if self.settings.objective == "prompt_last":
            # The first answer position of each edit is its last prompt token: read every target there.
            first = torch.full((edits,), len(owner), device=logits.device).scatter_reduce(
                0, owner, torch.arange(len(owner), device=logits.device), "amin"
            )
            logits = logits[first[owner]]
        token_nll = -logits.log_softmax(-1).gather(1, data.targets[:, None])[:, 0]
        counts = torch.bincount(owner, minlength=edits)
        return torch.zeros(edits, device=logits.device).index_add(0, owner, token_nll) / counts
