"""GRACE: a codebook adaptor around one MLP output projection (Hartvigsen et al. 2023).

The codebook holds keys (the projection's input at an edit prompt's last token),
values (outputs trained per edit) and deferral radii ε. At inference, as in the public
GRACE code (Thartvigsen/GRACE ``grace/editors/grace.py``, EasyEdit ``models/grace``), each
row of a forward has one query: its last real token (EasyEdit's ``key_id = -1``; in a
scorer's prompt pass, the prompt's last token; when generating, the new token); when the
query lies within ε of its nearest key, that position's output becomes the key's value
(``replacement: replace_last``, EasyEdit's hparams) and every other position passes
through unchanged (bitwise). ``query=every`` (our earlier rule) looks up every position.
Adding an edit with key h and label y, against the nearest entry i at distance d:

- d > ε_i + ε_init: a new entry (h, value, ε_init);
- otherwise, label y_i ≠ y (conflict): a new entry, and both radii split to d/2
  (the old one a hair less, so the two balls do not touch). As in the original this
  holds at d = 0 too (the same key, e.g. a round edit): the old radius becomes −1e-5,
  the new one 0, and the older key wins the tie at lookup, so neither edit is served.
  ``same_key=relabel`` (our earlier rule) lets the entry take the new label instead;
- otherwise (same label): ε_i grows to d if d > ε_i ("coverage" expansion), no new key.

The value used for the edit (new or nearest entry) is then trained by Adam on the
target's NLL, starting from the layer's own output at h ("warm" init, so an untrained
value changes nothing). The base weights never change; the codebook is editor state.

Finding the nearest key (``index``). ``exact`` (default, the original's answer): one BLAS product
screens the keys with a bounded error and only the few that may be nearest are measured exactly, so
hits and indices are those of measuring every key, at a cost still linear in the keys but 11–14×
smaller on 1,000–13,555 keys of SmolLM2 (``benchmarks/grace_lookup.py``). ``hnsw``: a faiss HNSW graph
proposes 16 keys per query, measured exactly; its cost grows well below linearly (×1.2–1.6 per
doubling of the keys, measured), and its answer differs from the exact one only when the nearest key
is not among the 16 (measured: never in 1,024 probe queries against up to 13,555 SmolLM2 keys; for
one edit of 10,000 in a tiny-model run). The add rule's ``nearest`` is always exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lifelong.core.delta import Delta
from lifelong.core.models import LoadedModel
from lifelong.editors.adaptor import AdaptorEditor, UpperLayers, edit_batch, label_id, last_prompt_index, target_nll
from lifelong.editors.locate import capture_keys
from streams import Edit
from streams.errors import UserError


@dataclass
class GRACEParams:
    layer: int | None = None  # None: 4/5 of the depth (layer 24 of 30 for SmolLM2)
    eps_init: float = 6.0  # initial deferral radius (L2, key units); see docs/EDITORS.md for how it was chosen
    lr: float = 1.0  # Adam on the value, as the paper's edit_lr
    max_steps: int = 100  # the paper's n_iter
    stop_loss: float = 0.05  # stop once the target's mean token NLL is below this
    query: str = "last"  # last: one query per row, its last token (original); every: every position
    same_key: str = "split"  # split: the original's rule at d = 0 too; relabel: the entry takes the new label
    index: str = "exact"  # exact: the nearest key for certain (original); hnsw: a graph index's candidates (faiss)

    def validate(self, editor: str) -> None:
        if self.query not in ("last", "every"):
            raise UserError(f"{editor}: query must be last or every, got '{self.query}'")
        if self.same_key not in ("split", "relabel"):
            raise UserError(f"{editor}: same_key must be split or relabel, got '{self.same_key}'")
        if self.index not in ("exact", "hnsw"):
            raise UserError(f"{editor}: index must be exact or hnsw, got '{self.index}'")
        if self.index == "hnsw":
            try:
                import faiss  # noqa: F401
            except ImportError:
                raise UserError(
                    f"{editor}: index=hnsw needs the faiss-cpu package: pip install 'lifelong-editing[index]'"
                ) from None


class GRACEEditor(AdaptorEditor[GRACEParams]):
    name = "grace"
    description = "GRACE codebook adaptor on one MLP output projection (keys, trained values, deferral radii)"
    Params = GRACEParams
    precision_parts: ClassVar[dict[str, str]] = {"codebook": "float32", "key_distances": "float32"}

    def __init__(self, params=None):
        super().__init__(params)
        self.reset()
        self._training: tuple[int, torch.Tensor] | None = None  # (entry, value being trained)
        self._query_at: int | None = None  # while training: the edit prompt's last position (the key's)
        self._bypass = False  # True: the hook passes everything through (warm-value computation)
        self._touched: set[int] = set()  # codebook rows written since apply() began
        self._training_lookup: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # _lookup_once

    def reset(self) -> None:
        self.keys = torch.zeros(0, 0)
        self.values = torch.zeros(0, 0)
        self.eps = torch.zeros(0)
        self.labels = torch.zeros(0, dtype=torch.long)
        self._keys_cache: dict[torch.device, tuple] = {}  # see _key_matrix
        self._graph: Any = None  # index=hnsw: a faiss graph over the keys, see _graph_index

    def __len__(self) -> int:
        return self.keys.shape[0]

    # -- state
    # A step saves only the codebook entries it added or wrote (rows of keys, values, eps and labels
    # with their indices) and the codebook's size: run directories grow linearly with the edits.
    incremental_state = True
    ROWS = ("keys", "values", "eps", "labels")

    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        n0 = len(self)
        self._touched = set()  # rows add() and edit_one() write: no copy of the whole codebook
        delta = super().apply(lm, batch)
        index = torch.tensor(sorted(self._touched | set(range(n0, len(self)))), dtype=torch.long)
        self._step = (
            {}
            if not len(index)
            else {
                "index": index,
                "size": torch.tensor(len(self)),
                **{name: getattr(self, name)[index].clone() for name in self.ROWS},
            }
        )
        return delta

    def step_state(self) -> dict[str, torch.Tensor]:
        return dict(getattr(self, "_step", {}))

    def load_step_states(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Steps 1..k's changed rows written in order over a growing codebook; a whole state (as runs
        before incremental saving wrote every step) replaces the codebook."""
        self.reset()
        for state in states:
            if not state:
                continue
            if "index" not in state:
                self.load_state_dict(state)
                continue
            size, index = int(state["size"]), state["index"].long()
            if size > len(self):
                self._grow(size, state)
            for name in self.ROWS:
                getattr(self, name)[index] = state[name].to(getattr(self, name).dtype)
        self._step = {}
        self._keys_cache, self._graph = {}, None  # rows were written in place

    def _grow(self, size: int, state: dict[str, torch.Tensor]) -> None:
        """Extend the codebook to ``size`` rows (zeros, overwritten by the step's rows)."""
        extra = size - len(self)
        if not len(self):
            self.keys = torch.zeros(size, state["keys"].shape[1])
            self.values = torch.zeros(size, state["values"].shape[1])
            self.eps, self.labels = torch.zeros(size), torch.zeros(size, dtype=torch.long)
            return
        self.keys = torch.cat([self.keys, torch.zeros(extra, self.keys.shape[1], device=self.keys.device)])
        self.values = torch.cat([self.values, torch.zeros(extra, self.values.shape[1], device=self.values.device)])
        self.eps = torch.cat([self.eps, torch.zeros(extra, device=self.eps.device)])
        self.labels = torch.cat([self.labels, torch.zeros(extra, dtype=torch.long, device=self.labels.device)])

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not len(self):
            return {}
        return {
            "keys": self.keys.clone(),
            "values": self.values.clone(),
            "eps": self.eps.clone(),
            "labels": self.labels.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            self.reset()
            return
        missing = {"keys", "values", "eps", "labels"} - set(state)
        if missing:
            raise ValueError(f"grace: state lacks {sorted(missing)}")
        self.keys, self.values = state["keys"].float().clone(), state["values"].float().clone()
        self._keys_cache, self._graph = {}, None
        self.eps, self.labels = state["eps"].float().clone(), state["labels"].long().clone()

    # -- the codebook rules
    def nearest(self, key: torch.Tensor) -> tuple[float, int]:
        """Distance to and index of the nearest codebook key (inf, -1 when empty); float64, the first
        (oldest) of equally near keys. Only the keys :meth:`_scan` keeps are measured, which gives the
        same answer as measuring every key."""
        if not len(self):
            return float("inf"), -1
        key = key.detach().float().cpu()
        cols = self._scan(key[None])
        keys = self.keys if cols is None else self.keys[cols]
        d = (keys.double() - key.double()[None]).norm(dim=1)
        i = int(d.argmin())
        return float(d[i]), i if cols is None else int(cols[i])

    def add(self, key: torch.Tensor, value: torch.Tensor, label: str) -> int:
        """Insert (key, value) for ``label`` by GRACE's add / expand / split rules; returns the entry to train."""
        key, value = key.detach().float().cpu(), value.detach().float().cpu()
        eps0, y = self.params.eps_init, label_id(label)
        d, i = self.nearest(key)
        if i >= 0 and d <= float(self.eps[i]) + eps0:
            self._touched.add(i)  # a row this step writes: saved in its state
            if int(self.labels[i]) == y:  # same label: expand the nearest ball to cover the key
                if d > float(self.eps[i]):
                    self.eps[i] = d
                return i
            if d <= 1e-6 and self.params.same_key == "relabel":  # the same key: the newer label wins
                self.labels[i] = y
                return i
            self._append(key, value, d / 2, y)  # conflict: split the two radii
            self.eps[i] = d / 2 - 1e-5
            return len(self) - 1
        self._append(key, value, eps0, y)
        return len(self) - 1

    def _append(self, key, value, eps, y) -> None:
        if not len(self):
            self.keys, self.values = key[None].clone(), value[None].clone()
        else:
            self.keys = torch.cat([self.keys, key[None]])
            self.values = torch.cat([self.values, value[None]])
        self.eps = torch.cat([self.eps, torch.tensor([eps], dtype=torch.float32, device=self.eps.device)])
        self.labels = torch.cat([self.labels, torch.tensor([y], dtype=torch.long, device=self.labels.device)])

    # -- inference
    def lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For (n, d_in) queries: whether each is within its nearest key's radius, and that key's index
        (the first, i.e. oldest, of equally near keys, as the original's ``min``).

        The decision uses the subtraction form of the distance (``cdist`` without the matmul shortcut):
        the matmul form ||q||² + ||k||² − 2q·k loses digits to cancellation, which can move a query
        across a radius (d ≤ ε decides a hit) or change which of two equally near keys wins. That form
        is only used, through :meth:`_scan`, to rule keys out; the survivors are measured exactly, so
        hits and indices are bitwise those of measuring every key (tests/test_grace.py checks it).
        With ``index=hnsw`` the candidates come from a graph instead (:meth:`_graph_lookup`)."""
        queries = queries.float()
        if self.params.index == "hnsw" and len(self) >= self.SCAN_FROM:
            return self._graph_lookup(queries)
        cols = self._scan(queries)
        keys = self._key_matrix(queries.device)[0]
        keys = keys if cols is None else keys[cols]
        dist, idx = torch.cdist(queries, keys, compute_mode="donot_use_mm_for_euclid_dist").min(1)
        if cols is not None:
            idx = cols[idx]
        return dist <= self.eps.to(queries.device)[idx], idx

    # Below this many keys every key is measured exactly: the screen would save nothing.
    SCAN_FROM = 256

    def _scan(self, queries: torch.Tensor) -> torch.Tensor | None:
        """Indices (ascending) of the keys that may be nearest to some query, or None for all keys.

        One BLAS product gives every squared distance in the matmul form; its error is bounded by
        (d + 4)·u·(|q| + |k|)² (u = 2⁻²⁴; the bound on a float32 dot product of length d, doubled), and
        the exact subtraction form's relative error on d² by the same (d + 4)·u, doubled. A key whose
        matmul-form distance exceeds the smallest one by more than those bounds allow cannot be the
        nearest under the exact form, so it is dropped. What remains is usually a handful of keys."""
        n = len(self)
        if n < self.SCAN_FROM:
            return None
        keys, sq, k_max = self._key_matrix(queries.device)
        q_sq = (queries * queries).sum(1)
        d2 = torch.addmm(q_sq[:, None] + sq[None], queries, keys.T, alpha=-2.0)
        gamma = 2 * (queries.shape[1] + 4) * 2.0**-24
        err = gamma * (q_sq.sqrt() + k_max) ** 2  # the matmul form's error bound, per query
        lowest = d2.min(1).values.clamp_min(0)
        limit = (lowest + err) * (1 + 4 * gamma) + err
        return (d2 <= limit[:, None]).any(0).nonzero()[:, 0]

    def _graph_lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``index=hnsw``: a faiss HNSW graph over the keys proposes ``GRAPH_CANDIDATES`` keys per query,
        which are measured exactly (the oldest of equally near ones wins). Cost per query grows well
        below linearly with the keys; the answer is the exact rule's unless the nearest key is not
        among the candidates (benchmarks/grace_lookup.py measures how often decisions agree)."""
        graph = self._graph_index()
        k = min(self.GRAPH_CANDIDATES, len(self))
        _, found = graph.search(queries.detach().cpu().numpy(), k)
        cand = torch.from_numpy(found).long().clamp_min(0).sort(1).values.to(queries.device)
        keys = self._key_matrix(queries.device)[0]
        d = torch.cdist(queries[:, None, :], keys[cand], compute_mode="donot_use_mm_for_euclid_dist")[:, 0]
        dist, j = d.min(1)
        idx = cand.gather(1, j[:, None])[:, 0]
        return dist <= self.eps.to(queries.device)[idx], idx

    # faiss HNSW settings: graph degree, build and search breadths, candidates measured exactly per query
    GRAPH_M, GRAPH_EF_BUILD, GRAPH_EF_SEARCH, GRAPH_CANDIDATES = 32, 200, 128, 16

    def _graph_index(self):
        """The HNSW graph over the keys, extended with keys appended since. Keys are inserted one at a
        time in codebook order, whether live or rebuilt after a checkout, so the graph (and so every
        answer) is the same either way."""
        import faiss

        graph = self._graph
        if graph is None or graph.ntotal > len(self):
            graph = self._graph = faiss.IndexHNSWFlat(self.keys.shape[1], self.GRAPH_M)
            graph.hnsw.efConstruction = self.GRAPH_EF_BUILD
            graph.hnsw.efSearch = self.GRAPH_EF_SEARCH
        faiss.omp_set_num_threads(torch.get_num_threads())
        keys = self.keys.detach().float().cpu().numpy()
        for row in range(graph.ntotal, len(self)):
            graph.add(keys[row : row + 1])
        return graph

    def _key_matrix(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The keys on ``device`` (float32), their squared norms and the largest norm; cached until the
        keys change (a new tensor, or :meth:`load_step_states` writing rows in place). One per device:
        edits look keys up on the CPU, a GPU model's forwards on the GPU."""
        cache = self._keys_cache.get(device)
        if cache is None or cache[0] is not self.keys:
            keys = self.keys.to(device, torch.float32)
            sq = (keys * keys).sum(1)
            k_max = float(sq.max().sqrt()) if len(sq) else 0.0
            cache = self._keys_cache[device] = (self.keys, keys, sq, k_max)
        return cache[1], cache[2], cache[3]

    def _hook(self, module, args, out):
        if not len(self) or self._bypass:
            return out
        x = args[0]
        if self.params.query == "every":
            hit, idx = self._lookup_once(x.reshape(-1, x.shape[-1]))
            if not bool(hit.any()):
                return out
            flat = torch.where(hit[:, None], self._values(idx, out), out.reshape(-1, out.shape[-1]))
            return flat.view_as(out)
        rows, length = x.shape[0], x.shape[1]
        if self._query_at is not None:  # an edit's training forward: the key's own position
            cols = torch.full((rows,), self._query_at, dtype=torch.long)
            present = torch.ones(rows, dtype=torch.bool)
        else:  # each row's last real token
            real = self.token_mask(x.shape[:2])
            present = real.any(1)
            cols = (real.long() * torch.arange(1, length + 1, device=real.device)).argmax(1)
        cols, present = cols.to(x.device), present.to(x.device)
        hit, idx = self._lookup_once(x[torch.arange(rows, device=x.device), cols])
        hit = hit & present
        if not bool(hit.any()):
            return out
        at = torch.zeros(rows, length, dtype=torch.bool, device=x.device)
        at[torch.arange(rows, device=x.device), cols] = hit
        return torch.where(at[..., None], self._values(idx, out)[:, None, :], out)

    def _lookup_once(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`lookup`, remembered over one edit's training forwards: their queries repeat (the layer's
        input does not depend on the value being trained) and the codebook does not change meanwhile."""
        if self._training is None:
            return self.lookup(queries)
        memo = self._training_lookup
        if memo is not None and memo[0].shape == queries.shape and torch.equal(memo[0], queries):
            return memo[1], memo[2]
        hit, idx = self.lookup(queries)
        self._training_lookup = (queries.detach().clone(), hit, idx)
        return hit, idx

    def _values(self, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Codebook values of entries ``idx``; the entry being trained uses its differentiable value."""
        values = self.values.to(out.device, out.dtype)[idx]
        if self._training is not None:
            entry, value = self._training
            values = torch.where((idx == entry)[:, None], value.to(out.dtype)[None], values)
        return values

    # -- editing
    def edit_one(self, lm: LoadedModel, edit: Edit) -> int:
        """Add ``edit``'s key to the codebook and train its value; returns the trained entry."""
        p = self.params
        batch = edit_batch(lm, edit)
        position = last_prompt_index(lm, edit)
        # The key is the projection's input, which the adaptor does not change; the warm
        # value is the unadapted output at that key; neither needs the codebook searched.
        self._bypass = True
        try:
            with torch.no_grad(), capture_keys(lm.adapter, self.layer) as seen:
                lm.adapter.body()(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
                key = seen[0][0, position]
                warm = lm.adapter.out_proj(self.layer)(key[None])[0]
        finally:
            self._bypass = False
        entry = self.add(key, warm, edit.target_new)

        upper = UpperLayers(lm, self.layer, batch)
        value = self.values[entry].clone().to(lm.layer_device(self.layer)).requires_grad_(True)
        optimizer = torch.optim.Adam([value], lr=p.lr)
        self._training, self._query_at = (entry, value), position
        try:
            for _ in range(p.max_steps):
                loss = target_nll(upper)
                if loss.item() < p.stop_loss or not loss.requires_grad:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            self._training, self._query_at, self._training_lookup = None, None, None
        self.values[entry] = value.detach().float().cpu()
        self._touched.add(entry)
        return entry
