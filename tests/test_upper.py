"""The upper stack: running layers l+1.. from the residual stream equals the full model with
δ added to layer l's MLP output (the premise of the fast v*/z* optimisation)."""

import pytest
import torch

from lifelong.editors.locate import (CONTEXT_TEMPLATES, SuffixBatch, TargetNLL, contexts, optimize_value,
                                     subject_token_index)
from lifelong.editors.upper import UpperStack, compute_dtype, layer_output
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
    fits = {name: optimize_value(tiny, 1, edit, CONTEXT_TEMPLATES[:3], steps=5, stop_nll=0.0,
                                 stack=UpperStack(tiny.adapter, 2, compute_dtype(name, "test")))
            for name in ("float32", "bfloat16")}
    a, b = fits["float32"], fits["bfloat16"]
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
