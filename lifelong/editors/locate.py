"""Shared machinery of locate-and-edit editors (ROME, MEMIT, AlphaEdit).

Keys are the inputs of a layer's MLP output projection at the subject's last token;
values are that projection's outputs. ``optimize_value`` finds the value v* that makes
the model produce the new target (ROME's v*, MEMIT's z*), by optimising a vector δ
added to the projection's output at the subject's last token while every weight stays
frozen (so backward computes no weight gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import cast

import torch
from transformers import DynamicCache

from lifelong.core.arch import ArchAdapter
from lifelong.core.bars import bar as progress_bar
from lifelong.core.delta import ParamChange
from lifelong.core.machine import check_dtype_setting
from lifelong.core.model_access import Codec
from lifelong.core.models import LoadedModel
from lifelong.editors.hooks import capture, first_input, stop_after
from lifelong.editors.upper import UpperStack, compute_dtype, layer_output, suffix_pass_kwargs
from lifelong.editors.upper_llama import FusedLlamaStack, fused_supported
from streams import Edit
from streams.errors import UserError

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


# Context templates generated from the model, as ROME's originals do (zjunlp/EasyEdit
# easyeditor/models/rome/rome_main.py:160-183 ``get_context_templates`` with util/generate.py:78-176
# ``generate_fast``; kmeng01/rome rome/rome_main.py:150-178): for each (length, count) of
# ``context_template_length_params``, ``count`` top-k (k = 5) samples from the model, spread
# evenly over the start strings, each ``length`` tokens long in all (start included); a sample
# becomes the prefix "<sample>. " of its template, braces removed.
GENERATION_STARTS = {
    "easyedit": ("The", "Therefore", "Because", "I", "You"),  # EasyEdit rome_main.py:170
    "kmeng": ("<|endoftext|>",),  # kmeng01/rome rome_main.py:165 (GPT-2's end-of-text token)
}
LENGTH_PARAMS = ((5, 10), (10, 10))  # the hparams files' context_template_length_params


@torch.no_grad()
def sample_continuations(
    lm: LoadedModel,
    starts: Sequence[str],
    per_start: int,
    length: int,
    generator: torch.Generator,
    top_k: int = 5,
    on_pass: Callable[[], object] | None = None,
) -> list[str]:
    """``per_start`` samples after each of ``starts``, ``length`` tokens in all, by top-k sampling:
    the algorithm of EasyEdit's ``generate_fast`` (util/generate.py:78-176), one batch, one
    ``multinomial`` draw per position over every row, a row taking its draw when its text ends
    there. Decoded without special tokens, NFKD-normalised, blank lines joined (as there). ``on_pass``
    is called after each forward pass (:func:`sampling_passes` of them), for a progress bar."""
    import unicodedata

    rows = [s for s in starts for _ in range(per_start)]
    encoded = [list(lm.tokenizer(s).input_ids) for s in rows]
    pad = Codec(lm.tokenizer).pad_id
    width = max(len(e) for e in encoded)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, e in enumerate(encoded):
        ids[r, : len(e)], mask[r, : len(e)] = torch.tensor(e), 1
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    cache = DynamicCache(config=lm.adapter.config)
    begin, done = 0, int(mask.sum(1).min())  # each pass caches positions [begin, done)
    while ids.shape[1] < length:
        out = lm.model(input_ids=ids[:, begin:done], attention_mask=mask[:, :done], cache=cache, use_cache=True)
        cache = out.past_key_values
        probs = torch.softmax(out.logits[:, -1, :], dim=1)
        top = torch.topk(probs, top_k, dim=1).indices
        top_probs = torch.gather(probs, 1, top)
        top_probs = top_probs / top_probs.sum(1)[:, None]
        drawn = torch.gather(top, 1, torch.multinomial(top_probs, 1, generator=generator))
        if done == ids.shape[1]:
            ids = torch.cat([ids, torch.full_like(ids[:, :1], pad)], 1)
            mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], 1)
        ends = mask.sum(1)  # a row whose text ends at ``done`` takes this draw
        for r in range(len(rows)):
            if int(ends[r]) == done and done < length:
                ids[r, done], mask[r, done] = drawn[r, 0], 1
        begin, done = done, done + 1
        if on_pass is not None:
            on_pass()
    texts = [lm.tokenizer.decode(row, skip_special_tokens=True) for row in ids.tolist()]
    return [unicodedata.normalize("NFKD", str(t)).replace("\n\n", " ").replace("<|endoftext|>", "") for t in texts]


def sampling_passes(lm: LoadedModel, starts: Sequence[str], length: int) -> int:
    """The forward passes :func:`sample_continuations` makes: one per position from the shortest
    start's end to ``length``, none when the longest start already reaches it."""
    sizes = [len(lm.tokenizer(s).input_ids) for s in starts]
    return length - min(sizes) if max(sizes) < length else 0


