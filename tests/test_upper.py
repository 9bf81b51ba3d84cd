"""The upper stack: running layers l+1.. from the residual stream equals the full model with
δ added to layer l's MLP output (the premise of the fast v*/z* optimisation)."""

import pytest
import torch

from lifelong.editors.locate import (
    CONTEXT_TEMPLATES,
    SuffixBatch,
    TargetNLL,
    contexts,
    optimize_value,
    subject_token_index,
)
from lifelong.editors.upper import UpperStack, compute_dtype, layer_output
from lifelong.editors.upper_llama import FusedLlamaStack, fused_supported
from tests.conftest import make_edits


def suffix_batch(lm, edit):
    texts = contexts(edit, CONTEXT_TEMPLATES[:3])
    prompts = [tuple(lm.tokenizer(t).input_ids) for t in texts]
    lookup = [subject_token_index(lm.tokenizer, t, edit.subject) for t in texts]
    return SuffixBatch(lm, prompts, lookup)


@pytest.mark.parametrize("layer", [0, 1])
def test_upper_stack_equals_full_model_with_injected_delta(tiny, layer):
    edit = make_edits(1)[0]
    batch = suffix_batch(tiny, edit)
    delta = torch.randn(tiny.adapter.out_proj_weight_view(layer).shape[0]) * 3

    def inject(mod, args, out):
        out = out.clone()
        out[:, 0] += delta
        return out

    seen = {}
    handle = tiny.adapter.layer(layer).register_forward_hook(lambda m, a, o: seen.update(h=layer_output(o)))
    with torch.no_grad():
        batch.hidden()
    handle.remove()
    handle = tiny.adapter.out_proj(layer).register_forward_hook(inject)
    with torch.no_grad():
        full = batch.hidden()
    handle.remove()

    residual = seen["h"].clone()
    residual[:, 0] += delta
    stack = UpperStack(tiny.adapter, layer + 1, torch.float32)
    with torch.no_grad():
        fast = stack(residual, **batch.forward_kwargs(batch.cache))
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    # The body is left as it was: all layers back in place.
    assert len(tiny.adapter.body().get_submodule(stack.layers_path)) == tiny.num_layers

    low = UpperStack(tiny.adapter, layer + 1, torch.bfloat16)
    with torch.no_grad():
        approx = low(residual, **batch.forward_kwargs(low.cast_cache(batch.cache)))
    assert approx.dtype == full.dtype
    assert (approx - full).abs().max() < 0.1 * full.abs().max()


def test_bfloat16_copy_is_rebuilt_when_an_upper_weight_changes(tiny):
    stack = UpperStack(tiny.adapter, 1, torch.bfloat16)
    first = stack._converted()
    assert stack._converted() is first  # unchanged weights: reused
    with torch.no_grad():
        tiny.adapter.out_proj_weight_view(tiny.num_layers - 1).add_(1.0)
    assert stack._converted() is not first
    with torch.no_grad():
        tiny.adapter.out_proj_weight_view(0).add_(1.0)  # below the stack: no rebuild needed
    second = stack._converted()
    assert stack._converted() is second


def test_value_fit_agrees_across_compute_dtypes(tiny):
    edit = make_edits(1)[0]
    fits = {
        name: optimize_value(
            tiny,
            1,
            edit,
            CONTEXT_TEMPLATES[:3],
            steps=5,
            stop_loss=0.0,
            stack=UpperStack(tiny.adapter, 2, compute_dtype(name, "test")),
        )
        for name in ("float32", "bfloat16", "auto")
    }
    a = fits["float32"]
    for name in ("bfloat16", "auto"):  # auto is one of the two, whichever this machine runs fast
        b = fits[name]
        torch.testing.assert_close(a.keys, b.keys)  # keys and v_orig come from the full-precision pass
        torch.testing.assert_close(a.original, b.original)
        step_a, step_b = a.value - a.original, b.value - b.original
        assert torch.nn.functional.cosine_similarity(step_a, step_b, dim=0) > 0.95


def test_unknown_compute_dtype_is_refused():
    with pytest.raises(ValueError, match="v_dtype must be one of"):
        compute_dtype("int8", "rome")


