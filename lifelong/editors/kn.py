"""Knowledge Neurons (Dai et al., ACL 2022): locate a fact's MLP neurons by integrated gradients, edit their values.

Attribution. For a prompt x and its true answer y, let a ∈ R^{d_ff} be layer l's MLP
intermediate activations (the inputs of its output projection) at the position that
predicts y. Integrated gradients along the straight path from the zero baseline:

    Attr_i = a_i · ∫₀¹ ∂P(y | x, α·a)/∂a_i dα ≈ a_i · (1/m) Σ_k ∂P(y | x, α_k·a)/∂a_i,  α_k = (k − ½)/m,

with the whole layer's activations at that position scaled together (as the paper's
code does), one layer at a time, and the m steps run as one batch. Completeness:
Σ_i Attr_i ≈ P(y | x, a) − P(y | x, 0). Multi-token answers are attributed token by
token at the position predicting each token (teacher forcing) and averaged.

Selection. Per prompt, neurons with Attr > t · max Attr (over all attributed layers)
are coarse knowledge neurons (t = 0.2). ``prompts=edit`` (default, as EasyEdit's KN runs
it: ``refine: false``, one prompt) keeps the edit prompt's coarse neurons;
``prompts=paraphrases`` (the paper) attributes the edit prompt and its paraphrases and keeps
the neurons shared by more than a fraction p of them.

Edit. Each selected neuron's value vector v_i (its column of the MLP output projection, in
(out, in) orientation) moves from the old answer's input word embedding to the new one's.

* ``rule=toolkit`` (default): EasyEdit's ``KnowledgeNeurons.modify_weights`` (the code the
  KN numbers in the editing literature come from). The old answer is the unedited model's
  greedy continuation of the prompt, as many tokens as the new answer has;
  v_i ← v_i − E(old) + E(new) with E(t) = 2·e(t) for a one-token answer and
  E(t₁…t_n) = Σ_j e(t_j) for a longer one; no activation sign.
* ``rule=paper``: the paper's formula with the recorded true answer,
  v_i ← v_i − λ₁·ē(y) + λ₂·ē(y′) (λ₁ = 1, λ₂ = 8), ē the mean of the answer's token
  embeddings, times the sign of the neuron's activation at the bare prompt (gated MLPs have
  negative activations). On SmolLM2 this moves last-layer neurons that fire on every token
  by 8·e and one edit multiplies the corpus perplexity by ~10¹⁶ (the toolkit rule: ~1.05).

The delta is sparse: only the touched columns are stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from lifelong.core.delta import Delta, ParamChange
from lifelong.core.model_access import Codec
from lifelong.core.models import LoadedModel
from lifelong.editors.base import Editor, Snapshot, each_edit
from lifelong.editors.base import parse_layers as parse_layer_spec
from lifelong.editors.hooks import Hooks
from lifelong.editors.locate import capture_keys
from streams import Edit
from streams.errors import UserError


@dataclass
class KNParams:
    layers: str = "all"  # layers to attribute, e.g. "20-29", "3,5" or "all" (the toolkit's); "": the top third
    ig_steps: int = 20  # Riemann steps m of the integrated gradients (one batch); EasyEdit's gpt2-xl setting
    threshold: float = 0.2  # t: coarse neurons have Attr > t · max Attr of their prompt (EasyEdit adaptive_threshold)
    prompts: str = "edit"  # "edit": the edit prompt's coarse neurons (toolkit); "paraphrases": shared ones (paper)
    share: float = 0.7  # p (prompts=paraphrases): keep neurons found in more than this fraction of the prompts
    rule: str = "toolkit"  # value update: "toolkit" (EasyEdit, ±2·e) or "paper" (−1·ē(y) + 8·ē(y′), signed)
    erase: float | None = None  # weight of the old answer's embedding; None: the rule's (toolkit 2, paper 1)
    amplify: float | None = None  # weight of the new answer's embedding; None: the rule's (toolkit 2, paper 8)
    max_neurons: int = 0  # keep at most this many (highest mean attribution); 0: no cap

    RULE_SCALES: ClassVar[dict[str, tuple[float, float]]] = {"toolkit": (2.0, 2.0), "paper": (1.0, 8.0)}

    def validate(self, editor: str) -> None:
        if self.ig_steps < 1:
            raise UserError(f"{editor}: ig_steps must be at least 1 (got {self.ig_steps})")
        if self.rule not in self.RULE_SCALES:
            raise UserError(f"{editor}: rule must be 'toolkit' or 'paper' (got {self.rule!r})")
        if self.prompts not in ("edit", "paraphrases"):
            raise UserError(f"{editor}: prompts must be 'edit' or 'paraphrases' (got {self.prompts!r})")

    def scales(self) -> tuple[float, float]:
        """(erase, amplify): the given weights, else the rule's."""
        erase, amplify = self.RULE_SCALES[self.rule]
        return (erase if self.erase is None else self.erase, amplify if self.amplify is None else self.amplify)


