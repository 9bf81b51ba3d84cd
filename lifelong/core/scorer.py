"""The one handle probes have on a model (:class:`Scorer`; editors score and tokenize through it
and :mod:`lifelong.core.model_access` too), and the scoring primitive of docs/METRICS.md §1:
teacher-forced answer scores, many prompts per pass.

Prompt and answer are tokenized separately and their ids concatenated (re-tokenizing
the joined string can merge tokens across the boundary and misalign the answer).
Sequences are bucketed by length, right-padded, and run through the model body once;
the unembedding is applied only at the positions that predict answer tokens, since
computing it everywhere costs about a fifth of the model's FLOPs.

Probes use the model only through a scorer's methods (``score``, ``generate``, ``generate_answers``,
``rolling_nll``, ``weights``), so an editor's prompt rewriter reaches every probe that asks
the model a question; the tokenizer-only part is :class:`lifelong.core.model_access.Codec`.
This module and ``model_access`` import nothing else of ``lifelong``, so ``probes`` can use them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from lifelong.core import model_access

# Re-exported: callers import these from here.
from lifelong.core.model_access import Codec, Collated, answer_token_ids  # noqa: F401


@dataclass
class Scores:
    """Per-pair scores, aligned with the pairs given to :meth:`Scorer.score`."""

    nll: np.ndarray  # mean token negative log-likelihood of the answer
    logprob: np.ndarray  # joint log-probability (sum over answer tokens)
    exact: np.ndarray  # bool: argmax equals the answer token at every position
    token_acc: np.ndarray  # fraction of answer positions whose argmax is right
    argmax: list[tuple[int, ...]]  # the argmax token ids at the answer positions

    @property
    def prob(self) -> np.ndarray:
        """Per-token geometric-mean probability exp(-nll), as ROME/MEMIT/Pitfalls use."""
        return np.exp(-self.nll)


class Scorer:
    """A causal LM as probes see it: scores (prompt, answer) pairs by teacher forcing, generates
    greedy answers, reads a corpus's token NLL and the weights.

    ``max_batch_tokens`` bounds padded tokens per forward pass; a small bound runs faster on a
    CPU, where smaller activations stay in cache (docs/BENCHMARKS.md).
    ``rewrite`` (optional) maps a list of prompts to the prompts the model actually sees (an
    in-context memory prepends retrieved edits). It applies to :meth:`score` (answers are
    appended after the rewritten prompt, so their positions stay right) and :meth:`generate`,
    not to :meth:`rolling_nll` over a corpus (see there why).
    """

    def __init__(self, model, tokenizer, max_batch_tokens: int = 512, rewrite=None):
        self.model = model
        self.rewrite = rewrite
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens
        self.body = getattr(model, model.base_model_prefix)
        self.unembed = model.get_output_embeddings()
        self.codec = Codec(tokenizer)
        self.pad_id = self.codec.pad_id
        # Told the items each forward batch of score, rolling_nll and generate_answers completes
        # (:meth:`reporting`): a probe suite's bar advances within a probe, not only between probes.
        self.progress: Callable[[int], object] | None = None

    @contextmanager
    def reporting(self, progress: Callable[[int], object]):
        """Within the block, ``progress(n)`` is called as each batch of ``n`` items is scored or generated."""
        saved, self.progress = self.progress, progress
        try:
            yield
        finally:
            self.progress = saved

    def encode(self, prompt: str, answer: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.codec.encode(prompt, answer)

    def shown(self, prompts: Sequence[str]) -> list[str]:
        """The prompts as the model sees them: rewritten by the editor's rewriter, if any."""
        prompts = list(prompts)
        if self.rewrite is None or not prompts:
            return prompts
        out = list(self.rewrite(prompts))
        if len(out) != len(prompts):
            raise ValueError(f"prompt rewriter returned {len(out)} prompts for {len(prompts)}")
        return out

    def generate(self, prompts: Sequence[str], max_new_tokens: int, **kwargs) -> list[str]:
        """Greedy continuations of the prompts as the model sees them (:func:`model_access.generate`):
        a generation task asks the model a question just as a scored prompt does."""
        return model_access.generate(self.model, self.tokenizer, self.shown(prompts), max_new_tokens, **kwargs)

    def generate_answers(
        self, questions: Sequence[str], context: str, budgets: Sequence[int], natural_stop: bool = True
    ) -> list[model_access.Generated]:
        """Greedy answers to ``questions`` (:func:`model_access.generate_answers`): each question as the
        model sees it (an in-context memory's rewrite goes inside the context, where the question is),
        then put in ``context`` (:func:`model_access.in_context`). ``natural_stop``: the authors' stop
        strings end an answer (".", newline, EOS string); otherwise only EOS and the budget do."""
        prompts = model_access.in_context(self.tokenizer, context, self.shown(questions))
        stops = model_access.stop_strings(self.tokenizer) if natural_stop else None
        return model_access.generate_answers(
            self.model, self.tokenizer, prompts, budgets, stops, on_batch=self.progress
        )

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer has a chat template (the ``chat`` context needs one)."""
        return model_access.has_chat_template(self.tokenizer)

    def answer_length(self, answer: str) -> int:
        """Tokens of ``answer`` as it is scored (" " + answer): the unit of an answer-length budget."""
        return len(self.codec.answer_ids(answer))

    def rolling_nll(self, rows: list[list[int]], max_batch_tokens: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Summed NLL and scored-token count per token-id row (:func:`model_access.token_nll`).

        Not rewritten: the rows are a reference corpus, not questions. A retrieval memory picks
        edits by the words of a question and writes them in front of it; in front of a corpus
        chunk they would change the text being measured (and fire whenever a chunk happens to
        name an edited subject), so corpus perplexity measures the model itself. Hooks an editor
        put on the model (GRACE, WISE) act here as everywhere.
        """
        return model_access.token_nll(self.model, rows, self.pad_id, max_batch_tokens, on_batch=self.progress)

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's parameters by name, as they are now (read, never changed)."""
        return dict(self.model.named_parameters())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, pairs: Sequence[tuple[str, str]]) -> Scores:
        """Score every (prompt, answer) pair; identical pairs are computed once."""
        unique = list(dict.fromkeys(pairs))
        prompts = self.shown([p for p, _ in unique])
        encoded = [self.encode(p, a) for p, (_, a) in zip(prompts, unique)]
        results = self._score_encoded(encoded)
        index = {pair: i for i, pair in enumerate(unique)}
        order = [index[pair] for pair in pairs]
        nll, logprob, exact, acc, argmax = results
        return Scores(
            nll=nll[order],
            logprob=logprob[order],
            exact=exact[order],
            token_acc=acc[order],
            argmax=[argmax[i] for i in order],
        )

    def _batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Group indices (longest first) so that rows × padded length stays under the budget."""
        order = np.argsort(-lengths, kind="stable")
        batches: list[np.ndarray] = []
        current: list[int] = []
        width = 0
        for i in order:
            width = max(width, int(lengths[i])) if current else int(lengths[i])
            if current and width * (len(current) + 1) > self.max_batch_tokens:
                batches.append(np.array(current))
                current, width = [], int(lengths[i])
            current.append(i)
        if current:
            batches.append(np.array(current))
        return batches

    def collate(self, encoded: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> Collated:
        """Right-padded ids for encoded (prompt, answer) pairs and where their answers sit, on the model's device."""
        return self.codec.collate(encoded, self.device)

    def answer_logits(self, batch: Collated) -> torch.Tensor:
        """Logits at the answer positions only (differentiable when grad is enabled)."""
        hidden = self.body(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).last_hidden_state
        return self.unembed(hidden[batch.rows, batch.cols]).float()

    @torch.inference_mode()
    def _score_encoded(self, encoded: list[tuple[tuple[int, ...], tuple[int, ...]]]):
        """Each distinct prompt runs once; its answers continue from its KV cache.

        Probes mostly score two or more answers per prompt (new vs true target), and most
        answers are one token, predicted from the prompt's last position: for those the
        prompt pass is all there is. Longer answers run their remaining tokens in a second
        pass over the prompt's cache (the :class:`~lifelong.editors.locate.SuffixBatch` idea).
        Per-token results are reduced per pair with array operations, not a Python loop.
        """
        n = len(encoded)
        if n == 0:
            return np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0), []
        prompts = list(dict.fromkeys(p for p, _ in encoded))
        pairs_of: dict[tuple[int, ...], list[int]] = {p: [] for p in prompts}
        for i, (p, _) in enumerate(encoded):
            pairs_of[p].append(i)
        # A prompt's cost in a batch: its own tokens plus its answers' continuations.
        lengths = np.array([len(p) + max(len(encoded[i][1]) for i in pairs_of[p]) - 1 for p in prompts])
        parts = []
        for batch_idx in self._batches(lengths):
            batch_prompts = [prompts[j] for j in batch_idx]
            pair_ids = np.array([i for p in batch_prompts for i in pairs_of[p]])
            owner, position, lp, arg = self._answer_tokens(batch_prompts, [encoded[i] for i in pair_ids])
            parts.append((pair_ids[owner], position, lp, arg))
            if self.progress is not None:
                self.progress(len(pair_ids))
        owner, position, lp, arg = (np.concatenate(x) for x in zip(*parts))
        order = np.lexsort((position, owner))  # each pair's tokens together, in answer order
        owner, lp, arg = owner[order], lp[order], arg[order]
        target = np.fromiter((t for _, a in encoded for t in a), dtype=np.int64)  # same order: pair, then token
        count = np.bincount(owner, minlength=n)
        logprob = np.bincount(owner, weights=lp, minlength=n)
        hits = np.bincount(owner, weights=(arg == target), minlength=n)
        argmax = [tuple(x.tolist()) for x in np.split(arg, np.cumsum(count)[:-1])]
        return -logprob / count, logprob, hits == count, hits / count, argmax

    def _answer_tokens(self, prompts: list[tuple[int, ...]], pairs: list[tuple[tuple[int, ...], tuple[int, ...]]]):
        """Flat per answer token of ``pairs``: (pair index, token position, log-probability, argmax id)."""
        device = self.device
        ids = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(p) for p in prompts], batch_first=True, padding_value=self.pad_id
        )
        longer = [k for k, (_, a) in enumerate(pairs) if len(a) > 1]
        # Right padding needs no mask for the model itself (real tokens come first and attend only
        # backwards), but hooks that pool over a row's tokens (WISE's routing) must see which are real.
        lengths = torch.tensor([len(p) for p in prompts])
        mask = None
        if bool((lengths < ids.shape[1]).any()):
            mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long().to(device)
        out = self.body(input_ids=ids.to(device), attention_mask=mask, use_cache=bool(longer))
        row_of = {p: r for r, p in enumerate(prompts)}
        rows = torch.tensor([row_of[p] for p, _ in pairs], device=device)
        last = torch.tensor([len(p) - 1 for p, _ in pairs], device=device)
        logits = self.unembed(out.last_hidden_state[rows, last]).float()  # predicts each first answer token
        targets = [a[0] for _, a in pairs]
        owner = list(range(len(pairs)))
        position = [0] * len(pairs)
        if longer:
            rest = [pairs[k] for k in longer]
            logits = torch.cat([logits, self._continuations(out.cache, prompts, rest, row_of)])
            for k, (_, a) in zip(longer, rest):
                targets += a[1:]
                owner += [k] * (len(a) - 1)
                position += range(1, len(a))
        lp, arg = self._pick(logits, torch.tensor(targets, device=device))
        return np.array(owner), np.array(position), lp, arg

    def _continuations(self, cache, prompts, pairs, row_of) -> torch.Tensor:
        """Logits predicting answer tokens 2.. of ``pairs`` (pair by pair, in order), from the prompts' cache."""
        device = self.device
        width = max(len(p) for p in prompts)
        steps = max(len(a) - 1 for _, a in pairs)
        select = torch.tensor([row_of[p] for p, _ in pairs], device=device)
        for layer in cache.layers:  # one cache row per pair: its prompt's
            layer.keys, layer.values = layer.keys[select], layer.values[select]
        ids = torch.full((len(pairs), steps), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), width + steps), dtype=torch.long)
        positions = torch.zeros((len(pairs), steps), dtype=torch.long)
        rows: list[int] = []
        cols: list[int] = []
        for r, (p, a) in enumerate(pairs):
            m = len(a) - 1
            ids[r, :m] = torch.tensor(a[:m])
            mask[r, : len(p)] = 1
            mask[r, width : width + m] = 1
            positions[r] = len(p) + torch.arange(steps, device=positions.device)
            rows += [r] * m
            cols += range(m)
        hidden = self.body(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        return self.unembed(hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]).float()

    @staticmethod
    def _pick(logits: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        lp = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
        return lp.cpu().numpy().astype(np.float64), logits.argmax(-1).cpu().numpy()