def generated_templates(
    lm: LoadedModel,
    seed: int,
    starts: Sequence[str] = GENERATION_STARTS["easyedit"],
    length_params: Sequence[tuple[int, int]] = LENGTH_PARAMS,
    who: str = "",
) -> tuple[str, ...]:
    """``"{}"`` and one template ``"<sample>. {}"`` per sample of :func:`sample_continuations`
    (EasyEdit rome_main.py:166-167), the samples drawn from a generator seeded with ``seed`` (the
    originals draw from torch's global generator; seeded alike they give the same samples). A bar
    named after ``who`` (the editor) counts the sampling passes: on a CPU under load they take a while."""
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    per_start = [max(1, count // len(starts)) for _, count in length_params]
    total = sum(n * len(starts) for n in per_start)
    passes = sum(sampling_passes(lm, starts, length) for length, _ in length_params)
    desc = f"{who + ': ' if who else ''}generating {total} context templates from θ0"
    bar = progress_bar(total=passes, desc=desc, unit="pass", leave=False)
    samples: list[str] = []
    for (length, _), n in zip(length_params, per_start):
        samples += sample_continuations(lm, starts, n, length, generator, on_pass=bar.update)
    bar.close()
    return ("{}",) + tuple(s.replace("{", "").replace("}", "") + ". {}" for s in samples)


def subject_token_index(tokenizer, text: str, subject: str) -> int:
    """Index of the subject's last token in ``tokenizer(text)`` (its last occurrence in text)."""
    end = text.rfind(subject)
    if end < 0:
        raise ValueError(f"subject {subject!r} does not occur in {text!r}")
    return len(tokenizer(text[: end + len(subject)]).input_ids) - 1


def contexts(edit: Edit, templates: Sequence[str]) -> list[str]:
    """The edit's prompt (subject filled in) under each context template."""
    return [t.replace("{}", edit.rendered_prompt) for t in templates]


def capture_keys(adapter: ArchAdapter, layer: int) -> AbstractContextManager[list[torch.Tensor]]:
    """Collect the inputs of layer ``layer``'s MLP output projection during forwards."""
    return capture(adapter.out_proj(layer), first_input)


def padded_batch(lm: LoadedModel, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and attention mask for ``texts``, on the model's device."""
    return Codec(lm.tokenizer).padded(texts, lm.device)


@torch.no_grad()
def keys_at(lm: LoadedModel, layer: int, texts: Sequence[str], indices: Sequence[int]) -> torch.Tensor:
    """Keys at one token index per text, shape (len(texts), d_in), in one padded forward."""
    ids, mask = padded_batch(lm, texts)
    with capture_keys(lm.adapter, layer) as seen:
        lm.adapter.body()(input_ids=ids, attention_mask=mask, use_cache=False)
    keys = seen[0]  # on the layer's device
    rows = torch.arange(len(texts), device=keys.device)
    return keys[rows, torch.tensor(list(indices), device=keys.device)].double()


KEY_AVERAGES = ("uniform", "grouped")


def key_weights(count: int, rule: str) -> torch.Tensor:
    """Weights of the ``count`` context templates' keys in the averaged key (float64, sum 1).

    "uniform": 1/count each (ROME's compute_u). "grouped": MEMIT's compute_ks, which averages
    within each group of templates and then over the groups; its groups are the bare prompt and
    the prefixed ones, so the bare prompt weighs ½ and each of the count − 1 others ½/(count − 1)."""
    if rule not in KEY_AVERAGES:
        raise ValueError(f"key_average must be one of {', '.join(KEY_AVERAGES)}, got '{rule}'")
    if rule == "uniform" or count == 1:
        return torch.full((count,), 1.0 / count, dtype=torch.float64)
    weights = torch.full((count,), 0.5 / (count - 1), dtype=torch.float64)
    weights[0] = 0.5
    return weights


def average_key(
    lm: LoadedModel, layer: int, edit: Edit, templates: Sequence[str], rule: str = "uniform"
) -> torch.Tensor:
    """The subject's last-token key averaged over context templates (the first is the bare
    prompt), weighted by ``rule`` (see :func:`key_weights`)."""
    texts = contexts(edit, templates)
    idx = [subject_token_index(lm.tokenizer, t, edit.subject) for t in texts]
    keys = keys_at(lm, layer, texts, idx)
    return key_weights(len(texts), rule).to(keys.device) @ keys


STACK_KINDS = ("fused", "model")
STOP_RULES = ("total", "nll")
# The vector whose norm scales δ's clamp and weight-decay term: ROME's v_orig (the MLP output at
# the subject's last token) or, as MEMIT's compute_z, the residual stream leaving the layer there.
SCALE_VECTORS = ("mlp_output", "layer_output")


@dataclass
class ValueParams:
    """Hyperparameters of the v* (ROME) / z* (MEMIT) optimisation, at the papers' defaults."""

    # v_steps, v_lr and v_weight_decay: None takes the model family's published value (ROME and
    # r-ROME fill it in bind(); see rome.HPARAMS_FILES); MEMIT and AlphaEdit keep GPT-2 XL's.
    v_steps: int | None = 20  # loss evaluations (v_num_grad_steps: a gradient step after each but the last)
    v_lr: float | None = 0.5  # Adam learning rate on δ
    kl_factor: float = 0.0625  # weight of KL(p_δ ‖ p_0) on "{subject} is a"
    v_weight_decay: float | None = 0.5  # weight of the norm term ‖δ‖ / ‖scale vector‖²
    clamp_norm: float = 4.0  # ‖δ‖ ≤ clamp_norm × ‖scale vector‖
    stop_loss: float = 0.05  # early stop once the loss named by stop_on falls below this
    stop_on: str = "total"  # "total": NLL + KL + norm terms (the originals); "nll": the target NLL alone
    v_scale: str = "mlp_output"  # the vector of SCALE_VECTORS scaling the clamp and the norm term
    templates: int = 21  # context templates for k̄ and v* (the first is the bare prompt)
    # Compute dtype of the layers above the edited one during the optimisation: "auto" takes
    # bfloat16 where the device runs it natively and fast (faster on CPUs with AVX512-BF16/AMX, far
    # slower emulated without them; docs/BENCHMARKS.md), else float32 (lifelong.core.machine).
    # The update itself is always solved in float64.
    v_dtype: str = "auto"
    # The layers above the edited one: "fused" runs Llama-family models (Llama, Mistral, Qwen2)
    # through hand-fused layers with the same arithmetic, in less time (docs/BENCHMARKS.md),
    # and other families through their own; "model" always runs the model's own layers.
    v_stack: str = "fused"

    def context_templates(self, editor: str) -> tuple[str, ...]:
        if not 1 <= self.templates <= len(CONTEXT_TEMPLATES):
            raise UserError(f"{editor}: templates must be between 1 and {len(CONTEXT_TEMPLATES)}")
        return CONTEXT_TEMPLATES[: self.templates]

    def settled(self, editor: str) -> tuple[int, float, float]:
        """(v_steps, v_lr, v_weight_decay), refused while one is still None (not bound to a model)."""
        if self.v_steps is None or self.v_lr is None or self.v_weight_decay is None:
            raise UserError(f"{editor}: v_steps, v_lr and v_weight_decay must be set (bind the editor to a model)")
        return self.v_steps, self.v_lr, self.v_weight_decay

    def validate(self, editor: str) -> None:
        """Refuse a bad template count or compute dtype before any work."""
        self.context_templates(editor)
        check_dtype_setting(self.v_dtype, f"{editor}: v_dtype")
        if self.v_stack not in STACK_KINDS:
            raise UserError(f"{editor}: v_stack must be one of {', '.join(STACK_KINDS)}, got '{self.v_stack}'")
        check_value_rules(self.stop_on, self.v_scale, editor)


def check_value_rules(stop_on: str, scale: str, editor: str) -> None:
    """Refuse an unknown stopping rule or scale vector with a one-line message."""
    if stop_on not in STOP_RULES:
        raise UserError(f"{editor}: stop_on must be one of {', '.join(STOP_RULES)}, got '{stop_on}'")
    if scale not in SCALE_VECTORS:
        raise UserError(f"{editor}: v_scale must be one of {', '.join(SCALE_VECTORS)}, got '{scale}'")


@dataclass
class ValueFit:
    value: torch.Tensor  # v* = v_orig + δ (the projection's output that yields the target), float64
    original: torch.Tensor  # v_orig at the bare prompt
    steps: int  # loss evaluations (forward passes); the last one takes no gradient step
    nll: float  # final mean target NLL
    keys: torch.Tensor  # (templates, d_in) float64: the subject's last-token key per context template
    kl: float = float("nan")  # final KL(p_δ ‖ p_0) on "{subject} is a", before kl_factor
    penalty: float = float("nan")  # final weight_decay × ‖δ‖ / ‖scale‖²
    loss: float = float("nan")  # final NLL + kl_factor × KL + penalty
    scale: torch.Tensor | None = None  # the vector scaling the clamp and the norm term, float64
    argmax_hits: int = 0  # evaluations at which the target was the argmax at every answer position (MPES)


class FitLog:
    """The v*/z* fits of an editor's last step, summarised for the step's line in ``steps.jsonl``:
    whether the fits met the stop rule or ran to their step cap shows how an edit came about
    (and, across machines, whether a compute precision changed it)."""

    def __init__(self):
        self.fits: list[tuple[int, float, float]] = []  # (steps, loss, nll): not the fits' tensors

    def clear(self) -> None:
        self.fits = []

    def add(self, fit: ValueFit) -> ValueFit:
        self.fits.append((fit.steps, fit.loss, fit.nll))
        return fit

    def summary(self, params: ValueParams) -> dict[str, float | int]:
        """Counts and means over the step's fits ({} when there were none). ``v_stopped``: fits
        whose loss named by ``stop_on`` fell below ``stop_loss``; the rest ran all ``v_steps``."""
        if not self.fits:
            return {}
        on_total = params.stop_on == "total"
        stopped = sum(1 for _, loss, nll in self.fits if (loss if on_total else nll) < params.stop_loss)

        def mean(values: list[float]) -> float:
            return float(f"{sum(values) / len(values):.4g}")

        return {
            "v_fits": len(self.fits),
            "v_stopped": stopped,
            "v_step_cap": params.settled("fits")[0],
            "v_steps_mean": mean([float(steps) for steps, _, _ in self.fits]),
            "v_loss_mean": mean([loss for _, loss, _ in self.fits]),
            "v_loss_max": float(f"{max(loss for _, loss, _ in self.fits):.4g}"),
            "v_nll_mean": mean([nll for _, _, nll in self.fits]),
        }


def _residual(mod, args, out) -> torch.Tensor:
    """A :func:`~lifelong.editors.hooks.stop_after` pick: the residual stream leaving a layer."""
    return layer_output(out).detach().clone()


class SuffixBatch:
    """Prompts split at the subject's last token, for optimising δ injected there.

    Every position before the subject's last token is unaffected by δ at every layer,
    so that prefix runs once into a KV cache; each optimisation step recomputes only the
    suffix (subject's last token, rest of the prompt, target). Prefixes are right-padded
    and run without a padding mask: real tokens come first and see only real tokens
    (causal), while the padding slots are masked out of the suffix pass.

    With ``prefix_layers`` = L the prefix runs through layers 0..L−1 only: the cache then
    serves suffix passes that stop there too, and ``prefix_residual`` holds the prefix's
    residual stream leaving layer L−1 (for an upper stack that computes the rest itself).
    """

    def __init__(
        self, lm: LoadedModel, sequences: list[tuple[int, ...]], lookup: list[int], prefix_layers: int | None = None
    ):
        self.lm = lm
        self.body = lm.adapter.body()
        device = lm.device
        pad = Codec(lm.tokenizer).pad_id
        self.prefix_len = max(lookup)
        suffix_len = max(len(seq) - start for seq, start in zip(sequences, lookup))
        n = len(sequences)
        prefix = torch.full((n, self.prefix_len), pad, dtype=torch.long)
        suffix = torch.full((n, suffix_len), pad, dtype=torch.long)
        mask = torch.zeros((n, self.prefix_len + suffix_len), dtype=torch.long)
        for r, (seq, start) in enumerate(zip(sequences, lookup)):
            prefix[r, :start] = torch.tensor(seq[:start], dtype=torch.long)
            suffix[r, : len(seq) - start] = torch.tensor(seq[start:], dtype=torch.long)
            mask[r, :start] = 1
            mask[r, self.prefix_len : self.prefix_len + len(seq) - start] = 1
        self.suffix_ids = suffix.to(device)
        self.mask = mask.to(device)
        self.positions = (torch.tensor(lookup)[:, None] + torch.arange(suffix_len)[None]).to(device)
        self.cache, self.prefix_residual = None, None
        if self.prefix_len:
            cache = DynamicCache(config=lm.adapter.config)
            with torch.no_grad():
                if prefix_layers is None:
                    self.body(input_ids=prefix.to(device), cache=cache, use_cache=True)
                else:
                    with stop_after(lm.adapter.layer(prefix_layers - 1), _residual) as seen:
                        self.body(input_ids=prefix.to(device), cache=cache, use_cache=True)
                    self.prefix_residual = seen[0]
            self.cache = cache

    def forward_kwargs(self, cache) -> dict:
        """Keyword arguments of a suffix pass over (a fresh copy of) ``cache``."""
        return suffix_pass_kwargs(self.mask, self.positions, cache)

    def hidden(self) -> torch.Tensor:
        """Final hidden states of the suffix positions through the whole model, (n, suffix_len, d)."""
        return self.body(input_ids=self.suffix_ids, **self.forward_kwargs(self.cache)).last_hidden_state


class TargetNLL(torch.autograd.Function):
    """Per-row −log softmax(logits)[target], with each row's target logit given exactly.

    The logits may be bfloat16 (rounding a logit near 20 there moves the NLL by ~0.05, the
    early-stopping threshold itself), so the target's own logit comes in float32 from its
    embedding row. Fused by hand because each (rows × vocab) temporary is costly on a CPU:
    one float32 copy serves the log-sum-exp and, in place, the softmax of the backward pass.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, exact: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        scores = logits.to(torch.float32, copy=True)
        rows = torch.arange(len(targets), device=logits.device)
        scores[rows, targets] = exact
        lse = torch.logsumexp(scores, -1)
        ctx.save_for_backward(scores, lse, targets)
        ctx.logits_dtype = logits.dtype
        return lse - exact

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scores, lse, targets = ctx.saved_tensors
        probs = scores.sub_(lse[:, None]).exp_()  # softmax, in place of the saved copy (backward runs once)
        rows = torch.arange(len(targets), device=probs.device)
        target_probs = probs[rows, targets]
        probs[rows, targets] = 0  # the target's gradient goes to its exact logit instead
        return probs.mul_(grad[:, None]).to(ctx.logits_dtype), grad * (target_probs - 1), None


def optimize_value(
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
    stack: UpperStack | None = None,
    stop_argmax: int = 0,
    argmax_rule: str = "all",
) -> ValueFit:
    """ROME's v* / MEMIT's z*: Adam on δ at the subject's last token for

        loss = NLL(target | context templates) + kl_factor · KL(p_δ ‖ p_0) + weight_decay · ‖δ‖ / ‖s‖²,

    the KL on "{subject} is a" at the subject's last token (PyTorch's ``kl_div(log p_0, log p_δ,
    log_target=True, reduction="batchmean")``, as the originals write it), with ‖δ‖ clamped to
    ``clamp_norm`` × ‖s‖ after each step. s is ``scale``: ROME's v_orig ("mlp_output") or the
    residual stream leaving the layer ("layer_output", MEMIT's compute_z), both at the bare
    prompt's subject token. As in the originals, at most ``steps`` evaluations with a gradient
    step after each but the last, stopping early once the loss named by ``stop_on`` ("total"
    or "nll") is below ``stop_loss``, or (``stop_argmax`` = k > 0, ENCORE's MPES) at the k-th
    evaluation at which the target is the most probable token at every answer position of every
    context template (``argmax_rule`` "all"; "authors": :func:`mpes_hit`'s count of the authors).

    One pass up to ``layer`` (prefix cached) gives the keys, v_orig and the residual
    stream leaving it; each step then adds δ there and runs only the suffix through the
    layers above (``stack``, float32 unless given), with only δ requiring gradients. The
    KL reference is the first step's distribution (δ = 0), as in ROME."""
    check_value_rules(stop_on, scale, "optimize_value")
    texts = contexts(edit, templates) + [f"{edit.subject} is a"]  # the last one is the KL prompt
    target = Codec(lm.tokenizer).answer_ids(edit.target_new)
    prompts = [tuple(lm.tokenizer(t).input_ids) for t in texts]
    lookup = [subject_token_index(lm.tokenizer, t, edit.subject) for t in texts]
    n = len(texts) - 1
    stack = stack or UpperStack(lm.adapter, layer + 1, cast(torch.dtype, lm.model.dtype))
    # The last target token predicts nothing: leave it out of the sequences. The KL prompt is
    # read at the subject's last token, which nothing after it can affect (causal): it ends there,
    # so its " is a" does not lengthen every row's suffix.
    kl_prompt = prompts[n][: lookup[n] + 1]
    batch = SuffixBatch(
        lm,
        [p + target[:-1] for p in prompts[:n]] + [kl_prompt],
        lookup,
        prefix_layers=None if stack.full_prefix else layer + 1,
    )

    # Answer positions of the rewriting prompts in suffix coordinates, then the KL prompt's
    # subject token: every row that needs logits goes through one unembedding.
    # Under --device auto the stack's hidden states leave on the final norm's GPU and the logits on the
    # output embedding's: each index tensor is made where it is used (one device otherwise).
    unembed = lm.adapter.unembedding()
    out_device = cast(torch.Tensor, lm.adapter.final_norm().weight).device
    head_device = cast(torch.Tensor, unembed.weight).device
    rows = torch.tensor([r for r in range(n) for _ in target] + [n], device=out_device)
    cols = torch.tensor(
        [len(prompts[r]) - 1 - lookup[r] + j for r in range(n) for j in range(len(target))] + [0], device=out_device
    )
    targets = torch.tensor(list(target) * n, device=head_device)
    answers = len(targets)

    def keep_keys(mod, args, out):  # the subject token is the suffix's first position
        return args[0][:n, 0].detach().double(), out[0, 0].detach().clone()

    # One pass up to the layer: the layers above run in the optimisation loop.
    with (
        torch.no_grad(),
        capture(lm.adapter.out_proj(layer), keep_keys) as kept,
        stop_after(lm.adapter.layer(layer), _residual) as residuals,
    ):
        batch.hidden()
    (keys, original), residual = kept[-1], residuals[0]
    anchor = (original if scale == "mlp_output" else residual[0, 0]).detach().clone()  # row 0: the bare prompt
    upper = stack.bind(batch.mask, batch.positions, batch.cache, batch.prefix_residual)

    target_rows = cast(torch.Tensor, unembed.weight).detach()[targets].float()  # for the exact target logits
    target_bias = getattr(unembed, "bias", None)
    target_bias = target_bias.detach()[targets].float() if target_bias is not None else 0
    delta = torch.zeros(original.shape[0], device=residual.device, dtype=residual.dtype, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    limit = clamp_norm * anchor.norm()
    taken, kl_ref, hits = 0, None, 0
    terms = {"nll": float("nan"), "kl": float("nan"), "penalty": float("nan"), "loss": float("nan")}
    # A transient bar under the step's: a one-edit step spends nearly all its time in this loop, and
    # the step bar would not move for the whole fit. Off with the other bars (--quiet, progress=False).
    watched = "loss" if stop_on == "total" else "nll"
    with progress_bar(total=steps, desc="  v* fit", unit="it", leave=False) as fit_bar:
        for taken in range(1, steps + 1):
            shifted = residual.clone()
            shifted[:, 0] = shifted[:, 0] + delta  # every prompt, the KL one included, gets δ at its subject token
            hidden = upper(shifted)[rows, cols].to(head_device)
            logits = stack.logits(hidden)
            exact = (hidden[:answers].float() * target_rows).sum(-1) + target_bias
            nll = TargetNLL.apply(logits[:answers], exact, targets).mean()  # all prompts share the target
            kl_now = logits[answers:].float().log_softmax(-1)  # (1, vocab): one KL prompt, as "batchmean" expects
            if kl_ref is None:  # δ = 0 at the first step: the unedited distribution, through the same stack
                kl_ref = kl_now.detach()
            # kl_div(input, target) = Σ p_target (log p_target − input): KL(p_δ ‖ p_0), the originals' order.
            kl = torch.nn.functional.kl_div(kl_ref, kl_now, log_target=True, reduction="batchmean")
            penalty = weight_decay * delta.norm() / anchor.norm() ** 2
            loss = nll + kl_factor * kl + penalty
            terms = {"nll": nll.item(), "kl": kl.item(), "penalty": penalty.item(), "loss": loss.item()}
            fit_bar.set_postfix_str(f"{watched} {terms[watched]:.3g} (stops below {stop_loss:g})", refresh=False)
            fit_bar.update()  # redraws at most every 0.1 s (tqdm's mininterval)
            if stop_argmax:
                hits += int(mpes_hit(_target_on_top(logits[:answers], exact, targets), len(target), argmax_rule))
            if terms[watched] < stop_loss or taken == steps or (stop_argmax and hits >= stop_argmax):
                break  # the last evaluation takes no step: the terms above are those of the δ returned
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    original = original.double()
    return ValueFit(
        value=original + delta.detach().double(),
        original=original,
        steps=taken,
        keys=keys,
        scale=anchor.double(),
        argmax_hits=hits,
        **terms,
    )


@torch.no_grad()
def _target_on_top(logits: torch.Tensor, exact: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, whether its target (its exact logit) is at least every other token's logit."""
    others = logits.detach().clone()
    others[torch.arange(len(targets), device=others.device), targets] = float("-inf")
    return exact.detach() >= others.amax(-1)


MPES_RULES = ("all", "authors")
MPES_AUTHORS_COUNT = 5  # compute_z.py: `num_correct == 5`


def mpes_hit(on_top: torch.Tensor, answer_tokens: int, rule: str = "all") -> bool:
    """Whether one evaluation counts towards ENCORE's MPES stop. ``on_top``: per answer position of
    every context prompt (the bare prompt's first), whether the target is the argmax there.
    "all": at every position of every prompt. "authors": as the authors' compute_z.py, the count of
    positions on top over the prompts after the first equals 5 (all of them for their five context
    prompts and a one-token answer; for a longer answer a count of exactly 5 of its positions)."""
    if rule == "authors":
        return int(on_top[answer_tokens:].sum().item()) == MPES_AUTHORS_COUNT
    return bool(on_top.all())


class UpperStacks:
    """An editor's upper stacks, one per (model, layer, dtype, kind): a converted copy is built
    once and reused across edits for as long as its weights do not change."""

    def __init__(self):
        self._stacks: dict[tuple, UpperStack] = {}

    def get(self, lm: LoadedModel, layer: int, dtype_name: str, editor: str, kind: str = "fused") -> UpperStack:
        key = (id(lm.model), layer, dtype_name, kind)
        if key not in self._stacks:
            dtype = compute_dtype(dtype_name, editor, lm.device)
            fused = kind == "fused" and fused_supported(lm.adapter)
            self._stacks[key] = (FusedLlamaStack if fused else UpperStack)(lm.adapter, layer + 1, dtype)
        return self._stacks[key]


def fit_value(
    lm: LoadedModel,
    layer: int,
    edit: Edit,
    params: ValueParams,
    editor: str,
    stacks: UpperStacks | None = None,
    templates: Sequence[str] | None = None,
    stop_argmax: int = 0,
    argmax_rule: str = "all",
) -> ValueFit:
    """:func:`optimize_value` with an editor's :class:`ValueParams` (``stacks``: reused upper stacks;
    ``templates``: the context templates, by default the fixed ones of ``params.context_templates``;
    ``stop_argmax``: MPES's count, 0 off; ``argmax_rule``: what counts, see :func:`mpes_hit`)."""
    stack = (stacks or UpperStacks()).get(lm, layer, params.v_dtype, editor, params.v_stack)
    steps, lr, weight_decay = params.settled(editor)
    return optimize_value(
        lm,
        layer,
        edit,
        params.context_templates(editor) if templates is None else templates,
        steps=steps,
        lr=lr,
        kl_factor=params.kl_factor,
        weight_decay=weight_decay,
        clamp_norm=params.clamp_norm,
        stop_loss=params.stop_loss,
        stop_on=params.stop_on,
        scale=params.v_scale,
        stack=stack,
        stop_argmax=stop_argmax,
        argmax_rule=argmax_rule,
    )


def lowrank_change(
    adapter: ArchAdapter, left_out: torch.Tensor, right_in: torch.Tensor, dtype: torch.dtype
) -> ParamChange:
    """ΔW = left_out @ right_in.T in (out, in) orientation, stored as the parameter is."""
    left, right = left_out.to(dtype), right_in.to(dtype)
    if left.dim() == 1:
        left, right = left[:, None], right[:, None]
    if adapter.spec.transposed:  # storage is (in, out): ΔWᵀ = right @ left.T
        left, right = right, left
    return ParamChange(u=left.contiguous(), v=right.contiguous())