@dataclass
class LayerAttribution:
    """IG over one layer's intermediate neurons for one (prompt, answer)."""

    scores: torch.Tensor  # (answer tokens, d_ff) attribution of each neuron for each answer token
    prob_input: torch.Tensor  # (answer tokens,) P(y_t) with the activations as they are
    prob_baseline: torch.Tensor  # (answer tokens,) P(y_t) with the layer's activations at that position zeroed


def default_layers(num_layers: int) -> list[int]:
    """The top third of the layers (20-29 of SmolLM2's 30). The paper finds knowledge neurons mostly in
    the topmost layers; attributing all 30 layers of SmolLM2 for one built-in fact put 7 of its 8
    neurons in layers 21-29, at several times the cost (a layer's IG pass runs every layer above it
    on a batch of 20 rows per answer token)."""
    return list(range(num_layers - max(1, num_layers // 3), num_layers))


def parse_layers(spec: str | None, num_layers: int, editor: str = "kn") -> list[int]:
    """KN's layers: :func:`lifelong.editors.base.parse_layers` with :func:`default_layers`."""
    return parse_layer_spec(spec, num_layers, editor, default_layers)


def layer_attribution(
    lm: LoadedModel, layer: int, prompt: Sequence[int], answer: Sequence[int], steps: int
) -> LayerAttribution:
    """Integrated gradients of P(answer token | prefix) w.r.t. layer ``layer``'s intermediate neurons.

    All (answer token, step) pairs run as one batch of rows that differ only from layer
    ``layer`` on: the prompt's prefix runs once into a KV cache, the rest (last prompt token
    and answer) runs as one row through the layers below and is copied into the batch at
    that layer's input (the cache of the layers from there on is copied alike)."""
    if steps < 1:
        raise ValueError(f"integrated gradients need at least 1 step (got {steps})")
    prompt, answer = list(prompt), list(answer)
    n_tok = len(answer)
    device = lm.device
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    # Rows: (token t, step k) for the IG steps, then one α = 1 and one α = 0 row per token.
    row_token = torch.cat([torch.arange(n_tok).repeat_interleave(steps), torch.arange(n_tok), torch.arange(n_tok)])
    row_alpha = torch.cat(
        [alphas.repeat(n_tok), torch.ones(n_tok, device=alphas.device), torch.zeros(n_tok, device=alphas.device)]
    )
    n_rows = len(row_token)
    row_token, row_alpha = row_token.to(device), row_alpha.to(device)
    rows = torch.arange(n_rows, device=device)
    body = lm.adapter.body()
    cache = None
    if len(prompt) > 1:  # nothing before the last prompt token is affected: compute it once
        with torch.no_grad():
            cache = body(input_ids=torch.tensor([prompt[:-1]], device=device), use_cache=True).cache
        for cached in cache.layers[layer:]:
            cached.keys = cached.keys.expand(n_rows, *cached.keys.shape[1:]).contiguous()
            cached.values = cached.values.expand(n_rows, *cached.values.shape[1:]).contiguous()
    suffix = torch.tensor([prompt[-1:] + answer[:-1]], device=device)  # position t predicts answer[t]
    state: dict[str, torch.Tensor] = {}

    def widen(mod, args, kwargs):
        return (args[0].expand(n_rows, *args[0].shape[1:]),) + tuple(args[1:]), kwargs

    def scale(mod, args):
        x = args[0]
        state["base"] = x[0, :n_tok].detach().clone()  # every row holds the unscaled activations
        state["scaled"] = (row_alpha[:, None] * state["base"][row_token]).requires_grad_(True)
        x = x.clone()
        x[rows, row_token] = state["scaled"]
        return (x,) + tuple(args[1:])

    unembed = lm.adapter.unembedding()
    targets = torch.tensor(answer, device=device)[row_token]
    with Hooks() as hooks, torch.enable_grad():
        hooks.on_input(lm.adapter.layer(layer), widen, with_kwargs=True).on_input(lm.adapter.out_proj(layer), scale)
        hidden = body(input_ids=suffix, cache=cache, use_cache=cache is not None).last_hidden_state
        probs = unembed(hidden[rows, row_token]).float().softmax(-1).gather(1, targets[:, None])[:, 0]
        (grad,) = torch.autograd.grad(probs[: n_tok * steps].sum(), state["scaled"])
    base = state["base"].float()
    mean_grad = grad[: n_tok * steps].float().view(n_tok, steps, -1).mean(1)
    return LayerAttribution(
        scores=base * mean_grad,
        prob_input=probs[n_tok * steps : n_tok * (steps + 1)].detach(),
        prob_baseline=probs[n_tok * (steps + 1) :].detach(),
    )


def attribution(
    lm: LoadedModel, layers: Sequence[int], prompt: Sequence[int], answer: Sequence[int], steps: int
) -> torch.Tensor:
    """(len(layers), d_ff) attribution of every neuron, averaged over the answer's tokens."""
    return torch.stack([layer_attribution(lm, layer, prompt, answer, steps).scores.mean(0) for layer in layers])


def select_neurons(scores: Sequence[torch.Tensor], threshold: float, share: float) -> torch.Tensor:
    """Boolean mask (layers, d_ff): coarse neurons (Attr > t·max per prompt) shared by > p of the prompts."""
    # A prompt whose best attribution is not positive has no knowledge neurons.
    coarse = torch.stack([(s > threshold * s.max()) & (s.max() > 0) for s in scores]).float()
    return coarse.mean(0) > share


class KNEditor(Editor[KNParams]):
    name = "kn"
    description = (
        "Knowledge Neurons: integrated-gradients neuron attribution, value vectors moved from the old "
        "prediction's embedding to the new answer's (EasyEdit's ±2·e rule; rule=paper: −1·e + 8·e)"
    )
    Params = KNParams

    def bind(self, lm: LoadedModel) -> KNEditor:
        # the resolved layers go to the manifest ("all" or "" name different layers on different models)
        layers = parse_layers(self.params.layers, lm.num_layers, self.name)
        erase, amplify = self.params.scales()
        self.params = dataclasses.replace(self.params, layers=",".join(map(str, layers)), erase=erase, amplify=amplify)
        return self

    def layers(self, lm: LoadedModel) -> list[int]:
        return parse_layers(self.params.layers, lm.num_layers, self.name)

    def scope(self, lm: LoadedModel) -> list[str]:
        return [lm.adapter.out_proj_param_name(layer) for layer in self.layers(lm)]

    def _old_answer(self, lm: LoadedModel, codec: Codec, edit: Edit) -> tuple[int, ...]:
        if edit.target_true is not None:
            return codec.answer_ids(edit.target_true)
        # No recorded old answer: take the token the model predicts now.
        with torch.no_grad():
            ids = torch.tensor([codec.prompt_ids(edit.rendered_prompt)], device=lm.device)
            hidden = lm.adapter.body()(input_ids=ids, use_cache=False).last_hidden_state[0, -1]
            return (int(lm.adapter.unembedding()(hidden).argmax()),)

    def neurons(self, lm: LoadedModel, edit: Edit) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(layers, mask of selected neurons (layers, d_ff), mean attribution) for one edit."""
        p = self.params
        layers = self.layers(lm)
        codec = Codec(lm.tokenizer)
        old = self._old_answer(lm, codec, edit)
        prompts = [edit.rendered_prompt] + (list(edit.paraphrases) if p.prompts == "paraphrases" else [])
        scores = [attribution(lm, layers, codec.prompt_ids(text), old, p.ig_steps) for text in prompts]
        mask = select_neurons(scores, p.threshold, p.share)
        mean = torch.stack(scores).mean(0)
        if p.max_neurons and int(mask.sum()) > p.max_neurons:
            keep = torch.where(mask, mean, torch.full_like(mean, -torch.inf)).flatten().topk(p.max_neurons).indices
            mask = torch.zeros_like(mask).flatten().index_fill_(0, keep, True).view_as(mask)
        return layers, mask, mean

    @torch.no_grad()
    def _signs(self, lm: LoadedModel, layers: list[int], edit: Edit) -> dict[int, torch.Tensor]:
        """Sign of every neuron's activation at the bare prompt's answer-predicting position, per layer."""
        ids = torch.tensor([Codec(lm.tokenizer).prompt_ids(edit.rendered_prompt)], device=lm.device)
        signs = {}
        for layer in layers:
            with capture_keys(lm.adapter, layer) as seen:
                lm.adapter.body()(input_ids=ids, use_cache=False)
            signs[layer] = torch.sign(seen[0][0, -1])
        return signs

    def _embedding(self, lm: LoadedModel, ids: Sequence[int]) -> torch.Tensor:
        # a transformers model's method; nn.Module types attribute access as Tensor | Module
        table: torch.Tensor = lm.model.get_input_embeddings().weight  # type: ignore[operator]
        return table[torch.tensor(list(ids), device=table.device)].mean(0).detach()

    def _toolkit_embedding(self, lm: LoadedModel, ids: Sequence[int], weight: float) -> torch.Tensor:
        """E(answer) of the toolkit rule: weight·e(t) for one token, Σ_j e(t_j) (each once) for more."""
        # a transformers model's method; nn.Module types attribute access as Tensor | Module
        table: torch.Tensor = lm.model.get_input_embeddings().weight  # type: ignore[operator]
        rows = table[torch.tensor(list(ids), device=table.device)].detach()
        return weight * rows[0] if len(ids) == 1 else rows.sum(0)

    @torch.no_grad()
    def greedy_answer(self, lm: LoadedModel, prompt_ids: Sequence[int], n: int) -> tuple[int, ...]:
        """The model's greedy continuation of ``prompt_ids``, ``n`` tokens (the toolkit's 'original prediction')."""
        ids, out = list(prompt_ids), []
        body, unembed = lm.adapter.body(), lm.adapter.unembedding()
        for _ in range(n):
            hidden = body(input_ids=torch.tensor([ids], device=lm.device), use_cache=False).last_hidden_state
            out.append(int(unembed(hidden[0, -1]).argmax()))
            ids.append(out[-1])
        return tuple(out)

    def value_change(self, lm: LoadedModel, edit: Edit) -> tuple[torch.Tensor, bool]:
        """(the vector added to each selected value vector, whether it is multiplied by the activation sign)."""
        p = self.params
        erase, amplify = p.scales()
        codec = Codec(lm.tokenizer)
        prompt, new = codec.encode(edit.rendered_prompt, edit.target_new)
        if p.rule == "toolkit":
            old = self.greedy_answer(lm, prompt, len(new))
            return self._toolkit_embedding(lm, new, amplify) - self._toolkit_embedding(lm, old, erase), False
        change = amplify * self._embedding(lm, new) - erase * self._embedding(lm, self._old_answer(lm, codec, edit))
        return change, True

    def apply(self, lm: LoadedModel, batch: Sequence[Edit]) -> Delta:
        if not batch:
            return Delta.empty()
        names = {layer: lm.adapter.out_proj_param_name(layer) for layer in self.layers(lm)}
        snapshot = Snapshot(lm.model, list(names.values()))
        touched: dict[int, set[int]] = {}
        for edit in each_edit(batch, "neurons located and moved"):  # each sees the previous one's change
            layers, mask, _ = self.neurons(lm, edit)
            change, signed = self.value_change(lm, edit)  # from the model as it is before this fact's edit
            signs = self._signs(lm, [layers[i] for i in mask.any(1).nonzero()[:, 0].tolist()], edit) if signed else {}
            with torch.no_grad():
                for row, layer in enumerate(layers):
                    index = mask[row].nonzero()[:, 0]
                    if not len(index):
                        continue
                    weight = lm.adapter.out_proj_weight_view(layer)  # (out, in): neuron i's value is column i
                    column = change.to(weight.dtype)[:, None].expand(-1, len(index))
                    if signed:
                        column = column * signs[layer][index].to(weight.dtype)[None, :]
                    weight[:, index] += column
                    touched.setdefault(layer, set()).update(index.tolist())
        # The step as one sparse delta from the weights before it (only the touched columns).
        changes = {}
        with torch.no_grad():
            for layer, cols in sorted(touched.items()):
                param = lm.model.get_parameter(names[layer])
                dim = 0 if lm.adapter.spec.transposed else 1  # neuron columns of (out, in) are rows of (in, out)
                index = torch.tensor(sorted(cols), device=param.device)
                values = param.index_select(dim, index) - snapshot[names[layer]].index_select(dim, index)
                changes[names[layer]] = ParamChange(index=index, values=values, dim=dim, shape=tuple(param.shape))
        return snapshot.restore_and_apply(changes)