def test_target_nll_matches_log_softmax_and_its_gradients():
    torch.manual_seed(0)
    logits = (torch.randn(4, 50) * 5).requires_grad_()
    exact = (torch.randn(4) * 5).requires_grad_()
    targets = torch.tensor([3, 0, 49, 3])
    weights = torch.tensor([1.0, 2.0, 0.5, -1.0])
    (TargetNLL.apply(logits, exact, targets) * weights).sum().backward()
    fused = (logits.grad.clone(), exact.grad.clone())
    value = TargetNLL.apply(logits, exact, targets)

    logits.grad, exact.grad = None, None
    onehot = torch.nn.functional.one_hot(targets, 50).bool()
    patched = torch.where(onehot, exact[:, None], logits)  # the target's logit replaced by the exact one
    plain = -patched.log_softmax(-1)[torch.arange(4), targets]
    (plain * weights).sum().backward()
    torch.testing.assert_close(value, plain.detach())
    torch.testing.assert_close(fused[0], logits.grad)
    torch.testing.assert_close(fused[1], exact.grad)
    assert fused[0][onehot].abs().max() == 0  # the bfloat16 logit of the target gets no gradient


def test_upper_stack_logits_follow_the_head(tiny):
    stack = UpperStack(tiny.adapter, 1, torch.bfloat16)
    hidden = torch.randn(3, tiny.model.config.hidden_size)
    head = tiny.model.get_output_embeddings()
    with torch.no_grad():
        torch.testing.assert_close(stack.logits(hidden).float(), head(hidden), atol=0.05, rtol=0.02)
        head.weight.mul_(2.0)  # a changed head weight rebuilds the converted copy
        torch.testing.assert_close(stack.logits(hidden).float(), head(hidden), atol=0.1, rtol=0.02)


# ---------------------------------------------------------------- the fused Llama-family stack


