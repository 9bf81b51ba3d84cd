"""The low-level operations behind :class:`lifelong.core.scorer.Scorer`, the one handle probes have on a model.

- :class:`Codec`: the tokenizer side only (prompt and answer ids, the pad id, padded batches). It
  needs no model, so editors that only tokenize build one of these instead of a whole scorer.
- :func:`token_nll`: summed NLL over token-id rows (perplexity);
- :func:`generate`: greedy continuations cut to their first line (generation tasks).

Probes call these through the scorer (``Scorer.rolling_nll``, ``Scorer.generate``), which is
where an editor's prompt rewriter is applied; the functions themselves see the model as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def answer_token_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of ``" " + answer``, without special tokens.

    SentencePiece tokenizers turn the leading space into a lone '▁' token of their
    own; that token is dropped so the answer starts with its real first piece.
    """
    ids = tokenizer.encode(" " + answer, add_special_tokens=False)
    if len(ids) > 1 and tokenizer.decode(ids[:1]).strip() == "":
        ids = ids[1:]
    return ids


@dataclass
class Collated:
    """A padded batch of prompt+answer ids; (rows[j], cols[j]) predicts targets[j] of pair owner[j]."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    owner: np.ndarray


class Codec:
    """Tokenization for scoring: prompt ids, answer ids, the pad id, right-padded batches.

    Prompt and answer are tokenized separately and their ids concatenated (re-tokenizing the
    joined string can merge tokens across the boundary and misalign the answer).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        # Tokenization is a pure function of the string: cache it across probe rounds.
        self.prompt_ids = lru_cache(maxsize=65536)(self._encode_prompt)
        self.answer_ids = lru_cache(maxsize=65536)(self._encode_answer)

    def _encode_prompt(self, prompt: str) -> tuple[int, ...]:
        ids = self.tokenizer(prompt).input_ids
        if not ids:  # an empty prompt still needs one position to predict from
            ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.pad_id]
        return tuple(ids)

    def _encode_answer(self, answer: str) -> tuple[int, ...]:
        if not answer.strip():
            raise ValueError("cannot score an empty answer")
        return tuple(answer_token_ids(self.tokenizer, answer))

    def encode(self, prompt: str, answer: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.prompt_ids(prompt), self.answer_ids(answer)

    def collate(self, encoded: Sequence[tuple[tuple[int, ...], tuple[int, ...]]], device) -> Collated:
        """Right-padded ids for encoded (prompt, answer) pairs and where their answers sit."""
        width = max(len(p) + len(a) for p, a in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        rows: list[int] = []
        cols: list[int] = []
        targets: list[int] = []
        owner: list[int] = []
        for r, (prompt, answer) in enumerate(encoded):
            seq = prompt + answer
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            start = len(prompt) - 1  # the position that predicts the first answer token
            rows.extend([r] * len(answer))
            cols.extend(range(start, start + len(answer)))
            targets.extend(answer)
            owner.extend([r] * len(answer))
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        return Collated(
            ids.to(device), mask.to(device), as_tensor(rows), as_tensor(cols), as_tensor(targets), np.array(owner)
        )

    def padded(self, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids (as the tokenizer gives them, special tokens included) and mask."""
        encoded = [self.tokenizer(t).input_ids for t in texts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(encoded):
            ids[r, : len(e)] = torch.tensor(e, dtype=torch.long)
            mask[r, : len(e)] = 1
        return ids.to(device), mask.to(device)


def token_nll(model, rows: list[list[int]], pad_id: int, max_batch_tokens: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL of tokens 1.. of each id row (token 0 is context only) and the count of scored tokens.

    Rows are batched by length (longest first, at most ``max_batch_tokens`` padded tokens per pass).
    Right padding: the pad id never reaches a real position (causal attention), only its cost.
    """
    lengths = np.array([len(r) for r in rows])
    total = np.zeros(len(rows))
    count = np.maximum(lengths - 1, 0)
    device = next(model.parameters()).device
    order = np.argsort(-lengths, kind="stable")
    start = 0
    with torch.inference_mode():
        while start < len(order):
            width = int(lengths[order[start]])
            size = max(1, max_batch_tokens // max(width, 1))
            idx = order[start : start + size]
            start += size
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : lengths[i]] = torch.tensor(rows[i])
                mask[r, : lengths[i]] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * mask[:, 1:]
            total[idx] = nll.sum(1).double().cpu().numpy()
    return total, count


class _FirstLineDone:
    """Stops a row once it holds a newline after some text (leading newlines do not count)."""

    def __init__(self, tokenizer, width: int):
        self.tokenizer, self.width = tokenizer, width

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], device=input_ids.device)


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    max_batch_tokens: int = 4096,
    max_prompt_tokens: int = 768,
) -> list[str]:
    """Greedy continuations, cut to their first non-empty line; prompts left-padded and batched by length."""
    from transformers import StoppingCriteriaList

    encoded = [tokenizer(p).input_ids[-max_prompt_tokens:] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompts)
    order = np.argsort([-len(e) for e in encoded], kind="stable")
    start = 0
    with torch.inference_mode():
        while start < len(order):
            width = len(encoded[order[start]])
            size = max(1, max_batch_tokens // (width + max_new_tokens))
            idx = order[start : start + size]
            start += size
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]) :] = 1
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
                temperature=None,
                top_p=None,
                top_k=None,
                stopping_criteria=StoppingCriteriaList([_FirstLineDone(tokenizer, width)]),
            )
            for r, i in enumerate(idx):
                text = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
                out[i] = text.strip().split("\n", 1)[0].strip()
    return out
