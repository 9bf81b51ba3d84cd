"""A step's memory, estimated before it starts, against the memory available (#37).

A step's edits are scored and held together: a step of 300,000 edits grew past 20 GB before the
kernel killed it, 21 minutes in. Before each step the replay compares :func:`step_estimate` (or an
editor's own ``memory_estimate``) with :func:`available_memory` and refuses, in one line, a step
that would not fit, before anything of it is computed or written.

The estimate is generic and errs high: the edited weights three times over (the step's snapshot,
its delta, a fit's working copy or gradient), one bounded forward pass with its gradients
(``max_batch_tokens`` tokens: logits and every layer's activations), and per edit its texts as
token ids (a token covers at least one byte, so the bytes bound the tokens), a key and a value per
edited matrix (what batch editors keep per edit) and :data:`PER_EDIT_BYTES` for the edit's objects,
scores and result rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from streams import Edit

# What each edit of a step holds beyond its tensors (the edit, its scores, its probes' rows): the
# 300,000-edit step above grew to 20 GB, about 67 KB an edit.
PER_EDIT_BYTES = 64 * 1024
# Padded tokens per forward pass of the scorer (lifelong.core.scorer.Scorer's default).
FORWARD_TOKENS = 512


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on ``device``: an accelerator's free memory, else the
    host's (``MemAvailable``, capped by a cgroup's limit); None where it cannot be read."""
    device = torch.device(device)
    backend = getattr(torch, device.type, None)
    if backend is not None and hasattr(backend, "mem_get_info"):  # an accelerator: its own memory
        return int(backend.mem_get_info(device)[0])
    available = _meminfo_available()
    limit = _cgroup_room()
    if limit is not None:
        available = limit if available is None else min(available, limit)
    return available


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # not Linux: psutil, when installed
        import psutil  # type: ignore[import-untyped]

        return int(psutil.virtual_memory().available)
    except (ImportError, OSError):
        return None


def _cgroup_room() -> int | None:
    """What a cgroup (v2) memory limit still allows this process's group, if one is set."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def _text_bytes(edit: Edit) -> int:
    texts = [edit.rendered_prompt, edit.target_new, edit.target_true or "", *edit.paraphrases]
    texts += [t for n in edit.neighborhood for t in (n.prompt, n.answer)]
    return sum(len(t.encode()) for t in texts)


def step_estimate(model: nn.Module, scope: Sequence[str], edits: Sequence[Edit]) -> int:
    """Bytes a step of ``edits`` that edits the parameters ``scope`` of ``model`` may hold at its peak,
    beyond the model itself (see the module's docstring)."""
    params = dict(model.named_parameters())
    edited = [params[name] for name in scope if name in params]
    weights = sum(p.numel() * p.element_size() for p in edited)
    embeddings: torch.Tensor = model.get_input_embeddings().weight  # type: ignore[operator]
    vocab, hidden = embeddings.shape
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    width = embeddings.element_size()
    forward = 2 * FORWARD_TOKENS * (vocab + layers * (4 * hidden + 2 * inner)) * width
    per_matrix = sum(sum(p.shape) if p.dim() == 2 else p.numel() for p in edited) * 2 * width
    per_edit = sum(_text_bytes(e) * 8 + per_matrix + PER_EDIT_BYTES for e in edits)
    return 3 * weights + forward + per_edit


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