def llama_family_model(family: str):
    """A tiny random Llama or Qwen2 (q/k/v biases) with non-trivial norm weights, so that the
    fused stack's folding of norm weights and biases is exercised."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from lifelong.core.arch import ArchAdapter
    from lifelong.core.models import LoadedModel, byte_tokenizer

    tokenizer = byte_tokenizer()
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.15)
                elif "norm" in name:
                    p.uniform_(0.5, 1.5)
                else:  # biases
                    p.normal_(0.0, 0.1)
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    return LoadedModel(f"tiny-{family}-fused", model, tokenizer, ArchAdapter(model), torch.device("cpu"))


def stack_output_and_grad(run, residual, delta):
    """The stack's output on ``residual`` with δ at each row's first position, and d(loss)/dδ."""
    delta = delta.clone().requires_grad_()
    shifted = residual.clone()
    shifted[:, 0] = shifted[:, 0] + delta
    out = run(shifted)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()  # a loss with a well-conditioned gradient (Σ out² is ~constant after the norm)
    return out.detach(), delta.grad


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_stack_computes_what_the_model_layers_compute(family):
    lm = llama_family_model(family)
    assert fused_supported(lm.adapter)
    edit, layer = make_edits(1)[0], 1
    texts = contexts(edit, CONTEXT_TEMPLATES[:4]) + [f"{edit.subject} is a"]
    prompts = [tuple(lm.tokenizer(t).input_ids) for t in texts]
    lookup = [subject_token_index(lm.tokenizer, t, edit.subject) for t in texts]
    full = SuffixBatch(lm, prompts, lookup)
    short = SuffixBatch(lm, prompts, lookup, prefix_layers=layer + 1)  # the prefix stops at the edited layer
    assert short.prefix_residual is not None and short.prefix_residual.shape[:2] == (len(texts), short.prefix_len)
    seen = {}
    handle = lm.adapter.layer(layer).register_forward_hook(lambda m, a, o: seen.update(h=layer_output(o)))
    with torch.no_grad():
        full.hidden()
    handle.remove()
    residual, delta = seen["h"], torch.randn(residual_width := seen["h"].shape[-1]) * 2
    assert residual_width == lm.model.config.hidden_size

    reference = UpperStack(lm.adapter, layer + 1, torch.float32).bind(full.mask, full.positions, full.cache)
    want, want_grad = stack_output_and_grad(reference, residual, delta)
    fused = FusedLlamaStack(lm.adapter, layer + 1, torch.float32)
    for run in (
        fused.bind(full.mask, full.positions, full.cache),
        fused.bind(short.mask, short.positions, short.cache, short.prefix_residual),
    ):
        got, got_grad = stack_output_and_grad(run, residual, delta)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got_grad, want_grad, atol=2e-5, rtol=1e-4)

    low = FusedLlamaStack(lm.adapter, layer + 1, torch.bfloat16)
    got, got_grad = stack_output_and_grad(
        low.bind(short.mask, short.positions, short.cache, short.prefix_residual), residual, delta
    )
    assert (got - want).norm() < 0.02 * want.norm()
    assert torch.nn.functional.cosine_similarity(got_grad, want_grad, dim=0) > 0.999
    with pytest.raises(ValueError, match="KV cache at every layer"):  # the model's layers need the full cache
        UpperStack(lm.adapter, layer + 1, torch.float32).bind(
            short.mask, short.positions, short.cache, short.prefix_residual
        )


def test_value_fit_is_the_same_through_the_fused_stack():
    lm = llama_family_model("llama")
    edit = make_edits(1)[0]
    fits = [
        optimize_value(
            lm, 1, edit, CONTEXT_TEMPLATES[:3], steps=6, stop_loss=0.0, stack=kind(lm.adapter, 2, torch.float32)
        )
        for kind in (UpperStack, FusedLlamaStack)
    ]
    assert fits[0].steps == fits[1].steps == 6
    torch.testing.assert_close(fits[1].value, fits[0].value, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fits[1].keys, fits[0].keys)


def test_fused_stack_follows_weight_changes_above_the_edited_layer():
    lm = llama_family_model("llama")
    batch = suffix_batch(lm, make_edits(1)[0])
    stack = FusedLlamaStack(lm.adapter, 1, torch.float32)
    residual = torch.randn(batch.suffix_ids.shape + (64,))
    before = stack.bind(batch.mask, batch.positions, batch.cache)(residual)
    with torch.no_grad():
        lm.adapter.out_proj_weight_view(2).mul_(3.0)  # an upper layer's MLP output projection
    after = stack.bind(batch.mask, batch.positions, batch.cache)(residual)
    reference = UpperStack(lm.adapter, 1, torch.float32).bind(batch.mask, batch.positions, batch.cache)(residual)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference, atol=2e-5, rtol=1e-4)


def test_stack_kind_follows_the_family_and_the_setting(tiny):
    from lifelong.editors.locate import UpperStacks, ValueParams

    stacks = UpperStacks()
    fused = stacks.get(tiny, 1, "bfloat16", "rome", "fused")
    assert isinstance(fused, FusedLlamaStack) == (tiny.adapter.family == "llama")
    assert type(stacks.get(tiny, 1, "bfloat16", "rome", "model")) is UpperStack
    with pytest.raises(ValueError, match="v_stack must be one of"):
        ValueParams(v_stack="compiled").validate("rome")


# ---------------------------------------------------------------- the v*/z* objective, against its formula


def fit_float32(lm, edit, layer=1, **kwargs):
    stack = UpperStack(lm.adapter, layer + 1, torch.float32)
    return optimize_value(lm, layer, edit, CONTEXT_TEMPLATES[:3], stack=stack, **kwargs)


def logprobs_with_delta(lm, layer, text, index, delta):
    """log p(· | text) at token ``index`` through the whole model, δ added to layer ``layer``'s output there."""

    def add(mod, args, out):
        hidden = layer_output(out).clone()
        hidden[:, index] += delta.to(hidden.dtype)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    ids = torch.tensor([lm.tokenizer(text).input_ids])
    handle = lm.adapter.layer(layer).register_forward_hook(add)
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0, index]
    finally:
        handle.remove()
    return logits.double().log_softmax(-1)


def test_kl_term_is_kl_of_edited_from_unedited_distribution(tiny):
    """The originals' kl_div(log p_0, log p_δ, log_target=True, reduction="batchmean") is
    KL(p_δ ‖ p_0) = Σ p_δ (log p_δ − log p_0) over one prompt: checked by hand through the model."""
    edit = make_edits(1)[0]
    fit = fit_float32(tiny, edit, steps=6, stop_loss=0.0)
    delta = fit.value - fit.original
    text = f"{edit.subject} is a"
    index = subject_token_index(tiny.tokenizer, text, edit.subject)
    now = logprobs_with_delta(tiny, 1, text, index, delta)
    ref = logprobs_with_delta(tiny, 1, text, index, torch.zeros_like(delta))
    by_hand = (now.exp() * (now - ref)).sum().item()
    reverse = (ref.exp() * (ref - now)).sum().item()
    assert by_hand > 1e-3 and abs(by_hand - reverse) > 5e-3 * by_hand  # the two directions differ here
    assert abs(fit.kl - by_hand) < 0.1 * abs(by_hand - reverse), (fit.kl, by_hand, reverse)
    assert fit.loss == pytest.approx(fit.nll + 0.0625 * fit.kl + fit.penalty, rel=1e-6)


