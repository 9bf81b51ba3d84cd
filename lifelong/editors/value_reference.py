"""The v*/z* fit of ROME and MEMIT as the papers state it, written plainly: whole forwards, one prompt
at a time, δ added by a hook. It is the reading aid and the check for :func:`locate.optimize_value`,
which computes the same numbers through three speed layers (a cached prefix, only δ's suffix
recomputed, a fused upper stack); ``tests/test_upper.py`` holds the two equal. Not for use in runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lifelong.core.model_access import Codec
from lifelong.core.models import LoadedModel
from lifelong.editors.hooks import Hooks
from lifelong.editors.locate import ValueFit, contexts, subject_token_index
from lifelong.editors.upper import layer_output
from streams import Edit


def optimize_value_reference(
    lm: LoadedModel,
    layer: int,
    edit: Edit,
    templates: Sequence[str],
    *,
    steps: int = 20,
    lr: float = 0.5,
    kl_factor: float = 0.0625,
    weight_decay: float = 0.5,
    clamp_norm: float = 4.0,
    stop_loss: float = 0.05,
    stop_on: str = "total",
    scale: str = "mlp_output",
) -> ValueFit:
    """v* = v_orig + δ, δ found by Adam on NLL(target | each context) + kl_factor · KL(p_δ ‖ p_0) at
    "{subject} is a" + weight_decay · ‖δ‖ / ‖s‖², δ added to the MLP output of ``layer`` at the subject's
    last token of every prompt, ‖δ‖ ≤ clamp_norm · ‖s‖ (s: v_orig, or the residual leaving the layer)."""
    model, adapter = lm.model, lm.adapter
    target = Codec(lm.tokenizer).answer_ids(edit.target_new)
    texts = [*contexts(edit, templates), f"{edit.subject} is a"]  # the last: the KL prompt
    width = adapter.out_proj_weight_view(layer).shape[0]  # the MLP output's width (the residual stream's)
    delta = torch.zeros(width, device=lm.layer_device(layer), requires_grad=True)
    at: list[int] = [0]  # the token δ is added at, for the prompt being run

    def delta_at_subject(module, args, out):  # added to the MLP output: it flows into the residual stream
        shift = torch.zeros_like(out)
        shift[0, at[0]] = delta.to(out.dtype)
        return shift

    def run(text: str, answer: Sequence[int]):
        """The logits of ``text`` + ``answer`` (teacher forcing), δ added at the subject's last token."""
        at[0] = subject_token_index(lm.tokenizer, text, edit.subject)
        ids = lm.tokenizer(text).input_ids
        return model(torch.tensor([[*ids, *answer]], device=lm.device)).logits[0].float(), len(ids)

    # The unedited values at the bare prompt: the key, v_orig and the residual leaving the layer.
    with torch.no_grad(), Hooks() as hooks:
        seen: dict[str, torch.Tensor] = {}
        index = subject_token_index(lm.tokenizer, texts[0], edit.subject)
        hooks.on_output(adapter.out_proj(layer), lambda m, a, o: seen.update(key=a[0][0, index], value=o[0, index]))
        hooks.on_output(adapter.layer(layer), lambda m, a, o: seen.update(residual=layer_output(o)[0, index]))
        model(torch.tensor([lm.tokenizer(texts[0]).input_ids], device=lm.device))
    anchor = (seen["value"] if scale == "mlp_output" else seen["residual"]).float()
    optimizer = torch.optim.Adam([delta], lr=lr)
    kl_ref = None
    terms: dict[str, float] = {}
    with Hooks() as hooks:
        hooks.add_to_output(adapter.out_proj(layer), delta_at_subject)
        for taken in range(1, steps + 1):
            nll = torch.stack(
                [
                    torch.nn.functional.cross_entropy(
                        logits[start - 1 : start - 1 + len(target)], torch.tensor(target, device=lm.device)
                    )
                    for logits, start in (run(text, target[:-1]) for text in texts[:-1])
                ]
            ).mean()  # every prompt has the same target: the mean over prompts is the mean over tokens
            kl_logits, _ = run(texts[-1], [])
            kl_now = kl_logits[at[0]].log_softmax(-1)[None]
            kl_ref = kl_now.detach() if kl_ref is None else kl_ref  # δ = 0 at the first step
            kl = torch.nn.functional.kl_div(kl_ref, kl_now, log_target=True, reduction="batchmean")
            penalty = weight_decay * delta.norm() / anchor.norm() ** 2
            loss = nll + kl_factor * kl + penalty
            terms = {"nll": nll.item(), "kl": kl.item(), "penalty": penalty.item(), "loss": loss.item()}
            if terms["loss" if stop_on == "total" else "nll"] < stop_loss or taken == steps:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                if delta.norm() > clamp_norm * anchor.norm():
                    delta.mul_(clamp_norm * anchor.norm() / delta.norm())
    original = seen["value"].double()
    return ValueFit(
        value=original + delta.detach().double(),
        original=original,
        steps=taken,
        keys=seen["key"].double()[None],
        scale=anchor.double(),
        nll=terms["nll"],
        kl=terms["kl"],
        penalty=terms["penalty"],
        loss=terms["loss"],
    )
