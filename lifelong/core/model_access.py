"""The low-level operations behind :class:`lifelong.core.scorer.Scorer`, the one handle probes have on a model.

- :class:`Codec`: the tokenizer side only (prompt and answer ids, the pad id, padded batches). It
  needs no model, so editors that only tokenize build one of these instead of a whole scorer.
- :func:`token_nll`: summed NLL over token-id rows (perplexity);
- :func:`greedy_ids`: batched greedy decoding (left padding, KV cache, per-row budgets and stop rules),
  under :func:`generate` (continuations cut to their first line: generation tasks) and
  :func:`generate_answers` (answers under the authors' natural stop or a token budget, with their ids:
  generation-based edit evaluation, docs/METRICS.md §6).

Probes call these through the scorer (``Scorer.rolling_nll``, ``Scorer.generate``), which is
where an editor's prompt rewriter is applied; the functions themselves see the model as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

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


def token_nll(
    model,
    rows: list[list[int]],
    pad_id: int,
    max_batch_tokens: int = 512,
    on_batch: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL of tokens 1.. of each id row (token 0 is context only) and the count of scored tokens.

    Rows are batched by length (longest first, at most ``max_batch_tokens`` padded tokens per pass).
    Right padding: the pad id never reaches a real position (causal attention), only its cost.
    ``on_batch(n)`` is told each batch's rows as it completes (a progress bar).
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
            if on_batch is not None:
                on_batch(len(idx))
    return total, count


# The authors' natural stop (WanliYoung/Revisit-Editing-Evaluation, easyeditor/evaluate/evaluate_utils.py:120-129):
# generation ends at a ".", a newline or the EOS string (and at an EOS id), capped at 50 new tokens.
NATURAL_STOPS = (".", "\n")
AUTHORS_MAX_NEW_TOKENS = 50
# The authors' QA instruction context ("qa_inst", evaluate_utils.py:106-107).
QA_INSTRUCTION = "Please answer the question:\n\nQ: {question}\nA:"
CONTEXTS = ("question", "qa", "chat")


def stop_strings(tokenizer) -> tuple[str, ...]:
    """The natural stop strings for ``tokenizer``: ".", newline, and its EOS string, in the authors' order."""
    eos = tokenizer.eos_token
    return NATURAL_STOPS + ((eos,) if eos else ())


def strip_stop(text: str, suffixes: Sequence[str]) -> str:
    """The authors' post-processing (evaluate_utils.py:138-143): one pass over ``suffixes`` in order,
    each removed once from the end if the text ends with it; no whitespace strip."""
    for suffix in suffixes:
        if suffix and text.endswith(suffix):
            text = text[: -len(suffix)]
    return text


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def in_context(tokenizer, context: str, questions: Sequence[str]) -> list[str]:
    """``questions`` as the model is asked them under ``context`` (one of :data:`CONTEXTS`):
    ``question`` as is, ``qa`` in the authors' QA instruction, ``chat`` in the tokenizer's own chat
    template as one user turn with the assistant's turn opened (the authors hard-code a Llama-2-chat
    string instead: docs/METRICS.md §6). Refused for ``chat`` when the tokenizer has no template."""
    if context == "question":
        return list(questions)
    if context == "qa":
        return [QA_INSTRUCTION.format(question=q) for q in questions]
    if context == "chat":
        if not has_chat_template(tokenizer):
            raise ValueError("the tokenizer has no chat template")
        return [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            for q in questions
        ]
    raise ValueError(f"unknown context '{context}': expected one of {', '.join(CONTEXTS)}")


@dataclass(frozen=True)
class Generated:
    """One greedy answer: its text after the stop-suffix strip, and the new token ids up to and
    including the token that stopped it (the authors' WILD locality compares these ids)."""

    text: str
    ids: tuple[int, ...]


