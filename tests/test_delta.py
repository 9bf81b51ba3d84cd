import pytest
import torch

from lifelong.core.delta import Delta, DeltaStore, ParamChange


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
    delta = Delta(
        {
            "a.weight": ParamChange(dense=torch.randn(3, 4)),
            "b.weight": ParamChange(u=torch.randn(5, 2), v=torch.randn(6, 2)),
        }
    )
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


def _sparse_change(p, dim, index, gen):
    shape = list(p.shape)
    shape[dim] = len(index)
    return ParamChange(index=torch.tensor(index), values=torch.randn(shape, generator=gen), dim=dim, shape=p.shape)


@pytest.mark.parametrize("dim", [0, 1])
def test_sparse_change_touches_only_its_slices(tiny, dim):
    name = tiny.adapter.out_proj_param_name(1)
    p = tiny.model.get_parameter(name)
    before = p.detach().clone()
    change = _sparse_change(p, dim, [0, 3, 7], torch.Generator().manual_seed(1))
    delta = Delta({name: change})
    delta.apply(tiny.model)
    assert torch.equal(p, before + change.materialize())  # bitwise: the dense equivalent adds zeros elsewhere
    untouched = [i for i in range(p.shape[dim]) if i not in (0, 3, 7)]
    keep = torch.tensor(untouched)
    assert torch.equal(p.index_select(dim, keep), before.index_select(dim, keep))
    assert delta.nbytes < p.numel() * 4 // 4
    delta.revert(tiny.model)
    assert torch.allclose(p, before, atol=1e-6)


def test_sparse_save_load_and_store_checkout_are_exact(tmp_path, tiny):
    names = [tiny.adapter.out_proj_param_name(i) for i in (1, 2)]
    base = _weights(tiny)
    store = DeltaStore.for_scope(tmp_path / "store", tiny.model, names)
    gen = torch.Generator().manual_seed(0)
    states = {}
    for step in range(1, 4):
        p = tiny.model.get_parameter(names[step % 2])
        delta = Delta({names[step % 2]: _sparse_change(p, step % 2, [step, step + 2], gen)})
        delta.save(tmp_path / f"d{step}.safetensors")
        again = Delta.load(tmp_path / f"d{step}.safetensors").changes[names[step % 2]]
        original = delta.changes[names[step % 2]]
        assert again.sparse and again.dim == original.dim and again.shape == tuple(p.shape)
        assert torch.equal(again.index, original.index) and torch.equal(again.values, original.values)
        delta.apply(tiny.model)
        store.commit(step, delta)
        states[step] = _weights(tiny)
    for step in (2, 3, 1):
        store.checkout(tiny.model, step)
        assert all(torch.equal(p, states[step][n]) for n, p in tiny.model.named_parameters()), step
    store.checkout(tiny.model, 0)
    assert all(torch.equal(p, base[n]) for n, p in tiny.model.named_parameters())


def test_sparse_change_is_validated():
    values = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="exactly one of"):
        ParamChange(dense=torch.zeros(4, 4), index=torch.tensor([0, 1]), values=values, dim=1, shape=(4, 4))
    with pytest.raises(ValueError, match="needs index, values, dim and shape"):
        ParamChange(index=torch.tensor([0, 1]), values=values)
    with pytest.raises(ValueError, match="expected \\(4, 2\\)"):
        ParamChange(index=torch.tensor([0, 1]), values=torch.zeros(2, 4), dim=1, shape=(4, 4))
    with pytest.raises(ValueError, match="sorted, unique"):
        ParamChange(index=torch.tensor([1, 1]), values=values, dim=1, shape=(4, 4))
    with pytest.raises(ValueError, match="sorted, unique"):
        ParamChange(index=torch.tensor([0, 4]), values=values, dim=1, shape=(4, 4))


def _flip_last_data_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # the last byte is tensor data (safetensors puts the header first)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "editor, overrides, damaged",
    [
        ("ft", {"layer": "1", "lr": "0.05", "norm_constraint": "0.05", "max_steps": "5"}, "step_000002.safetensors"),
        ("grace", {"layer": "2"}, "state_000003.safetensors"),
    ],
)
def test_damaged_delta_or_state_is_named_on_resume_and_checkout(tmp_path, stream_file, editor, overrides, damaged):
    from lifelong.core.delta import DamagedFileError
    from lifelong.replay import checkout, replay
    from lifelong.run import RunConfig

    cfg = RunConfig(
        model="tiny-llama", stream=str(stream_file), editor=editor, probe_every=2, editor_overrides=overrides
    )
    run = replay(cfg, tmp_path / "r", progress=False, stop_after=3).run
    _flip_last_data_byte(run.deltas_dir / damaged)
    with pytest.raises(DamagedFileError, match=rf"{damaged}: damaged file.*checksum"):
        replay(cfg, tmp_path / "r", progress=False)
    with pytest.raises(DamagedFileError, match=rf"{damaged}: damaged file"):
        checkout(tmp_path / "r", 3)


def test_truncated_delta_is_named(tmp_path):
    from lifelong.core.delta import DamagedFileError, Delta, ParamChange

    path = tmp_path / "step_000001.safetensors"
    Delta({"w": ParamChange(dense=torch.ones(3, 3))}).save(path)
    assert torch.equal(Delta.load(path).changes["w"].dense, torch.ones(3, 3))
    _flip_last_data_byte(path)
    with pytest.raises(DamagedFileError, match="checksum"):
        Delta.load(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DamagedFileError, match="cannot be read"):
        Delta.load(path)