def test_early_stop_is_on_the_total_loss_by_default(tiny):
    """Stop once NLL + KL + norm term < stop_loss (the originals); stop_on=nll stops on the NLL alone.
    The last evaluation takes no gradient step, so `steps` evaluations return their own terms."""
    edit = make_edits(1)[0]
    reference = fit_float32(tiny, edit, steps=6, stop_loss=0.0)
    assert reference.steps == 6 and reference.loss > reference.nll
    threshold = reference.nll + 0.5 * (reference.loss - reference.nll)  # between the two at evaluation 6
    on_nll = fit_float32(tiny, edit, steps=7, stop_loss=threshold, stop_on="nll")
    on_total = fit_float32(tiny, edit, steps=7, stop_loss=threshold)
    assert on_nll.steps <= 6 and on_nll.nll < threshold
    assert on_total.steps == 7 or on_total.loss < threshold
    assert on_total.steps > on_nll.steps
    once = fit_float32(tiny, edit, steps=1, stop_loss=0.0)  # one evaluation, no step: δ = 0
    assert torch.equal(once.value, once.original) and once.kl == 0 and once.penalty == 0


def test_unknown_value_rules_are_refused(tiny):
    from lifelong.editors import make_editor

    with pytest.raises(ValueError, match="stop_on must be one of total, nll"):
        make_editor("rome", {"stop_on": "loss"}).bind(tiny)
    with pytest.raises(ValueError, match="v_scale must be one of mlp_output, layer_output"):
        make_editor("memit", {"v_scale": "residual"}).bind(tiny)
    with pytest.raises(ValueError, match="stop_on must be one of"):
        optimize_value(tiny, 1, make_edits(1)[0], CONTEXT_TEMPLATES[:1], stop_on="kl")


@pytest.mark.parametrize("scale, stop_on", [("mlp_output", "total"), ("layer_output", "nll")])
def test_optimize_value_equals_its_plain_reference(tiny, scale, stop_on):
    """The fast v*/z* fit (cached prefix, suffix-only steps, upper stack) computes what the paper's procedure,
    written plainly in lifelong.editors.value_reference, computes: the same δ after the same steps."""
    from lifelong.editors.value_reference import optimize_value_reference

    edit = make_edits(1)[0]
    settings = dict(steps=6, stop_loss=1e-4, scale=scale, stop_on=stop_on, kl_factor=0.5, weight_decay=0.5)
    fast = fit_float32(tiny, edit, **settings)
    plain = optimize_value_reference(tiny, 1, edit, CONTEXT_TEMPLATES[:3], **settings)
    assert fast.steps == plain.steps
    # float32 rounding differs between a cached prefix and a whole forward: a few 1e-6
    torch.testing.assert_close(fast.original, plain.original, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.keys[0], plain.keys[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.value, plain.value, rtol=1e-3, atol=1e-4)
    assert fast.nll == pytest.approx(plain.nll, rel=1e-4) and fast.kl == pytest.approx(plain.kl, rel=1e-3, abs=1e-7)
    assert (fast.value - fast.original).norm() > 0  # δ moved: the comparison is not of two zeros


@pytest.mark.parametrize("tiny", ["tiny-llama"], indirect=True)
def test_value_fit_moves_a_transient_bar_once_per_evaluation(tiny, monkeypatch, capsys):
    """A one-edit step spends its time in the v*/z* fit: its own bar advances at each evaluation,
    shows the watched loss, leaves nothing behind, and is off when bars are (--quiet)."""
    from lifelong.editors import locate

    made, real = [], locate.progress_bar

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(locate, "progress_bar", recording)
    edit = make_edits(1)[0]
    fit = optimize_value(tiny, 1, edit, CONTEXT_TEMPLATES[:2], steps=4, stop_loss=-1.0)  # never stops early
    assert fit.steps == 4 and len(made) == 1
    assert (made[0].n, made[0].total, made[0].leave) == (4, 4, False)
    assert made[0].postfix.startswith("loss ") and "stops below -1" in made[0].postfix
    assert "v* fit" in capsys.readouterr().err
    early = optimize_value(tiny, 1, edit, CONTEXT_TEMPLATES[:2], steps=4, stop_loss=1e9, stop_on="nll")
    assert early.steps == 1 and made[1].n == 1 and made[1].postfix.startswith("nll ")
    capsys.readouterr()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    optimize_value(tiny, 1, edit, CONTEXT_TEMPLATES[:2], steps=2, stop_loss=-1.0)
    assert made[2].disable and "v* fit" not in capsys.readouterr().err