def eos_ids_of(model, tokenizer) -> set[int]:
    """Every id that ends generation: the tokenizer's EOS and the model's generation config's (one id or several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(config) if isinstance(config, (list, tuple)) else ({config} if config is not None else set())
    return ids


def greedy_ids(
    model,
    tokenizer,
    encoded: Sequence[Sequence[int]],
    budgets: Sequence[int],
    stopped=None,
    eos_ids: set[int] | None = None,
    skip_special: bool = False,
    max_batch_tokens: int = 4096,
    on_batch: Callable[[int], object] | None = None,
) -> list[tuple[int, ...]]:
    """Greedy new-token ids for each prompt (token ids). A row ends at an EOS id (kept), at its own
    token budget, or once ``stopped(text of its new tokens)`` is true (decoded with or without
    special tokens, ``skip_special``); its ids end with the token that stopped it.

    Prompts are sorted by length and batched (at most ``max_batch_tokens`` padded prompt + budget
    tokens per batch), left-padded with an attention mask and positions counted from each row's
    first real token, and decoded with the KV cache. A finished row leaves the batch (its cache rows
    are dropped): answers are mostly a few tokens, and one long answer would otherwise keep the
    whole batch decoding to the budget (with HF ``generate``, which cannot drop rows, batching gained
    little over one prompt at a time; docs/BENCHMARKS.md). The answers
    are those of ``model.generate`` on one prompt at a time without padding (tests/test_generation.py
    checks it token for token on both tiny models). ``on_batch(n)`` is told each batch's prompts as it completes.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = eos_ids_of(model, tokenizer) if eos_ids is None else eos_ids
    device = next(model.parameters()).device
    out: list[tuple[int, ...]] = [()] * len(encoded)
    order = np.argsort([-len(e) for e in encoded], kind="stable")
    start = 0
    while start < len(order):
        width = len(encoded[order[start]])
        size = max(1, max_batch_tokens // (width + max(budgets)))
        idx = order[start : start + size]
        start += size
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(encoded[i]) :] = torch.tensor(list(encoded[i]), dtype=torch.long)
            mask[r, width - len(encoded[i]) :] = 1
        answers = _decode(
            model, tokenizer, ids.to(device), mask.to(device), [budgets[i] for i in idx], stopped, eos, skip_special
        )
        for r, i in enumerate(idx):
            out[i] = tuple(answers[r])
        if on_batch is not None:
            on_batch(len(idx))
    return out


def _decode(model, tokenizer, ids, mask, budgets, stopped, eos: set[int], skip_special: bool) -> list[list[int]]:
    """Greedy decoding of one left-padded batch, dropping each row once it is done (see :func:`greedy_ids`)."""
    import inspect

    new: list[list[int]] = [[] for _ in budgets]
    live = list(range(len(budgets)))  # the batch row behind each row still decoding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as HF generate derives them from the mask
    # Only the last position's logits are needed (the full vocabulary at every prompt position is not).
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.inference_mode():
        step = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep_last)
        last = positions[:, -1]
        while True:
            cache = step.cache
            tokens = step.logits[:, -1].float().argmax(-1)
            picked = tokens.tolist()
            for k, r in enumerate(live):
                new[r].append(picked[k])
            texts = tokenizer.batch_decode([new[r] for r in live], skip_special_tokens=skip_special) if stopped else []
            going = [
                k
                for k, r in enumerate(live)
                if picked[k] not in eos and len(new[r]) < budgets[r] and not (texts and stopped(texts[k]))
            ]
            if not going:
                return new
            if len(going) < len(live):
                select = torch.tensor(going, device=ids.device)
                cache.batch_select_indices(select)
                tokens, mask, last = tokens[select], mask[select], last[select]
                live = [live[k] for k in going]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            last = last + 1
            step = model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=last[:, None],
                cache=cache,
                use_cache=True,
            )


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    budgets: Sequence[int],
    stops: Sequence[str] | None,
    max_batch_tokens: int = 4096,
    on_batch: Callable[[int], object] | None = None,
) -> list[Generated]:
    """Greedy answers to ``prompts`` (already in their context), each with its own token budget.

    ``stops``: stop once the new text, decoded with special tokens, contains one of these strings
    (HF ``stop_strings`` semantics: a token that completes one anywhere in it ends the answer, so
    "St. Louis" stops at "St."); None: only EOS and the budget stop it. The text is decoded
    without skipping special tokens and stripped of one trailing ".", newline and EOS string,
    in that order, as the authors do (the ids keep the stop token).
    """
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} budgets for {len(prompts)} prompts")
    if any(b < 1 for b in budgets):
        raise ValueError("every token budget must be at least 1")
    if not prompts:
        return []
    encoded = [tokenizer(p).input_ids for p in prompts]  # special tokens added, as the authors' tok(prompt)
    stopped = None
    if stops:
        stop_set = tuple(stops)
        stopped = lambda text: any(s in text for s in stop_set)  # noqa: E731
    ids = greedy_ids(model, tokenizer, encoded, budgets, stopped, max_batch_tokens=max_batch_tokens, on_batch=on_batch)
    suffixes = stop_strings(tokenizer)
    return [Generated(strip_stop(tokenizer.decode(list(i)), suffixes), i) for i in ids]


def _first_line_done(text: str) -> bool:
    """A newline after some text (leading newlines do not count)."""
    return "\n" in text.lstrip()


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    max_batch_tokens: int = 4096,
    max_prompt_tokens: int = 768,
) -> list[str]:
    """Greedy continuations, cut to their first non-empty line; prompts left-padded and batched by length
    (:func:`greedy_ids`, stopping at the tokenizer's EOS or a completed first line)."""
    if not prompts:
        return []
    encoded = [tokenizer(p).input_ids[-max_prompt_tokens:] for p in prompts]
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids = greedy_ids(
        model,
        tokenizer,
        encoded,
        [max_new_tokens] * len(prompts),
        _first_line_done,
        eos_ids=eos,
        skip_special=True,
        max_batch_tokens=max_batch_tokens,
    )
    return [tokenizer.decode(list(i), skip_special_tokens=True).strip().split("\n", 1)[0].strip() for i in ids]
