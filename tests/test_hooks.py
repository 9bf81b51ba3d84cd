"""lifelong.editors.hooks on a three-layer toy: handles always removed, stops really stop, captures are exact."""

import pytest
import torch
from torch import nn

from lifelong.editors.base import Snapshot
from lifelong.editors.hooks import Hooks, StopForward, capture, output, stop_after, stop_before


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.ran: list[int] = []

    def forward(self, x, scale=1.0):
        for i, layer in enumerate(self.layers):
            self.ran.append(i)
            x = layer(x) * scale
        return x


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def toy():
    return Toy()


def test_handles_removed_after_the_block_even_on_error(toy):
    with pytest.raises(RuntimeError, match="boom"), Hooks() as hooks:
        hooks.on_output(toy.layers[0], lambda m, a, o: None).on_input(toy.layers[1], lambda m, a: None)
        assert hook_count(toy) == len(hooks) == 2
        raise RuntimeError("boom")
    assert hook_count(toy) == 0
    for helper in (capture(toy.layers[0]), stop_after(toy.layers[1]), stop_before(toy.layers[2])):
        with pytest.raises(RuntimeError, match="boom"), helper:
            assert hook_count(toy) == 1
            raise RuntimeError("boom")
        assert hook_count(toy) == 0


def test_kept_hooks_stay_until_removed(toy):
    x = torch.randn(2, 4)
    plain = toy(x)
    hooks = Hooks().add_to_output(toy.layers[2], lambda m, a, o: torch.ones_like(o))
    assert torch.equal(toy(x), plain + 1) and torch.equal(toy(x), plain + 1)
    hooks.remove()
    hooks.remove()  # twice is harmless
    assert hook_count(toy) == 0 and torch.equal(toy(x), plain)


def test_captures_are_the_module_inputs_and_outputs(toy):
    x = torch.randn(2, 4)
    h0 = toy.layers[0](x)
    h1 = toy.layers[1](h0)
    with capture(toy.layers[1]) as inputs, capture(toy.layers[1], output) as outputs:
        toy(x)
        toy(x)
    assert len(inputs) == len(outputs) == 2
    assert torch.equal(inputs[0], h0) and torch.equal(outputs[1], h1)
    assert not inputs[0].requires_grad  # detached


def test_stop_after_really_stops(toy):
    x = torch.randn(2, 4)
    toy.ran.clear()
    with stop_after(toy.layers[1], lambda m, a, o: o.detach().clone()) as seen:
        toy(x)
        pytest.fail("the forward should not return")
    assert toy.ran == [0, 1]  # layer 2 never ran
    assert torch.equal(seen[0], toy.layers[1](toy.layers[0](x)))


def test_stop_before_keeps_args_and_kwargs(toy):
    x = torch.randn(2, 4)
    toy.ran.clear()
    with stop_before(toy.layers[1]) as seen:
        toy(x)
    assert toy.ran == [0, 1]  # stopped on calling layer 1, before it ran (its input is below)
    (args, kwargs) = seen[0]
    assert torch.equal(args[0], toy.layers[0](x)) and kwargs == {}


def test_a_foreign_stop_is_not_swallowed(toy):
    def stray(m, a, o):
        raise StopForward()

    with pytest.raises(StopForward), Hooks().on_output(toy.layers[0], stray), stop_after(toy.layers[2]):
        toy(torch.randn(1, 4))
    assert hook_count(toy) == 0


def test_add_to_output_adds_exactly(toy):
    x = torch.randn(2, 4)
    added = torch.randn(2, 4)
    with capture(toy.layers[0], output) as plain:
        toy(x)
    with Hooks().add_to_output(toy.layers[0], lambda m, a, o: added), capture(toy.layers[0], output) as shifted:
        toy(x)
    assert torch.equal(shifted[0], plain[0] + added)


def test_input_rewrite_with_kwargs(toy):
    x = torch.randn(2, 4)
    with Hooks().on_input(toy, lambda m, args, kwargs: (args, {**kwargs, "scale": 0.0}), with_kwargs=True):
        assert torch.equal(toy(x), torch.zeros(2, 4))  # every layer's output scaled by 0
    assert not torch.equal(toy(x), torch.zeros(2, 4))


def test_snapshot_restores_then_applies_the_delta_once(toy):
    from lifelong.core.delta import ParamChange

    name = "layers.0.weight"
    weight = toy.get_parameter(name)
    snap = Snapshot(toy, [name])
    before = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)  # the edit as it ran
    change = torch.full_like(weight, 0.5)
    delta = snap.restore_and_apply({name: ParamChange(dense=change)})
    assert torch.equal(weight, before + change) and torch.equal(delta.changes[name].dense, change)
