"""WISE: a side memory for one FFN output projection, with routing, sharding and merging (Wang et al. 2024).

Defaults follow the public WISE code (EasyEdit ``easyeditor/models/wise``, ``hparams/WISE``);
our earlier choices remain as settings (docs/EDITORS.md, "Editors that leave the weights alone").

Edits go into a copy W' of layer ``layer``'s MLP output projection W (the main memory
stays untouched). Δact(x) is the mean over x's tokens of ‖σ(W'x) − σ(Wx)‖, σ being the
model's MLP activation (``hidden_act`` / ``activation_function``) applied to both
projections' outputs, as the original's ``euc`` does (``activation=none``: ‖(W'−W)x‖).
Each edit trains the open shard's Δ = W' − W by SGD on the target's NLL over the bare
prompt and 10 context prefixes (greedy continuations, by the model in hand, of "I",
"You", "Because", "Yes", "Q: " — 5 and 10 new tokens — as the original builds them), plus
the activation margins: the irrelevant input's Δact below α, every template row's above β,
and the gap at least γ (each a mean over its violated terms only, as the original). The
irrelevant input is one sentence per edit (the original pairs each edit with one
question+answer from the data set's training split, not with its evaluated locality
prompt): here from a fixed project-written pool, picked by the edit's id
(``irrelevant=neighborhood``: the edit's own first neighborhood prompt and answer).
Gradients are masked by the shard's random mask (``mask_ratio``), Δ stays in an L∞ ball of
``norm_constraint``, and training stops when the last two total losses are ≤ ``stop_loss``
and within ``stop_delta`` of each other (the original's EarlyStopMeter).

Every ``save_freq`` edits the shard is closed and a new one starts with a fresh mask;
every ``merge_freq`` edits the closed shards are TIES-merged (trim to ``density``, elect
signs, disjoint mean; an existing side memory joins with weight 0.6, the shards share 0.4).

Routing, WISE-Merge (``variant=merge``, the default): before evaluation the original
merges what is pending (closed shards, and the open shard once ``save_freq`` edits were
made) into the side memory. We evaluate on that merged view without changing the training
state, so probing between steps does not alter later edits (the original's one final
evaluation sees the same model). A row gets the side memory's (or, before ``save_freq``
edits, the open shard's) output when its Δact reaches ``act_ratio`` × the smallest Δact of
an edit, otherwise the main memory's. WISE-Retrieve (``variant=retrieve``): shards are not
merged before evaluation; every ``merge_freq`` the last shards merge into one memory of
their own; each memory keeps the smallest Δact of its edits as its threshold and a row
goes to the memory with the largest Δact above its threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from lifelong.core.model_access import Codec
from lifelong.core.models import LoadedModel
from lifelong.editors.adaptor import (
    TEMPLATE_LENGTHS,
    TEMPLATE_STARTS,
    AdaptorEditor,
    UpperLayers,
    generated_prefixes,
    label_id,
)
from streams import Edit
from streams.errors import UserError

# Irrelevant text for the out-of-scope margin (written for the project; not probe data).
IRRELEVANT = (
    "The weather was mild and the children played outside until dinner.",
    "Add two cups of flour and stir the mixture slowly.",
    "The train to the coast leaves every hour from platform four.",
    "She opened the window and listened to the rain.",
    "Prices in the shop went up again this month.",
    "He fixed the bicycle chain with an old pair of pliers.",
    "The meeting was moved to Thursday afternoon.",
    "Water boils faster when the pot has a lid on it.",
)

LONG_ROW = 100  # the original pools Δact with the max instead of the mean over rows longer than this


@dataclass
class WISEParams:
    layer: int | None = None  # None: 4/5 of the depth (layer 24 of 30 for SmolLM2)
    variant: str = "merge"  # merge (WISE-Merge, the paper's WISE) or retrieve (WISE-Retrieve)
    lr: float = 1.0  # SGD, the original's edit_lr
    max_steps: int = 70  # the original's n_iter
    mask_ratio: float = 0.2  # fraction of W' entries each shard may change
    norm_constraint: float = 1.0  # L∞ bound on Δ = W' − W (our earlier setting: 0.1)
    alpha: float = 5.0  # irrelevant Δact must stay below (earlier: 2)
    beta: float = 20.0  # the edit's Δact must exceed (earlier: 8)
    gamma: float = 10.0  # margin between the edit's and the irrelevant Δact (earlier: 4)
    activation: str = "model"  # model: σ of the model's MLP on both outputs (original); none: ‖ΔW x‖
    templates: int = 10  # generated context prefixes besides the bare prompt (0: the bare prompt only)
    irrelevant: str = "pool"  # pool: one fixed sentence per edit; neighborhood: the edit's own neighbor
    act_ratio: float = 0.88  # routing threshold = act_ratio × min Δact seen on edits
    save_freq: int = 20  # edits per shard (scaled down from the original's 500 for short streams)
    merge_freq: int = 40  # edits between merges (a multiple of save_freq; the original's 1000)
    density: float = 0.53  # TIES trim density
    stop_loss: float = 0.02  # stop once the total loss is ≤ this ...
    stop_delta: float = 1e-4  # ... and changed by at most this over the last step (EarlyStopMeter)
    seed: int = 0  # seeds the shards' masks

    def validate(self, editor: str) -> None:
        if not 0 < self.mask_ratio <= 1 or not 0 < self.density <= 1:
            raise UserError(f"{editor}: mask_ratio and density must be in (0, 1]")
        if self.save_freq < 1 or self.merge_freq < self.save_freq or self.merge_freq % self.save_freq:
            raise UserError(
                f"{editor}: merge_freq ({self.merge_freq}) must be a positive multiple of save_freq ({self.save_freq})"
            )
        if self.variant not in ("merge", "retrieve"):
            raise UserError(f"{editor}: variant must be merge or retrieve, got '{self.variant}'")
        if self.activation not in ("model", "none"):
            raise UserError(f"{editor}: activation must be model or none, got '{self.activation}'")
        if self.irrelevant not in ("pool", "neighborhood"):
            raise UserError(f"{editor}: irrelevant must be pool or neighborhood, got '{self.irrelevant}'")
        if not 0 <= self.templates <= len(TEMPLATE_STARTS) * len(TEMPLATE_LENGTHS):
            raise UserError(f"{editor}: templates must be in 0..{len(TEMPLATE_STARTS) * len(TEMPLATE_LENGTHS)}")


def mlp_activation(lm: LoadedModel):
    """The model's MLP activation function (transformers' ACT2FN by the config's name)."""
    from transformers.activations import ACT2FN

    config = lm.model.config
    name = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    if name is None:
        raise UserError("wise: the model config names no MLP activation (hidden_act / activation_function)")
    return ACT2FN[name]


