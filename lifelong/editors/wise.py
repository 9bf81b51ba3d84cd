"""WISE: a side memory for one FFN output projection, with routing, sharding and merging (Wang et al. 2024).

Edits go into a copy W' of layer ``layer``'s MLP output projection W (the main memory
stays untouched). Each edit trains the current shard's change Δ = W' − W by SGD on
the target's NLL plus WISE's activation margins on Δact(x) = ‖A(x)·Δᵀ‖ (the side
memory's output change, averaged over the row's tokens): irrelevant text below α,
the edit above β, and the edit at least γ above the irrelevant text. Gradients are
masked by the shard's random mask (a fraction ``mask_ratio`` of the entries), and Δ
stays in an L∞ ball of ``norm_constraint``.

Every ``save_freq`` edits the shard is closed and a new one starts with a fresh mask;
every ``merge_freq`` edits the closed shards are merged into the side memory with
TIES (trim to ``density``, elect signs, disjoint mean; an existing side memory joins
with weight 0.6 and the shards share 0.4, as the public WISE code does).

Routing at inference, per row: each side memory (the merged one, closed shards not
yet merged, the current shard) gives Δact(x); if the largest is below
``act_ratio`` × the smallest Δact seen on an edit during editing (the learned
threshold), the row gets the main memory's output unchanged, otherwise the output
of the side memory with the largest Δact. Simplification, documented: closed but
not yet merged shards are routed like WISE-Retrieve's memories, so that no edit is
invisible between a shard's close and the next merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from lifelong.editors.adaptor import AdaptorEditor, UpperLayers
from lifelong.models import LoadedModel
from probes.scorer import Scorer
from streams import Edit

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


@dataclass
class WISEParams:
    layer: int | None = None  # None: 4/5 of the depth (layer 24 of 30 for SmolLM2)
    lr: float = 1.0  # SGD, as the public code's edit_lr
    max_steps: int = 70  # the public code's n_iter
    mask_ratio: float = 0.2  # fraction of W' entries each shard may change
    # The public code's margins (α, β, γ = 5, 20, 10; bound 1.0) are for 7B models; on SmolLM2's
    # 576-wide layer they let irrelevant text reach Δact ≈ 25 and routed 5 of 9 neighborhood
    # prompts of 3 trial edits; these scaled ones routed 1 of 9, with the edits still taking.
    norm_constraint: float = 0.1  # L∞ bound on Δ = W' − W
    alpha: float = 2.0  # irrelevant Δact must stay below
    beta: float = 8.0  # the edit's Δact must exceed
    gamma: float = 4.0  # margin between the edit's and the irrelevant Δact
    act_ratio: float = 0.88  # routing threshold = act_ratio × min Δact seen on edits
    save_freq: int = 20  # edits per shard (scaled down from the paper's 500 for short streams)
    merge_freq: int = 40  # edits between merges (a multiple of save_freq)
    density: float = 0.53  # TIES trim density
    irrelevant: int = 4  # irrelevant sentences per edit in the margin loss
    stop_loss: float = 0.05  # stop once target NLL < this and every margin is met
    seed: int = 0  # seeds the shards' masks


class WISEEditor(AdaptorEditor):
    name = "wise"
    description = "WISE side memory on one FFN output projection: masked shards, activation routing, TIES merging"
    Params = WISEParams

    def __init__(self, params=None):
        super().__init__(params)
        p = self.params
        if not 0 < p.mask_ratio <= 1 or not 0 < p.density <= 1:
            raise ValueError("wise: mask_ratio and density must be in (0, 1]")
        if p.save_freq < 1 or p.merge_freq < p.save_freq or p.merge_freq % p.save_freq:
            raise ValueError(f"wise: merge_freq ({p.merge_freq}) must be a positive multiple of save_freq ({p.save_freq})")
        self.reset()
        self._training: torch.Tensor | None = None  # the open shard's Δ while it is trained
        self._last = None  # (output change, real-token mask) of the last training forward
        self.last_routed = torch.zeros(0, dtype=torch.bool)  # per row of the last forward: side memory used

    def reset(self) -> None:
        self.edits = 0  # edits made so far
        self.min_act = math.inf  # smallest Δact of an edit at the end of its training
        self.side: torch.Tensor | None = None  # merged side memory's Δ, (out, in)
        self.closed: list[tuple[int, torch.Tensor]] = []  # (shard index, Δ) closed, not yet merged
        self.current: torch.Tensor | None = None  # the open shard's Δ (None: no edit in it yet)

    @property
    def shard_index(self) -> int:
        return self.edits // self.params.save_freq

    def mask(self, shard: int, shape) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.params.seed * 1_000_003 + shard)
        return torch.rand(tuple(shape), generator=g) < self.params.mask_ratio

    # -- state (the open shard's Δ is stored only on its mask)
    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.edits:
            return {}
        state = {"edits": torch.tensor(self.edits), "min_act": torch.tensor(self.min_act, dtype=torch.float64)}
        if self.side is not None:
            state["side"] = self.side.clone()
        for shard, delta in self.closed:
            state[f"closed_{shard}"] = delta[self.mask(shard, delta.shape)].clone()
        if self.current is not None:
            state["current"] = self.current[self.mask(self.shard_index, self.current.shape)].clone()
            state["shape"] = torch.tensor(list(self.current.shape))
        elif self.closed:
            state["shape"] = torch.tensor(list(self.closed[0][1].shape))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        if not state:
            return
        self.edits, self.min_act = int(state["edits"]), float(state["min_act"])
        self.side = state["side"].float().clone() if "side" in state else None

        def unpack(shard, values):
            shape = tuple(int(s) for s in state["shape"])
            delta = torch.zeros(shape)
            delta[self.mask(shard, shape)] = values.float()
            return delta

        closed = sorted(int(k.split("_")[1]) for k in state if k.startswith("closed_"))
        self.closed = [(s, unpack(s, state[f"closed_{s}"])) for s in closed]
        if "current" in state:
            self.current = unpack(self.shard_index, state["current"])

    # -- routing
    def memories(self) -> list[torch.Tensor]:
        out = [self.side] if self.side is not None else []
        out += [d for _, d in self.closed]
        return out + ([self.current] if self.current is not None else [])

    @staticmethod
    def act_distance(change: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Per row: mean over real tokens of ‖output change‖ (Δact)."""
        norms = change.float().norm(dim=-1) * real
        return norms.sum(1) / real.sum(1).clamp(min=1)

    def _hook(self, module, args, out):
        x = args[0]
        real = self.token_mask(x.shape[:2]).to(x.device, torch.float32)
        if self._training is not None:  # editing: every row goes through the shard being trained
            change = x @ self._training.to(x.dtype).T
            self._last = (change, real)
            return out + change.to(out.dtype)
        memories = self.memories()
        self.last_routed = torch.zeros(x.shape[0], dtype=torch.bool)
        if not memories or not math.isfinite(self.min_act):
            return out
        best_dist = torch.full((x.shape[0],), -1.0, device=x.device)
        best = torch.zeros_like(out)
        for delta in memories:
            change = (x @ delta.to(x.device, x.dtype).T).to(out.dtype)
            dist = self.act_distance(change, real)
            take = dist > best_dist
            best = torch.where(take[:, None, None], change, best)
            best_dist = torch.where(take, dist, best_dist)
        routed = best_dist >= self.params.act_ratio * self.min_act
        self.last_routed = routed
        if not bool(routed.any()):
            return out
        return torch.where(routed[:, None, None], out + best, out)

    # -- editing
    def edit_one(self, lm: LoadedModel, edit: Edit) -> float:
        """Train the open shard on ``edit``; close/merge shards on schedule. Returns the edit's Δact."""
        p = self.params
        weight = lm.adapter.out_proj_weight_view(p.layer)
        if self.current is None:
            self.current = torch.zeros(weight.shape)
        mask = self.mask(self.shard_index, weight.shape).to(lm.device)
        picks = torch.randperm(len(IRRELEVANT))[: p.irrelevant].tolist()  # seeded per step by replay
        scorer = Scorer(lm.model, lm.tokenizer)
        encoded = [scorer.encode(edit.rendered_prompt, edit.target_new)]
        encoded += [scorer.encode(IRRELEVANT[i].rsplit(" ", 1)[0], IRRELEVANT[i].rsplit(" ", 1)[1]) for i in picks]
        batch = scorer.collate(encoded)
        upper = UpperLayers(lm, p.layer, batch)
        edit_tokens = int((batch.owner == 0).sum())

        delta = self.current.clone().to(lm.device).requires_grad_(True)
        optimizer = torch.optim.SGD([delta], lr=p.lr, weight_decay=1e-5)
        self._training = delta
        in_scope = 0.0
        try:
            for self.last_steps in range(p.max_steps):
                logits = upper.answer_logits()
                lp = logits[:edit_tokens].log_softmax(-1).gather(1, batch.targets[:edit_tokens, None])
                nll = -lp.mean()
                change, real = self._last
                dist = self.act_distance(change, real)
                inside, outside = dist[0], dist[1:]
                margin = (torch.relu(outside - inside + p.gamma).mean() + torch.relu(outside - p.alpha).mean()
                          + torch.relu(p.beta - inside))
                in_scope = inside.item()
                self.last_losses = (nll.item(), margin.item(), outside.max().item())
                if nll.item() < p.stop_loss and margin.item() == 0:
                    break
                optimizer.zero_grad(set_to_none=True)
                (nll + margin).backward()
                delta.grad.mul_(mask)  # the shard's random gradient mask
                optimizer.step()
                with torch.no_grad():
                    delta.clamp_(-p.norm_constraint, p.norm_constraint)
            with torch.no_grad():  # the edit's Δact with the final Δ
                upper.answer_logits()
                in_scope = float(self.act_distance(*self._last)[0])
        finally:
            self._training, self._last = None, None
        self.current = delta.detach().float().cpu()
        self.min_act = min(self.min_act, in_scope)
        self.edits += 1
        if self.edits % p.save_freq == 0:
            self.closed.append((self.shard_index - 1, self.current))
            self.current = None
        if self.edits % p.merge_freq == 0:
            self.merge()
        return in_scope

    def merge(self) -> None:
        """TIES-merge the closed shards (and the existing side memory) into the side memory."""
        deltas = [d for _, d in self.closed]
        weights = [1.0 / len(deltas)] * len(deltas)
        if self.side is not None:
            deltas.append(self.side)
            weights = [0.4 / (len(deltas) - 1)] * (len(deltas) - 1) + [0.6]
        self.side = ties_merge(deltas, weights, self.params.density)
        self.closed = []


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023): keep each Δ's top-``density`` entries by magnitude, elect the sign of
    the weighted sum, and average the agreeing entries with their weights."""
    trimmed = []
    for d in deltas:
        k = max(1, int(round(density * d.numel())))
        threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    stack = torch.stack(trimmed)
    w = torch.tensor(list(weights), dtype=stack.dtype).view(-1, *[1] * (stack.dim() - 1))
    sign = torch.sign((w * stack).sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    total = (w * agree).sum(0)
    return torch.where(total > 0, (w * stack * agree).sum(0) / total.clamp(min=1e-12), torch.zeros_like(sign))
