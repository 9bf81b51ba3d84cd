"""MEMOIR: a residual memory on one MLP output projection, written through sparse prompt masks (Wang et al. 2025).

Defaults follow the authors' code (qym7/MEMOIR, a fork of the editing toolkit: ``easyeditor/models/memoir``,
``hparams/MEMOIR/llama3-8b.yaml``); every deviation is listed in docs/EDITORS.md ("MEMOIR").

The projection's output becomes W x + M x̃: M (out × in, zero at first) is the residual memory and
x̃ keeps only the input columns of one mask. An edit's mask comes from its prompt (TopHash): the
input x of the projection averaged over the prompt's tokens, minus a background mean (the same
average over 100 irrelevant texts, computed once on θ0), gives the ``top_k`` indices of largest
magnitude, which a fixed random permutation of the columns maps to the mask's columns. Each edit
trains M by SGD (lr 1, weight decay 1e-5, gradient norm clipped at 1, at most 30 steps, stopping as
the original's EarlyStopMeter) on the target's NLL over the bare prompt and 10 generated context
prefixes, every row read through the edit's mask; the mask is stored (once: a mask equal to a
stored one is not added again). Since the gradient reaches only the mask's columns, edits with
different prompts write mostly different columns of M.

At inference each row's mask is computed the same way from the tokens the row holds and compared
with every stored mask: the largest overlap (shared columns / ``top_k``) at or above
``irr_threshold`` selects that stored mask, whose columns then read the row; below it the row gets
nothing from M (its output is the base model's, bitwise). As in the original, where a teacher-forced
row is routed by its prompt's tokens and the answer's positions read through the same mask, a pass
over a KV cache (an answer's later tokens, generated tokens) takes the route its prompt's pass took:
the rows are recognised by the cache's first-layer keys over the prompt's positions. The weights
never change: ``apply`` returns an empty Delta and M, the masks, the permutation and the background
mean are editor state.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from lifelong.core.model_access import Codec
from lifelong.core.models import LoadedModel
from lifelong.editors.adaptor import TEMPLATE_LENGTHS, TEMPLATE_STARTS, AdaptorEditor, UpperLayers, generated_prefixes
from lifelong.editors.base import resolved
from lifelong.editors.hooks import first_input, stop_after
from streams import Edit
from streams.errors import UserError

# The authors' setting for Llama-3-8B (hparams/MEMOIR/llama3-8b.yaml): down_proj of layer 27 of 32, and
# top_k 4096 of its 14,336 input columns; both scale to the model in hand.
ORIGINAL_LAYER, ORIGINAL_DEPTH = 27, 32
ORIGINAL_TOP_K, ORIGINAL_WIDTH = 4096, 14336


@dataclass
class MEMOIRParams:
    layer: int | None = None  # None: round(27/32 × depth), the authors' layer scaled (25 of SmolLM2's 30)
    top_k: int | None = None  # mask columns; None: round(4096/14336 × the projection's input width)
    irr_threshold: float = 0.4  # overlap with the best stored mask at or above which a row reads the memory
    lr: float = 1.0  # SGD, the original's edit_lr
    max_steps: int = 30  # the original's n_iter
    weight_decay: float = 1e-5  # the original's SGD weight decay (on the whole memory)
    clip_norm: float = 1.0  # the memory's gradient norm is clipped to this (clip_grad_norm_)
    stop_loss: float = 0.02  # stop once the loss is ≤ this ...
    stop_delta: float = 1e-4  # ... and changed by at most this over the last step (EarlyStopMeter)
    templates: int = 10  # generated context prefixes besides the bare prompt (0: the bare prompt only)
    aggregate: str = "mean_decentered"  # prompt_feature_agg: mean_decentered, mean or last
    background: str = "zsre_mend"  # irrelevant texts for the background mean: zsre_mend (NQ) or pool
    background_samples: int = 100  # how many of them
    seed: int = 0  # seeds the column permutation

    def validate(self, editor: str) -> None:
        if not 0 <= self.irr_threshold <= 1:
            raise UserError(f"{editor}: irr_threshold must be in [0, 1], got {self.irr_threshold}")
        if self.aggregate not in ("mean_decentered", "mean", "last"):
            raise UserError(f"{editor}: aggregate must be mean_decentered, mean or last, got '{self.aggregate}'")
        if self.background not in ("zsre_mend", "pool"):
            raise UserError(f"{editor}: background must be zsre_mend or pool, got '{self.background}'")
        if self.background_samples < 1:
            raise UserError(f"{editor}: background_samples must be at least 1, got {self.background_samples}")
        if not 0 <= self.templates <= len(TEMPLATE_STARTS) * len(TEMPLATE_LENGTHS):
            raise UserError(f"{editor}: templates must be in 0..{len(TEMPLATE_STARTS) * len(TEMPLATE_LENGTHS)}")
        if not self.clip_norm > 0:
            raise UserError(f"{editor}: clip_norm must be greater than 0, got {self.clip_norm}")


def default_memoir_layer(num_layers: int) -> int:
    """The authors' layer (27 of Llama-3-8B's 32) at the same relative depth, within the model."""
    return min(num_layers - 1, round(ORIGINAL_LAYER / ORIGINAL_DEPTH * num_layers))


def default_top_k(width: int) -> int:
    """The authors' share of mask columns (4096 of 14,336) of a projection ``width`` inputs wide."""
    return max(1, round(ORIGINAL_TOP_K / ORIGINAL_WIDTH * width))