def act_distance(
    base: torch.Tensor, change: torch.Tensor, real: torch.Tensor, act=None, long_row: int | None = None
) -> torch.Tensor:
    """Per row: ‖act(base + change) − act(base)‖ per token (‖change‖ when ``act`` is None), pooled
    by the mean over real tokens (by the max for rows of more than ``long_row`` real tokens)."""
    if act is None:
        norms = change.float().norm(dim=-1)
    else:
        base = base.float()
        norms = (act(base + change.float()) - act(base)).norm(dim=-1)
    count = real.sum(1)
    dist = (norms * real).sum(1) / count.clamp(min=1)
    if long_row is not None:
        longest = torch.where(real > 0, norms, torch.full_like(norms, -math.inf)).amax(1)
        dist = torch.where(count > long_row, longest, dist)
    return dist


def positive_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries (0 when none): how the original averages each margin."""
    pos = x > 0
    if not bool(pos.any()):
        return x.sum() * 0
    return x[pos].mean()


def margin_loss(inside: torch.Tensor, outside: torch.Tensor, alpha: float, beta: float, gamma: float):
    """WISE's activation loss for in-scope rows ``inside`` (n,) and irrelevant rows ``outside`` (m,)."""
    gap = outside[:, None] - inside[None, :] + gamma
    return positive_mean(gap) + positive_mean(outside - alpha) + positive_mean(beta - inside)


