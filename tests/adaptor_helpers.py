"""Helpers shared by the GRACE, WISE and memory tests: base snapshots, logits, replay runs."""

from __future__ import annotations

import torch

from lifelong.editors.locate import padded_batch


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def assert_weights_equal(lm, base) -> None:
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, base[name]), name


@torch.no_grad()
def logits(lm, texts) -> torch.Tensor:
    ids, mask = padded_batch(lm, texts)
    return lm.model(input_ids=ids, attention_mask=mask).logits
