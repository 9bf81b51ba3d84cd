"""Shared machinery of locate-and-edit editors (ROME, MEMIT, AlphaEdit).

Keys are the inputs of a layer's MLP output projection at the subject's last token;
values are that projection's outputs. ``optimize_value`` finds the value v* that makes
the model produce the new target (ROME's v*, MEMIT's z*), by optimising a vector δ
added to the projection's output at the subject's last token while every weight stays
frozen (so backward computes no weight gradients).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from lifelong.arch import ArchAdapter
from lifelong.delta import ParamChange
from lifelong.models import LoadedModel
from probes.scorer import Scorer
from streams import Edit

# Neutral prefixes written for this project; ROME averages keys and fits v* over such
# contexts so that the edit holds whatever precedes the prompt. "{}" is the bare prompt.
CONTEXT_TEMPLATES = (
    "{}",
    "The following is true. {}",
    "Here is a short note. {}",
    "I learned this at school. {}",
    "According to the encyclopedia, {}",
    "As everyone knows, {}",
    "This was in the news today. {}",
    "My friend told me that {}",
    "Let me tell you something. {}",
    "It is well known that {}",
    "Question answered. {}",
    "Fact of the day: {}",
    "In a book I read, {}",
    "The teacher said: {}",
    "Notes from the lecture. {}",
    "From the archive. {}",
    "A simple statement. {}",
    "We checked the records. {}",
    "Quick reminder: {}",
    "Here is the answer. {}",
    "People often ask about this. {}",
)


def subject_token_index(tokenizer, text: str, subject: str) -> int:
    """Index of the subject's last token in ``tokenizer(text)`` (its last occurrence in text)."""
    end = text.rfind(subject)
    if end < 0:
        raise ValueError(f"subject {subject!r} does not occur in {text!r}")
    return len(tokenizer(text[: end + len(subject)]).input_ids) - 1


def contexts(edit: Edit, templates: Sequence[str]) -> list[str]:
    """The edit's prompt (subject filled in) under each context template."""
    return [t.replace("{}", edit.rendered_prompt) for t in templates]