class WISEEditor(AdaptorEditor[WISEParams]):
    name = "wise"
    description = "WISE side memory on one FFN output projection: masked shards, activation routing, TIES merging"
    Params = WISEParams
    precision_parts: ClassVar[dict[str, str]] = {"side_memory": "float32", "activation_scores": "float32"}

    def __init__(self, params=None):
        super().__init__(params)
        self.reset()
        self._training: torch.Tensor | None = None  # the open shard's Δ while it is trained
        # (base output, output change, real-token mask) of the last training forward
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._bypass = False  # True: the hook passes everything through (template generation)
        self._act = None  # the model's MLP activation (None: activation=none)
        self._templates: list[str] | None = None
        self._templates_for = None
        self.last_routed = torch.zeros(0, dtype=torch.bool)  # per row of the last forward: side memory used

    def reset(self) -> None:
        self.edits = 0  # edits made so far
        self.min_act = math.inf  # smallest Δact of an edit at the end of its training (all edits)
        self.current_min_act = math.inf  # the same over the open shard's edits (WISE-Retrieve)
        self.side: torch.Tensor | None = None  # merged side memory's Δ, (out, in) (WISE-Merge)
        self.closed: list[tuple[int, torch.Tensor, float]] = []  # (shard, Δ, min Δact) closed, not merged
        self.groups: list[tuple[torch.Tensor, float]] = []  # WISE-Retrieve: merged shard groups (Δ, min Δact)
        self.current: torch.Tensor | None = None  # the open shard's Δ (None: no edit in it yet)
        self._view: tuple | None = None  # cached routing memories

    @property
    def shard_index(self) -> int:
        return self.edits // self.params.save_freq

    def mask(self, shard: int, shape) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.params.seed * 1_000_003 + shard)
        # host: a CPU generator draws the same mask on every device (moved to the weight where applied)
        return torch.rand(tuple(shape), generator=g) < self.params.mask_ratio

    def bind(self, lm: LoadedModel) -> WISEEditor:
        super().bind(lm)
        self._act = mlp_activation(lm) if self.params.activation == "model" else None
        return self

    def prepare(self, lm: LoadedModel) -> None:
        self.context_templates(lm)

    def context_templates(self, lm: LoadedModel) -> list[str]:
        """``["{}"]`` plus ``templates`` prefixes: greedy continuations of the original's five starts
        by this model (5 and 10 new tokens), computed once per model with the adaptor bypassed."""
        if self._templates is not None and self._templates_for is lm.model:
            return self._templates
        self._bypass = True
        try:
            prefixes = generated_prefixes(lm)
        finally:
            self._bypass = False
        self._templates = ["{}"] + [p + " {}" for p in prefixes[: self.params.templates]]
        self._templates_for = lm.model
        return self._templates

    # -- state (shards are stored only on their masks)
    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.edits:
            return {}
        f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
        state = {
            "edits": torch.tensor(self.edits),
            "min_act": f64(self.min_act),
            "current_min_act": f64(self.current_min_act),
        }
        if self.side is not None:
            state["side"] = self.side.clone()
        for i, (delta, act) in enumerate(self.groups):
            state[f"group_{i}"], state[f"group_act_{i}"] = delta.clone(), f64(act)
        for shard, delta, act in self.closed:
            state[f"closed_{shard}"] = delta[self.mask(shard, delta.shape)].clone()
            state[f"closed_act_{shard}"] = f64(act)
        shape = self.current.shape if self.current is not None else self.closed[0][1].shape if self.closed else None
        if self.current is not None:
            state["current"] = self.current[self.mask(self.shard_index, shape)].clone()
        if shape is not None:
            state["shape"] = torch.tensor(list(shape))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        if not state:
            return
        self.edits, self.min_act = int(state["edits"]), float(state["min_act"])
        self.current_min_act = float(state.get("current_min_act", torch.tensor(self.min_act)))
        self.side = state["side"].float().clone() if "side" in state else None
        groups = sorted(int(k.split("_")[1]) for k in state if k.startswith("group_") and "act" not in k)
        self.groups = [(state[f"group_{i}"].float().clone(), float(state[f"group_act_{i}"])) for i in groups]

        def unpack(shard, values):
            shape = tuple(int(s) for s in state["shape"])
            delta = torch.zeros(shape)
            delta[self.mask(shard, shape)] = values.float()
            return delta

        closed = sorted(int(k.split("_")[1]) for k in state if k.startswith("closed_") and "act" not in k)
        self.closed = [
            (s, unpack(s, state[f"closed_{s}"]), float(state.get(f"closed_act_{s}", torch.tensor(self.min_act))))
            for s in closed
        ]
        if "current" in state:
            self.current = unpack(self.shard_index, state["current"])

    # -- routing
    def pending(self) -> list[torch.Tensor]:
        """WISE-Merge: the shards the original merges before evaluating (none before ``save_freq`` edits)."""
        if self.edits < self.params.save_freq:
            return []
        out = [d for _, d, _ in self.closed]
        if self.current is not None and bool((self.current != 0).any()):
            out.append(self.current)
        return out

    def memories(self) -> list[tuple[torch.Tensor, float]]:
        """(Δ, threshold Δact) of each memory a row may be routed to, in the original's order of preference."""
        if self._view is not None and self._view[0] == self.edits:
            return self._view[1]
        ratio = self.params.act_ratio
        out: list[tuple[torch.Tensor, float]] = []
        if self.params.variant == "merge":
            pending = self.pending()
            if pending:
                out.append((merge_into(self.side, pending, self.params.density), ratio * self.min_act))
            else:
                if self.current is not None:  # the open shard wins ties, as the original's new_weight
                    out.append((self.current, ratio * self.min_act))
                if self.side is not None:
                    out.append((self.side, ratio * self.min_act))
        else:
            if self.current is not None:
                out.append((self.current, ratio * self.current_min_act))
            out += [(d, ratio * a) for d, a in self.groups]
            out += [(d, ratio * a) for _, d, a in self.closed]
        self._view = (self.edits, out)
        return out

    def _hook(self, module, args, out):
        if self._bypass:
            return out
        x = args[0]
        real = self.token_mask(x.shape[:2]).to(x.device, torch.float32)
        if self._training is not None:  # editing: every row goes through the shard being trained
            change = x @ self._training.to(x.dtype).T
            self._last = (out, change, real)
            return out + change.to(out.dtype)
        memories = self.memories()
        self.last_routed = torch.zeros(x.shape[0], dtype=torch.bool)
        if not memories:
            return out
        best_dist = torch.zeros(x.shape[0], device=x.device)
        best = torch.zeros_like(out)
        routed = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        retrieve_open = self.params.variant == "retrieve" and self.current is not None
        for i, (delta, threshold) in enumerate(memories):
            change = (x @ delta.to(x.device, x.dtype).T).to(out.dtype)
            dist = act_distance(out, change, real, self._act, LONG_ROW)
            if self.params.variant == "merge":  # the largest Δact (the first on ties), if it reaches the threshold
                take = (dist > best_dist) | (i == 0)
                routed = torch.where(take, dist >= threshold, routed)
            elif i == 0 and retrieve_open:  # the open shard: its own threshold; its Δact is the bar either way
                take = dist >= threshold
                routed = take
            else:  # a retrieved memory: above its own threshold and above the bar so far
                take = (dist > best_dist) & (dist > threshold)
                routed = routed | take
            best = torch.where(take[:, None, None], change, best)
            best_dist = torch.where(take | (i == 0 and retrieve_open), dist, best_dist)
        self.last_routed = routed.cpu()
        if not bool(routed.any()):
            return out
        return torch.where(routed[:, None, None], out + best, out)

    # -- editing
    def irrelevant_pair(self, edit: Edit) -> tuple[str, str]:
        if self.params.irrelevant == "neighborhood" and edit.neighborhood:
            n = edit.neighborhood[0]
            return n.prompt, n.answer
        text = IRRELEVANT[label_id(edit.id) % len(IRRELEVANT)]
        prompt, answer = text.rsplit(" ", 1)
        return prompt, answer

    def edit_one(self, lm: LoadedModel, edit: Edit) -> float:
        """Train the open shard on ``edit``; close/merge shards on schedule. Returns the edit's Δact."""
        p = self.params
        weight = lm.adapter.out_proj_weight_view(self.layer)
        if self.current is None:
            self.current = torch.zeros(weight.shape)
        mask = self.mask(self.shard_index, weight.shape).to(weight.device)
        codec = Codec(lm.tokenizer)
        templates = self.context_templates(lm)
        encoded = [codec.encode(t.format(edit.rendered_prompt), edit.target_new) for t in templates]
        encoded.append(codec.encode(*self.irrelevant_pair(edit)))
        batch = codec.collate(encoded, lm.device)
        upper = UpperLayers(lm, self.layer, batch)
        rows = len(templates)
        owner = torch.as_tensor(batch.owner, device=lm.device)
        in_rows = owner < rows
        per_row = torch.bincount(owner[in_rows], minlength=rows).clamp(min=1).float()

        delta = self.current.clone().to(weight.device).requires_grad_(True)
        optimizer = torch.optim.SGD([delta], lr=p.lr, weight_decay=1e-5)
        self._training, self._view = delta, None
        losses: list[float] = []
        in_scope = 0.0
        try:
            for step in range(p.max_steps):
                self.last_steps = step  # read by tests: the forwards this edit took, less one
                logits = upper.answer_logits()
                lp = logits.log_softmax(-1).gather(1, batch.targets[:, None])[:, 0]
                row_nll = torch.zeros(rows, device=lp.device).index_add(0, owner[in_rows], -lp[in_rows]) / per_row
                nll = row_nll.mean()
                assert self._last is not None  # recorded by the forward just run
                base, change, real = self._last
                dist = act_distance(base, change, real, self._act)
                inside, outside = dist[:rows], dist[rows:]
                margin = margin_loss(inside, outside, p.alpha, p.beta, p.gamma)
                loss = nll + margin
                stop = len(losses) >= 2 and losses[-1] <= p.stop_loss and abs(losses[-1] - losses[-2]) <= p.stop_delta
                if stop or step == p.max_steps - 1:  # the original records Δact of this forward
                    in_scope = float(inside.detach().mean())
                if stop:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                assert delta.grad is not None  # filled by the backward just run
                delta.grad.mul_(mask)  # the shard's random gradient mask
                optimizer.step()
                losses.append(loss.item())
                with torch.no_grad():
                    delta.clamp_(-p.norm_constraint, p.norm_constraint)
        finally:
            self._training, self._last = None, None
        self.current = delta.detach().float().cpu()
        self.min_act = min(self.min_act, in_scope)
        self.current_min_act = min(self.current_min_act, in_scope)
        self.edits += 1
        if self.edits % p.save_freq == 0:
            self.closed.append((self.shard_index - 1, self.current, self.current_min_act))
            self.current, self.current_min_act = None, math.inf
        if self.edits % p.merge_freq == 0:
            self.merge()
        self._view = None
        return in_scope

    def merge(self) -> None:
        """Every ``merge_freq`` edits: TIES-merge the closed shards into the side memory (WISE-Merge) or
        into one memory of their own with the smallest threshold among them (WISE-Retrieve)."""
        deltas = [d for _, d, _ in self.closed]
        if not deltas:
            return
        if self.params.variant == "merge":
            self.side = merge_into(self.side, deltas, self.params.density)
        else:
            act = min(a for _, _, a in self.closed)
            self.groups.append((ties_merge(deltas, [1.0 / len(deltas)] * len(deltas), self.params.density), act))
        self.closed = []
        self._view = None


