import pytest
import torch

from lifelong.delta import Delta, DeltaStore, ParamChange


def _weights(tiny):
    return {n: p.detach().clone() for n, p in tiny.model.named_parameters()}


def test_param_change_is_dense_or_low_rank():
    with pytest.raises(ValueError):
        ParamChange()
    with pytest.raises(ValueError):
        ParamChange(dense=torch.zeros(2, 2), u=torch.zeros(2, 1), v=torch.zeros(2, 1))


def test_low_rank_apply_and_nbytes(tiny):
    name = tiny.adapter.out_proj_param_name(2)
    p = tiny.model.get_parameter(name)
    before = p.detach().clone()
    u, v = torch.randn(p.shape[0], 1), torch.randn(p.shape[1], 1)
    delta = Delta({name: ParamChange(u=u, v=v)})
    assert delta.nbytes == (u.numel() + v.numel()) * 4
    delta.apply(tiny.model)
    assert torch.allclose(p, before + u @ v.T)
    delta.revert(tiny.model)
    assert torch.allclose(p, before, atol=1e-6)


def test_save_load_roundtrip(tmp_path):
    delta = Delta({"a.weight": ParamChange(dense=torch.randn(3, 4)),
                   "b.weight": ParamChange(u=torch.randn(5, 2), v=torch.randn(6, 2))})
    delta.save(tmp_path / "d.safetensors")
    again = Delta.load(tmp_path / "d.safetensors")
    assert set(again.changes) == {"a.weight", "b.weight"}
    assert torch.equal(again.changes["a.weight"].dense, delta.changes["a.weight"].dense)
    assert torch.equal(again.changes["b.weight"].u, delta.changes["b.weight"].u)
    assert again.changes["b.weight"].rank == 2
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_store_checkout_is_bitwise(tmp_path, tiny):
    names = [tiny.adapter.out_proj_param_name(i) for i in (1, 2)]
    base = _weights(tiny)
    store = DeltaStore.for_scope(tmp_path, tiny.model, names)
    states = {0: _weights(tiny)}
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        p = tiny.model.get_parameter(names[step % 2])
        delta = Delta({names[step % 2]: ParamChange(dense=torch.randn(p.shape, generator=gen) * 1e-3)})
        delta.apply(tiny.model)
        store.commit(step, delta, {"keys": torch.full((2,), float(step))})
        states[step] = _weights(tiny)
    for step in (2, 0, 3, 1):
        store.checkout(tiny.model, step)
        for n, p in tiny.model.named_parameters():
            assert torch.equal(p, states[step][n]), (step, n)
    store.revert_to_base(tiny.model)
    assert all(torch.equal(p, base[n]) for n, p in tiny.model.named_parameters())
    assert torch.equal(store.load_state(2)["keys"], torch.full((2,), 2.0))
    assert store.load_state(0) == {}
    assert store.nbytes_on_disk(1) > 0


def test_store_refuses_out_of_scope_delta(tmp_path, tiny):
    scoped = tiny.adapter.out_proj_param_name(1)
    other = tiny.adapter.out_proj_param_name(2)
    store = DeltaStore.for_scope(tmp_path, tiny.model, [scoped])
    p = tiny.model.get_parameter(other)
    with pytest.raises(ValueError, match="outside the editor's scope"):
        store.commit(1, Delta({other: ParamChange(dense=torch.zeros_like(p))}))


def test_store_unknown_scope_and_missing_step(tmp_path, tiny):
    with pytest.raises(KeyError, match="unknown parameters"):
        DeltaStore.for_scope(tmp_path, tiny.model, ["no.such.weight"])
    store = DeltaStore.for_scope(tmp_path, tiny.model, [])
    with pytest.raises(FileNotFoundError, match="step 5"):
        store.load_delta(5)