def background_texts(source: str, count: int) -> list[str]:
    """The irrelevant texts whose mean feature is subtracted before hashing. ``zsre_mend``: the first
    ``count`` NQ questions with their answers (``loc + " " + loc_ans``) of the zsRE training sample, the
    irrelevant samples the original's background file was computed from; ``pool``: WISE's fixed sentences."""
    if source == "pool":
        from lifelong.editors.wise import IRRELEVANT

        return list(IRRELEVANT[:count])
    from streams.readers.registry import dataset_path

    path = dataset_path("zsre_mend")
    records = json.loads(path.read_text())
    texts = [f"{r['loc']} {r['loc_ans']}" for r in records[:count] if r.get("loc") and r.get("loc_ans")]
    if not texts:
        raise UserError(f"memoir: {path} holds no loc/loc_ans pair for the background features")
    return texts


def pool_features(x: torch.Tensor, real: torch.Tensor, how: str) -> torch.Tensor:
    """(rows, width) prompt features from (rows, tokens, width) inputs: the mean over each row's real
    tokens, or its last real token (``how="last"``); float32."""
    x = x.float()
    if how == "last":
        length = real.shape[1]
        last = (real.long() * torch.arange(1, length + 1, device=real.device)).argmax(1)
        return x[torch.arange(x.shape[0], device=x.device), last]
    weight = real.to(x.dtype)
    return (x * weight[..., None]).sum(1) / weight.sum(1).clamp(min=1)[:, None]


def top_hash(features: torch.Tensor, top_k: int, permutation: torch.Tensor) -> torch.Tensor:
    """TopHash: (rows, width) bool masks, True at the permuted indices of each row's ``top_k`` entries
    of largest magnitude (the original's ``TopHasher.get_active_indices``)."""
    indices = features.abs().topk(top_k, dim=-1).indices
    masks = torch.zeros(features.shape, dtype=torch.bool, device=features.device)
    return masks.scatter_(-1, permutation.to(features.device)[indices], True)


def first_keys(cache) -> torch.Tensor:
    """A KV cache's first-layer keys, (rows, heads, positions, head dim)."""
    return cache.layers[0].keys