def merge_into(side: torch.Tensor | None, deltas: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """The original's merge of shards into the side memory: shards weighted 1/n each when there is no side
    memory yet, else 0.4/n each with the existing side memory at 0.6."""
    deltas = list(deltas)
    if side is None:
        return ties_merge(deltas, [1.0 / len(deltas)] * len(deltas), density)
    return ties_merge(deltas + [side], [0.4 / len(deltas)] * len(deltas) + [0.6], density)


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023) as the WISE code runs it: keep each Δ's ⌊density·n⌋ largest-magnitude
    entries, elect the sign of the weighted sum (+ on a zero sum), and average the agreeing weighted
    entries, divided by the agreeing weights (1 where none agree)."""
    trimmed = []
    for d in deltas:
        if density >= 1:
            trimmed.append(d)
            continue
        k = int(density * d.numel())
        if k <= 0:
            raise UserError("wise: density keeps no entry of a shard")
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[d.abs().flatten().float().topk(k).indices] = True
        trimmed.append(torch.where(keep.view_as(d), d, torch.zeros_like(d)))
    stack = torch.stack(trimmed)
    w = torch.tensor(list(weights), dtype=stack.dtype).view(-1, *[1] * (stack.dim() - 1))
    weighted = w * stack
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
    agree = (torch.sign(weighted) == majority).to(stack.dtype)
    divisor = (w * agree).sum(0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (weighted * agree).sum(0) / divisor