@contextmanager
def capture_keys(adapter: ArchAdapter, layer: int) -> Iterator[list[torch.Tensor]]:
    """Collect the inputs of layer ``layer``'s MLP output projection during forwards."""
    seen: list[torch.Tensor] = []
    handle = adapter.out_proj(layer).register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def keys_at(lm: LoadedModel, layer: int, texts: Sequence[str], indices: Sequence[int]) -> torch.Tensor:
    """Keys at one token index per text, shape (len(texts), d_in), in one padded forward."""
    scorer = Scorer(lm.model, lm.tokenizer)
    encoded = [tuple(lm.tokenizer(t).input_ids) for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), scorer.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(encoded):
        ids[r, : len(e)] = torch.tensor(e)
        mask[r, : len(e)] = 1
    with capture_keys(lm.adapter, layer) as seen:
        scorer.body(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
    rows = torch.arange(len(texts), device=lm.device)
    return seen[0][rows, torch.tensor(list(indices), device=lm.device)].double()


def average_key(lm: LoadedModel, layer: int, edit: Edit, templates: Sequence[str]) -> torch.Tensor:
    """ROME's key: the subject's last-token key averaged over context templates."""
    texts = contexts(edit, templates)
    idx = [subject_token_index(lm.tokenizer, t, edit.subject) for t in texts]
    return keys_at(lm, layer, texts, idx).mean(0)


def prompt_key(lm: LoadedModel, layer: int, edit: Edit) -> torch.Tensor:
    """The key at the subject's last token of the bare edit prompt."""
    text = edit.rendered_prompt
    return keys_at(lm, layer, [text], [subject_token_index(lm.tokenizer, text, edit.subject)])[0]


@dataclass
class ValueFit:
    value: torch.Tensor  # v* = v_orig + δ (the projection's output that yields the target), float64
    original: torch.Tensor  # v_orig at the bare prompt
    steps: int  # optimisation steps taken
    nll: float  # final mean target NLL


def optimize_value(lm: LoadedModel, layer: int, edit: Edit, templates: Sequence[str], *, steps: int = 20,
                   lr: float = 0.5, kl_factor: float = 0.0625, weight_decay: float = 0.5,
                   clamp_norm: float = 4.0, stop_nll: float = 0.05) -> ValueFit:
    """ROME's v*: Adam on δ at the subject's last token, for the target NLL over context
    templates + a KL term keeping "{subject} is a" unchanged + a norm penalty on δ,
    with ‖δ‖ clamped to ``clamp_norm`` × ‖v_orig‖ and early stopping at ``stop_nll``."""
    scorer = Scorer(lm.model, lm.tokenizer)
    texts = contexts(edit, templates)
    kl_text = f"{edit.subject} is a"
    encoded = [scorer.encode(t, edit.target_new) for t in texts]
    kl_ids = tuple(lm.tokenizer(kl_text).input_ids)
    batch = scorer.collate(encoded + [(kl_ids[:-1], kl_ids[-1:])])  # the KL prompt rides along
    n = len(texts)
    lookup = [subject_token_index(lm.tokenizer, t, edit.subject) for t in texts]
    lookup.append(subject_token_index(lm.tokenizer, kl_text, edit.subject))
    rows = torch.arange(n + 1, device=lm.device)
    cols = torch.tensor(lookup, device=lm.device)
    answer = batch.owner < n  # answer positions of the rewriting prompts (not the KL one)
    owner = torch.as_tensor(batch.owner[answer], device=lm.device)
    counts = torch.bincount(owner, minlength=n).float()

    module = lm.adapter.out_proj(layer)
    delta = torch.zeros(lm.adapter.out_proj_weight_view(layer).shape[0], device=lm.device, requires_grad=True)
    state: dict[str, torch.Tensor] = {}

    def inject(mod, args, out):
        if "original" not in state:
            state["original"] = out[0, lookup[0]].detach().clone()
        out = out.clone()
        out[rows, cols] = out[rows, cols] + delta
        return out

    def forward_hidden():
        return scorer.body(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).last_hidden_state

    # The KL reference: the unedited distribution at the KL prompt's subject token.
    with torch.no_grad():
        hidden = forward_hidden()
        kl_ref = scorer.unembed(hidden[n, lookup[-1]]).float().log_softmax(-1)

    optimizer = torch.optim.Adam([delta], lr=lr)
    handle = module.register_forward_hook(inject)
    taken, nll_value = 0, float("nan")
    try:
        for taken in range(1, steps + 1):
            hidden = forward_hidden()
            logits = scorer.unembed(hidden[batch.rows, batch.cols]).float()
            token_nll = -logits.log_softmax(-1).gather(1, batch.targets[:, None])[:, 0]
            token_nll = token_nll[torch.as_tensor(answer, device=lm.device)]
            nll = (torch.zeros(n, device=lm.device).index_add(0, owner, token_nll) / counts).mean()
            kl_now = scorer.unembed(hidden[n, lookup[-1]]).float().log_softmax(-1)
            kl = torch.nn.functional.kl_div(kl_now, kl_ref, log_target=True, reduction="sum")
            penalty = weight_decay * delta.norm() / state["original"].norm() ** 2
            loss = nll + kl_factor * kl + penalty
            nll_value = nll.item()
            if nll_value < stop_nll:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                limit = clamp_norm * state["original"].norm()
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    finally:
        handle.remove()
    original = state["original"].double()
    return ValueFit(value=original + delta.detach().double(), original=original, steps=taken, nll=nll_value)


def lowrank_change(adapter: ArchAdapter, left_out: torch.Tensor, right_in: torch.Tensor,
                   dtype: torch.dtype) -> ParamChange:
    """ΔW = left_out @ right_in.T in (out, in) orientation, stored as the parameter is."""
    left, right = left_out.to(dtype), right_in.to(dtype)
    if left.dim() == 1:
        left, right = left[:, None], right[:, None]
    if adapter.spec.transposed:  # storage is (in, out): ΔWᵀ = right @ left.T
        left, right = right, left
    return ParamChange(u=left.contiguous(), v=right.contiguous())
