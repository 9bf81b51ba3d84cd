"""A retrieval in-context memory (IKE/SERAC-style): edits kept as text, retrieved into the prompt.

``apply`` stores each edit as a sentence ("The capital of X is Y.") keyed by subject and
relation; a later edit of the same subject and relation replaces the earlier one (so a
round edit restores the old fact instead of leaving two contradicting sentences). At
probe time the scorer's prompt rewriter scores every stored edit against each prompt
and prepends the ``top_k`` best whose score reaches ``threshold``; when none does, the
prompt is returned unchanged, so the model's outputs are exactly the base model's.

Retrieval scores (``retriever``):

- ``lexical`` (default): the fraction of the edit subject's words found in the prompt,
  plus 0.1 × the Jaccard overlap of prompt and edit-prompt words as a tie-break; a
  paraphrase names the subject, a neighborhood prompt names another one;
- ``hidden``: cosine similarity of the model's mean-pooled last hidden states of the
  prompt and the edit's prompt (one extra forward per probed prompt).

Cost per query. ``lexical`` keeps an inverted index from subject words to records: with J ≤ 1 the
Jaccard tie-break adds at most 0.1, so a record reaching ``threshold`` has at least
m = ⌈(threshold − 0.1)·|S|⌉ of its |S| subject words in the prompt, and by pigeonhole it is found
under any |S| − m + 1 of them (the longest are indexed). Only those candidates are scored, with the
exhaustive scorer's arithmetic, ordering and ties, so the retrieved records are exactly the same; a
threshold ≤ 0.1 makes every record a candidate, and retrieval then scores them all. ``hidden`` keeps
the records' keys as one cached matrix: linear in the records, but one matmul per batch of prompts.
The measured cost per query, indexed and exhaustive, is in docs/BENCHMARKS.md.

Lexical is the default by measurement (20 built-in facts in memory, SmolLM2): it found the
right edit for every prompt and paraphrase and retrieved anything for 10% of neighborhood
prompts; hidden similarity at 0.9 found 89% of paraphrases but fired on 88% of neighbors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lifelong.core.delta import Delta
from lifelong.core.models import LoadedModel
from lifelong.editors.base import Editor, resolved
from lifelong.editors.locate import padded_batch
from streams import Edit
from streams.errors import UserError

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)}


@dataclass
class MemoryParams:
    retriever: str = "lexical"  # lexical | hidden
    threshold: float | None = None  # None: 1.0 for lexical (every subject word present), 0.9 cosine for hidden
    top_k: int = 1  # retrieved edits placed in the prompt, best last (nearest the question)
    template: str = "Fact: {fact}\nQuestion: "  # how one retrieved edit is written before the prompt

    def validate(self, editor: str) -> None:
        if self.retriever not in ("lexical", "hidden"):
            raise UserError(f"{editor}: retriever must be lexical or hidden, got '{self.retriever}'")
        if self.top_k < 1:
            raise UserError(f"{editor}: top_k must be at least 1, got {self.top_k}")
        if "{fact}" not in self.template:
            raise UserError(f"{editor}: template must contain {{fact}}")


class MemoryEditor(Editor[MemoryParams]):
    name = "memory"
    description = "retrieval in-context memory: edits stored as text, retrieved into the prompt (IKE/SERAC-style)"
    Params = MemoryParams
    adaptor = True  # the weights never change; the edits live in the state and the prompts

    def __init__(self, params=None):
        super().__init__(params)
        if self.params.threshold is None:
            threshold = 1.0 if self.params.retriever == "lexical" else 0.9
            self.params = dataclasses.replace(self.params, threshold=threshold)
        self.records: list[dict] = []
        self._added: list[dict] = []  # the records the last apply() added: what a step saves
        self._embeddings: dict[str, torch.Tensor] = {}
        self._index: _LexicalIndex | None = None  # over self.records, extended or rebuilt on use
        self._keys: tuple[tuple, torch.Tensor] | None = None  # hidden: (signature, stacked record keys)
        self.candidate_evaluations = 0  # (prompt, record) scores computed by retrieval: its work, counted

    @property
    def threshold(self) -> float:
        """The retrieval threshold, as the constructor resolved it from the retriever."""
        return resolved(self.params.threshold, self.name, "threshold")

    def scope(self, lm: LoadedModel) -> list[str]:
        return []

    # -- state: the records as UTF-8 JSON in a uint8 tensor (state must be tensors)
    incremental_state = True  # a step saves only the records it added: run directories grow linearly

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._packed(self.records)

    def step_state(self) -> dict[str, torch.Tensor]:
        return self._packed(self._added)

    @staticmethod
    def _packed(records: list[dict]) -> dict[str, torch.Tensor]:
        if not records:
            return {}
        data = json.dumps(records, sort_keys=True).encode()
        return {"records_json": torch.tensor(list(data), dtype=torch.uint8)}

    def load_step_states(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Steps 1..k's added records, stored again in order with apply's rule (a record replaces one of
        the same subject and relation). Whole states, as runs before incremental saving wrote them,
        give the same records: storing a list over itself leaves it as it was."""
        self.records = []
        for state in states:
            self.load_state_dict(state, into=self.records)
        self._added = []

    def load_state_dict(self, state: dict[str, torch.Tensor], into: list[dict] | None = None) -> None:
        records = self._unpacked(state)
        self._index, self._keys = None, None
        if into is None:
            self.records, self._added = records, []
            return
        for record in records:
            self._store(into, record)

    def _store(self, records: list[dict], record: dict) -> None:
        key = (record["subject"], record["relation"])
        kept = [r for r in records if (r["subject"], r["relation"]) != key]
        if len(kept) != len(records):  # a replacement moves later records down: the index starts again
            self._index, self._keys = None, None
        records[:] = kept
        records.append(record)

    @staticmethod
    def _unpacked(state: dict[str, torch.Tensor]) -> list[dict]:
        if not state:
            return []
        if set(state) != {"records_json"}:
            raise ValueError(f"memory: unexpected state keys {sorted(state)}")
        return json.loads(bytes(state["records_json"].tolist()).decode())

    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        self._added = []
        for edit in batch:
            record = {
                "subject": edit.subject,
                "relation": edit.relation_id,
                "prompt": edit.rendered_prompt,
                "fact": f"{edit.rendered_prompt} {edit.target_new}.",
            }
            self._store(self.records, record)
            self._added.append(record)
        return Delta.empty()

    # -- retrieval
    def scores(self, lm: LoadedModel | None, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), len(records)) retrieval scores."""
        if self.params.retriever == "lexical":
            out = torch.zeros(len(prompts), len(self.records), dtype=torch.float64)
            rec_words = [(words(r["subject"]), words(r["prompt"])) for r in self.records]
            for i, prompt in enumerate(prompts):
                q = words(prompt)
                for j, (subject, text) in enumerate(rec_words):
                    overlap = len(subject & q) / len(subject) if subject else 0.0
                    out[i, j] = overlap + 0.1 * len(text & q) / max(1, len(text | q))
            return out
        assert lm is not None  # only the lexical retriever scores without a model
        return (self.embed(lm, prompts) @ self._record_keys(lm).T).double()

    def _signature(self) -> tuple:
        """What the caches were built over (the list, its length, its last record); with _store's
        invalidation on a replacement, a change of any of these means the caches are stale."""
        return (id(self.records), len(self.records), id(self.records[-1]) if self.records else None)

    def _record_keys(self, lm: LoadedModel) -> torch.Tensor:
        """The records' prompt embeddings stacked once, (len(records), width)."""
        if self._keys is None or self._keys[0] != self._signature():
            self._keys = (self._signature(), self.embed(lm, [r["prompt"] for r in self.records]))
        return self._keys[1]

    @torch.no_grad()
    def embed(self, lm: LoadedModel, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm mean-pooled last hidden states (cached per text: the base model's never change)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._embeddings]
        for start in range(0, len(todo), 16):
            chunk = todo[start : start + 16]
            ids, mask = padded_batch(lm, chunk)
            hidden = lm.adapter.body()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            for text, vector in zip(chunk, torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()):
                self._embeddings[text] = vector
        return torch.stack([self._embeddings[t] for t in texts])

    def retrieve(self, lm: LoadedModel | None, prompts: Sequence[str]) -> list[list[int]]:
        """Per prompt, the indices of the retrieved records (best last), possibly none."""
        if not self.records:
            return [[] for _ in prompts]
        if self.params.retriever == "lexical" and self.threshold - 0.1 > _SLACK:
            index = self._lexical_index()
            return [self._retrieve_indexed(index, prompt) for prompt in prompts]
        return self.retrieve_exhaustive(lm, prompts)

    def retrieve_exhaustive(self, lm: LoadedModel | None, prompts: Sequence[str]) -> list[list[int]]:
        """:meth:`retrieve` by scoring every record against every prompt (the reference the index matches)."""
        if not self.records:
            return [[] for _ in prompts]
        scores = self.scores(lm, prompts)
        self.candidate_evaluations += scores.numel()
        out = []
        for row in scores:
            order = [int(j) for j in torch.argsort(row, descending=True, stable=True)[: self.params.top_k]]
            out.append([j for j in reversed(order) if row[j] >= self.threshold])
        return out

    def _lexical_index(self) -> _LexicalIndex:
        index = self._index
        if (
            index is None
            or index.records is not self.records
            or index.threshold != self.threshold
            or (index.count > len(self.records))
            or (index.count and self.records[index.count - 1] is not index.last)
        ):
            index = self._index = _LexicalIndex(self.records, self.threshold)
        index.extend()  # records appended since
        return index

    def _retrieve_indexed(self, index: _LexicalIndex, prompt: str) -> list[int]:
        q = words(prompt)
        found = []
        for j in index.candidates(q):
            subject, text = index.words[j]
            # The exhaustive scorer's expression, so the float comparisons come out the same.
            score = (len(subject & q) / len(subject) if subject else 0.0) + 0.1 * len(text & q) / max(1, len(text | q))
            self.candidate_evaluations += 1
            if score >= self.threshold:
                found.append((-score, j))
        # A stable descending sort breaks ties by position, as the exhaustive argsort does; the top_k
        # of all records, filtered by threshold, are the top_k of those reaching it.
        order = [j for _, j in sorted(found)[: self.params.top_k]]
        return order[::-1]

    def rewrite(self, lm: LoadedModel | None, prompts: Sequence[str]) -> list[str]:
        """The prompts with their retrieved edits written in front; untouched when nothing is retrieved."""
        out = []
        for prompt, found in zip(prompts, self.retrieve(lm, prompts)):
            prefix = "".join(self.params.template.replace("{fact}", self.records[j]["fact"]) for j in found)
            out.append(prefix + prompt if found else prompt)
        return out

    def prompt_rewriter(self, lm: LoadedModel):
        return lambda prompts: self.rewrite(lm, prompts)


_SLACK = 1e-9  # float margin: the index may offer a record more, never miss one


class _LexicalIndex:
    """Subject word -> positions of the records indexed under it (see the module docstring), built over
    one records list and extended as records are appended to it."""

    def __init__(self, records: list[dict], threshold: float):
        self.records, self.threshold = records, threshold
        self.count = 0
        self.last: dict | None = None
        self.words: list[tuple[set[str], set[str]]] = []
        self.postings: dict[str, list[int]] = {}
        self.always: list[int] = []  # records every prompt must be scored against (none for sane thresholds)

    def extend(self) -> None:
        for j in range(self.count, len(self.records)):
            record = self.records[j]
            subject, text = words(record["subject"]), words(record["prompt"])
            self.words.append((subject, text))
            if not subject:
                continue  # scores at most 0.1 < threshold: never retrieved
            need = math.ceil((self.threshold - 0.1) * len(subject) - _SLACK)  # subject words a hit has
            if need <= 0:
                self.always.append(j)
                continue
            # Any len - need + 1 of them catch every prompt holding `need`; long words are rarer.
            for w in sorted(subject, key=lambda w: (-len(w), w))[: max(0, len(subject) - need + 1)]:
                self.postings.setdefault(w, []).append(j)
        self.count = len(self.records)
        self.last = self.records[-1] if self.records else None

    def candidates(self, q: set[str]) -> list[int]:
        found = set(self.always)
        for w in q:
            found.update(self.postings.get(w, ()))
        return sorted(found)