def carried_routes(keys: torch.Tensor, prompt_keys: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """Per row of a cache whose first-layer keys are ``keys``: the route of the prompt row whose keys
    (``prompt_keys``, over the prompt pass's positions) its first positions equal bitwise, or -2 where
    none does. Selecting and reordering a cache's rows copies them, so a row's keys stay equal."""
    width = prompt_keys.shape[2]
    out = torch.full((keys.shape[0],), -2, dtype=torch.long, device=routes.device)
    if keys.shape[1:2] != prompt_keys.shape[1:2] or keys.shape[2] < width or keys.shape[3] != prompt_keys.shape[3]:
        return out
    now = keys[:, :, :width].flatten(1)
    stored = prompt_keys.to(now.device).flatten(1)
    # one value per position screens the candidates; the whole row decides
    screen = (now[:, :: keys.shape[3]][:, None] == stored[:, :: keys.shape[3]][None]).all(-1)
    for row, candidates in enumerate(screen):
        for j in candidates.nonzero().flatten().tolist():
            if torch.equal(now[row], stored[j]):
                out[row] = routes[j]
                break
    return out


class MEMOIREditor(AdaptorEditor[MEMOIRParams]):
    name = "memoir"
    description = "MEMOIR residual memory on one MLP output projection, written and read through TopHash prompt masks"
    Params = MEMOIRParams
    precision_parts: ClassVar[dict[str, str]] = {"residual_memory": "float32", "prompt_features": "float32"}

    def __init__(self, params=None):
        super().__init__(params)
        self.reset()
        self.permutation: torch.Tensor | None = None  # the column permutation (seeded at bind)
        self.background: torch.Tensor | None = None  # the background mean feature (θ0, computed in prepare)
        self._training: tuple[torch.Tensor, torch.Tensor] | None = None  # (memory being trained, its mask)
        self._bypass = False  # True: the hook passes everything through (templates, features)
        self._templates: list[str] | None = None
        self._templates_for = None
        self._on_device: dict[torch.device, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._past = None  # the KV cache the body's current forward continues, if any
        self._pending: torch.Tensor | None = None  # routes of the current prompt pass, kept once it returns a cache
        self._routes: tuple[torch.Tensor, torch.Tensor] | None = None  # (first-layer keys, routes) of that pass
        self.last_match = torch.zeros(0, dtype=torch.long)  # per row of the last forward: stored mask read, or -1
        self.last_steps: list[int] = []  # per edit of the last apply: training steps taken

    def reset(self) -> None:
        self.memory: torch.Tensor | None = None  # M, (out, in) float32, on the host
        self.masks = torch.zeros(0, 0, dtype=torch.bool)  # (stored masks, in)
        self.edits = 0
        self._version = getattr(self, "_version", 0) + 1  # device copies are stale
        self._routes = None  # routes taken under the former memory

    # -- binding, θ0 statistics
    def bind(self, lm: LoadedModel) -> MEMOIREditor:
        if self.params.layer is None:
            self.params = replace(self.params, layer=default_memoir_layer(lm.num_layers))
        super().bind(lm)
        width = lm.adapter.out_proj_weight_view(self.layer).shape[1]
        top_k = default_top_k(width) if self.params.top_k is None else self.params.top_k
        if top_k > width:
            raise UserError(f"memoir: top_k {top_k} exceeds the {width} input columns of layer {self.layer}")
        self.params = replace(self.params, top_k=top_k)
        if self.permutation is None or len(self.permutation) != width:
            # host: a CPU generator draws the same permutation on every device
            self.permutation = torch.randperm(width, generator=torch.Generator().manual_seed(self.params.seed))
        return self

    @property
    def top_k(self) -> int:
        """Mask columns, as ``bind`` resolved them."""
        return resolved(self.params.top_k, self.name, "top_k")

    def _attach(self, lm: LoadedModel) -> None:
        super()._attach(lm)
        self._hooks.on_output(lm.adapter.body(), self._remember_routes)

    def _remember_mask(self, module, args, kwargs):
        super()._remember_mask(module, args, kwargs)
        cache = kwargs.get("cache")
        self._past = cache if cache is not None and cache.get_seq_length() > 0 else None
        self._pending = None

    def _remember_routes(self, module, args, out):
        """After a prompt pass that returns a KV cache: its first-layer keys and routes, for the passes
        that continue it."""
        pending, self._pending = self._pending, None
        cache = getattr(out, "cache", None)
        if pending is not None:
            self._routes = None if cache is None else (first_keys(cache).detach().clone(), pending)

    def prepare(self, lm: LoadedModel) -> None:
        self.bind(lm)
        self.context_templates(lm)
        if self.params.aggregate == "mean_decentered" and self.background is None:
            texts = background_texts(self.params.background, self.params.background_samples)
            feats = torch.stack([self.prompt_feature(lm, text) for text in texts])
            self.background = feats.mean(0).cpu()
            self._version += 1

    def context_templates(self, lm: LoadedModel) -> list[str]:
        """``["{}"]`` plus ``templates`` generated prefixes (:func:`generated_prefixes`), once per model."""
        if self._templates is None or self._templates_for is not lm.model:
            self._bypass = True
            try:
                prefixes = generated_prefixes(lm)
            finally:
                self._bypass = False
            self._templates = ["{}"] + [p + " {}" for p in prefixes[: self.params.templates]]
            self._templates_for = lm.model
        return self._templates

    def prompt_feature(self, lm: LoadedModel, text: str) -> torch.Tensor:
        """The projection's input over ``text``'s tokens, pooled by ``aggregate`` (not decentred)."""
        ids = torch.tensor([Codec(lm.tokenizer).prompt_ids(text)], device=lm.device)
        self._bypass = True
        try:
            with torch.no_grad(), stop_after(lm.adapter.out_proj(self.layer), first_input) as seen:
                lm.adapter.body()(input_ids=ids, use_cache=False)
        finally:
            self._bypass = False
        x = seen[0]
        return pool_features(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), self.params.aggregate)[0]

    def masks_for(self, features: torch.Tensor) -> torch.Tensor:
        """Masks for (rows, width) pooled features: decentred by the background mean, then TopHash."""
        if self.params.aggregate == "mean_decentered":
            if self.background is None:
                raise UserError("memoir: the background features are not computed yet (call prepare first)")
            features = features - self.background.to(features.device)
        assert self.permutation is not None  # drawn by bind
        return top_hash(features, self.top_k, self.permutation)

    # -- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.memory is None:
            return {}
        assert self.permutation is not None
        state = {
            "memory": self.memory.clone(),
            "masks": self.masks.clone(),
            "permutation": self.permutation.clone(),
            "edits": torch.tensor(self.edits),
        }
        if self.background is not None:
            state["background"] = self.background.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        if not state:
            return
        missing = {"memory", "masks", "permutation", "edits"} - set(state)
        if missing:
            raise ValueError(f"memoir: state lacks {sorted(missing)}")
        self.memory = state["memory"].float().clone()
        self.masks = state["masks"].bool().clone()
        self.permutation = state["permutation"].long().clone()
        self.edits = int(state["edits"])
        if "background" in state:
            self.background = state["background"].float().clone()

    def _device_copies(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """M and the stored masks on ``device``, cached until either changes."""
        cached = self._on_device.get(device)
        if cached is None or cached[0] != self._version:
            assert self.memory is not None
            cached = (self._version, self.memory.to(device), self.masks.to(device))
            self._on_device = {device: cached}
        return cached[1], cached[2]

    # -- the hook
    def _hook(self, module, args, out):
        if self._bypass:
            return out
        x = args[0]
        if self._training is not None:  # an edit's training forward: every row through the edit's mask
            memory, mask = self._training
            change = F.linear(x.float() * mask, memory)
            return out + change.to(out.dtype)
        rows = x.shape[0]
        self.last_match = torch.full((rows,), -1, dtype=torch.long)
        if self.memory is None or not len(self.masks):
            return out
        memory, stored = self._device_copies(x.device)
        match = None
        if self._past is not None and self._routes is not None:
            match = carried_routes(first_keys(self._past), *self._routes)
        if match is None or bool((match == -2).any()):  # a prompt pass, or a cache no prompt pass here made
            real = self.token_mask(x.shape[:2]).to(x.device)
            masks = self.masks_for(pool_features(x, real, self.params.aggregate))
            overlap = masks.float() @ stored.float().T / self.top_k  # (rows, stored)
            best, found = overlap.max(1)
            own = torch.where((best >= self.params.irr_threshold) & real.any(1), found, torch.full_like(found, -1))
            match = own if match is None else torch.where(match == -2, own, match)
            if self._past is None:
                self._pending = match
        self.last_match = match.cpu()
        routed = match >= 0
        if not bool(routed.any()):
            return out
        change = F.linear(x.float() * stored[match.clamp(min=0)][:, None, :], memory)
        return torch.where(routed[:, None, None], out + change.to(out.dtype), out)

    # -- editing
    def apply(self, lm: LoadedModel, batch: Sequence[Edit]):
        self.prepare(lm)
        self.last_steps = []
        return super().apply(lm, batch)

    def step_report(self) -> dict:
        if not self.last_steps:
            return {}
        return {"mean_train_steps": sum(self.last_steps) / len(self.last_steps), "masks": len(self.masks)}

    def edit_one(self, lm: LoadedModel, edit: Edit) -> torch.Tensor:
        """Train M on ``edit`` through its prompt's mask and store the mask; returns the mask."""
        p = self.params
        weight = lm.adapter.out_proj_weight_view(self.layer)
        if self.memory is None:
            self.memory = torch.zeros(weight.shape)
        mask = self.masks_for(self.prompt_feature(lm, edit.rendered_prompt)[None])[0].to(weight.device)
        codec = Codec(lm.tokenizer)
        templates = self.context_templates(lm)
        batch = codec.collate(
            [codec.encode(t.format(edit.rendered_prompt), edit.target_new) for t in templates], lm.device
        )
        upper = UpperLayers(lm, self.layer, batch)
        owner = torch.as_tensor(batch.owner, device=lm.device)
        # The original's label mask starts one position before the first target token, at a position
        # whose loss is 0: each row's mean is its target NLL summed over n + 1 positions.
        per_row = torch.bincount(owner, minlength=len(templates)).float() + 1

        memory = self.memory.to(weight.device, copy=True).requires_grad_(True)
        optimizer = torch.optim.SGD([memory], lr=p.lr, weight_decay=p.weight_decay)
        self._training = (memory, mask.float())
        val, pre = 1e9, 0.0  # the original's EarlyStopMeter
        steps = 0
        try:
            # the meter is checked before each step; the original computes that step's loss first, unused
            while steps < p.max_steps and not (abs(val - pre) <= p.stop_delta and val <= p.stop_loss):
                logits = upper.answer_logits()
                lp = logits.log_softmax(-1).gather(1, batch.targets[:, None])[:, 0]
                row_nll = torch.zeros(len(templates), device=lp.device).index_add(0, owner, -lp) / per_row
                loss = row_nll.mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(memory, max_norm=p.clip_norm)
                optimizer.step()
                pre, val = val, loss.item()
                steps += 1
        finally:
            self._training = None
        self.memory = memory.detach().cpu()
        mask = mask.cpu()
        if not len(self.masks):
            self.masks = mask[None].clone()
        elif not bool((self.masks == mask).all(1).any()):  # as the original, a mask already stored is not added
            self.masks = torch.cat([self.masks, mask[None]])
        self.edits += 1
        self._version += 1
        self._routes = None
        self.last_steps.append(steps)
        return mask


__all__: Sequence[str] = (
    "MEMOIREditor",
    "MEMOIRParams",
    "carried_routes",
    "default_memoir_layer",
    "default_top_k",
    "top_hash",
)
