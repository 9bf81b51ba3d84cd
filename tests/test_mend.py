"""MEND on tiny models: the hypernetwork's structure, training (resumable, cached), low-rank deltas, overlap refusal,
the edited weights (gate, up and down by default; down alone as before) and the learning curve."""

from __future__ import annotations

import json

import pytest
import torch

from lifelong.cli import main
from lifelong.core.delta import atomic_save_tensors
from lifelong.core.models import load_model
from lifelong.core.scorer import Scorer
from lifelong.editors import make_editor
from lifelong.editors.mend import (
    GradientTransform,
    MENDEditor,
    MENDParams,
    OverlapError,
    RunningNorm,
    TrainConfig,
    build_hypernetwork,
    edit_gradient_factors,
    edit_targets,
    hypernet_dir,
    load_hypernetwork,
    read_curve,
    train_hypernetwork,
    training_preset,
)
from lifelong.editors.mend.network import _ids_mask, _mean_nll
from streams import EditStream
from tests.conftest import make_edits

LAYERS = [1, 2, 3]


def small(**changes) -> TrainConfig:
    """The former CPU training (cpu-small: rank 64, lr 1e-3, lr_lr 1e-2, 4 edits a step), no validation."""
    return training_preset("cpu-small", **{"holdout": 0, **changes})


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Hypernetworks for tiny-llama trained 0 and 40 steps on 40 synthetic edits (held out: make_edits(start=100))."""
    work = tmp_path_factory.mktemp("mend")
    data = work / "train.jsonl"
    EditStream(make_edits(40)).to_jsonl(data)
    lm = load_model("tiny-llama")
    torch.set_num_threads(1)
    paths = {
        steps: train_hypernetwork(
            lm,
            LAYERS,
            str(data),
            small(steps=steps, checkpoint_every=10),
            directory=work / f"h{steps}",
            progress=False,
        )
        for steps in (0, 40)
    }
    return data, paths


def _gain(lm, path, edits) -> float:
    """Mean rise in the new target's log-probability, each edit applied alone to the base model."""
    scorer = Scorer(lm.model, lm.tokenizer)
    editor = MENDEditor(MENDParams(layers="1-3", hypernet=str(path))).bind(lm)
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    gains = []
    for e in edits:
        before = scorer.score([(e.rendered_prompt, e.target_new)]).logprob[0]
        editor.apply(lm, [e])
        gains.append(scorer.score([(e.rendered_prompt, e.target_new)]).logprob[0] - before)
        with torch.no_grad():
            for n, p in lm.model.named_parameters():
                p.copy_(base[n])
    return sum(gains) / len(gains)


def test_trained_hypernetwork_beats_untrained_on_held_out_edits(trained):
    _, paths = trained
    lm = load_model("tiny-llama")
    held_out = make_edits(6, start=100)
    untrained, after = _gain(lm, paths[0], held_out), _gain(lm, paths[40], held_out)
    assert after > untrained + 1.0, (untrained, after)
    assert after > 1.0


def test_update_is_low_rank_with_one_term_per_token(trained):
    _, paths = trained
    lm = load_model("tiny-llama")
    editor = MENDEditor(MENDParams(layers="1-3", hypernet=str(paths[40]))).bind(lm)
    batch = make_edits(1, start=100)  # ~35 byte tokens: fewer than the layer's 64 outputs
    scorer = Scorer(lm.model, lm.tokenizer)
    tokens = sum(len(p) + len(a) for p, a in (scorer.encode(e.rendered_prompt, e.target_new) for e in batch))
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    delta = editor.apply(lm, batch)
    assert sorted(delta.changes) == sorted(
        f"model.layers.{x}.mlp.{k}_proj.weight" for x in LAYERS for k in ("gate", "up", "down")
    )
    for name, change in delta.changes.items():
        assert change.dense is None and change.rank == tokens  # stored as factors, one column per token
        dense = change.u.double() @ change.v.double().T  # float64, so float32 rounding adds no rank
        assert torch.linalg.matrix_rank(dense).item() == tokens < min(dense.shape)
        assert torch.equal(lm.model.get_parameter(name), base[name] + change.materialize())


def test_gradient_transform_starts_as_the_identity_and_normalises():
    net = GradientTransform(d_in=5, d_out=3, rank=2)
    u, d = torch.randn(7, 5), torch.randn(7, 3)
    out_u, out_d = net(u, d)
    assert torch.equal(out_u, u) and torch.equal(out_d, d)  # nothing seen yet: no normalisation either
    net.norm_u.update(u[:3])
    net.norm_u.update(u[3:])
    expected = (u - u.mean(0)) / (u.std(0) + 1e-7)
    assert torch.allclose(net(u, d)[0], expected, atol=1e-5)
    assert torch.linalg.matrix_rank(net.u1 @ net.v1).item() == 0
    with torch.no_grad():
        net.u1.normal_()
    assert torch.linalg.matrix_rank(net.u1 @ net.v1).item() == 2  # the MLP's layers have the factorisation's rank


def test_running_norm_merges_batches_exactly():
    norm = RunningNorm(4)
    x = torch.randn(50, 4, dtype=torch.float64)
    for chunk in x.split([1, 9, 40]):
        norm.update(chunk)
    assert torch.allclose(norm.mean, x.mean(0)) and torch.allclose(norm.m2 / 49, x.var(0))


def test_training_resumes_to_the_same_result(tmp_path):
    data = tmp_path / "train.jsonl"
    EditStream(make_edits(12)).to_jsonl(data)
    lm = load_model("tiny-llama")
    config = small(steps=4, checkpoint_every=1, rank=4)
    whole = train_hypernetwork(lm, LAYERS, str(data), config, directory=tmp_path / "a", progress=False)
    partial = train_hypernetwork(lm, LAYERS, str(data), config, directory=tmp_path / "b", progress=False, stop_after=2)
    assert not partial.exists() and (tmp_path / "b" / "checkpoint.pt").exists()
    with pytest.raises(ValueError, match="checkpoint at step 2, past the 1 steps asked for"):
        train_hypernetwork(
            lm,
            LAYERS,
            str(data),
            small(steps=1, checkpoint_every=1, rank=4),
            directory=tmp_path / "b",
            progress=False,
        )
    resumed = train_hypernetwork(lm, LAYERS, str(data), config, directory=tmp_path / "b", progress=False)
    steps = [line.split(",")[0] for line in (tmp_path / "b" / "curve.csv").read_text().splitlines()[1:]]
    assert steps == ["0", "1", "2", "3", "4"]  # integers, also after the resume
    a, meta = load_hypernetwork(whole, lm.device)
    b, _ = load_hypernetwork(resumed, lm.device)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert meta["steps"] == 4 and meta["train_ids"] == [e.id for e in make_edits(12)]
    with pytest.raises(ValueError, match="different training set-up"):
        train_hypernetwork(lm, LAYERS, str(data), small(steps=4, rank=8), directory=tmp_path / "b", progress=False)


def test_cached_by_model_layers_and_data_and_found_by_the_editor(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    EditStream(make_edits(8)).to_jsonl(data)
    lm = load_model("tiny-llama")
    with pytest.raises(
        FileNotFoundError, match="run `lifelong train-mend --model tiny-llama --layers 1,2,3 --params gate,up,down"
    ):
        make_editor("mend", {"train_data": str(data), "training": "cpu-small"}).bind(lm)
    assert (
        main(
            [
                "train-mend",
                "--model",
                "tiny-llama",
                "--data",
                str(data),
                "--steps",
                "2",
                "--rank",
                "4",
                "--training",
                "cpu-small",
                "--holdout",
                "2",
                "--eval-every",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    config = training_preset("cpu-small", rank=4, holdout=2, eval_every=1)
    path = hypernet_dir(lm, LAYERS, str(data), None, config) / "hypernet.safetensors"
    out = capsys.readouterr().out
    assert str(path.resolve()) in out and "held-out ES" in out
    assert hypernet_dir(lm, [2, 3], str(data), None, config) != path.parent
    assert hypernet_dir(lm, LAYERS, "builtin", None, config) != path.parent
    assert hypernet_dir(lm, LAYERS, str(data), "down", config) != path.parent  # the edited weights are in the key
    assert hypernet_dir(lm, LAYERS, str(data), "gate,up,down", config) == path.parent
    with pytest.raises(FileNotFoundError):  # cpu-small at its own rank (not 4) is another network
        make_editor("mend", {"train_data": str(data), "training": "cpu-small"}).bind(lm)
    editor = make_editor("mend", {"hypernet": str(path)}).bind(lm)
    hyper = editor.hyperparameters()
    assert hyper["hypernet_steps"] == 2 and hyper["params"] == "gate,up,down"  # resolved, for the manifest
    assert hyper["layers"] == "1,2,3"
    assert hyper["edited_weights"] == [
        f"model.layers.{x}.mlp.{k}_proj.weight" for x in LAYERS for k in ("gate", "up", "down")
    ]
    assert editor.apply(lm, make_edits(1, start=50))
    _, meta = load_hypernetwork(path, lm.device)
    assert meta["train_ids"] == [e.id for e in make_edits(6)] and meta["heldout_ids"] == ["e6", "e7"]
    curve = read_curve(path.parent / "curve.csv")  # the learning curve: every step, held-out scores at each eval
    assert [r["step"] for r in curve] == [0, 1, 2]
    assert all(r["heldout_es"] is not None and 0 <= r["heldout_es"] <= 1 for r in curve)
    assert curve[0]["edit_loss"] is None and all(r["edit_loss"] > 0 and r["loc_loss"] >= 0 for r in curve[1:])


def test_replay_refuses_a_stream_overlapping_the_training_records(trained, tmp_path, capsys):
    from lifelong.replay import replay
    from lifelong.run import RunConfig

    data, paths = trained
    lm = load_model("tiny-llama")
    editor = MENDEditor(MENDParams(layers="1-3", hypernet=str(paths[0]))).bind(lm)
    editor.check_stream(EditStream(make_edits(3, start=100)))  # disjoint: fine
    stream = tmp_path / "eval.jsonl"
    EditStream(make_edits(2, start=100) + make_edits(1, start=7)).to_jsonl(stream)
    config = RunConfig(
        model="tiny-llama",
        editor="mend",
        stream=str(stream),
        editor_overrides={"layers": "1-3", "hypernet": str(paths[0])},
    )
    with pytest.raises(OverlapError, match="overlaps the MEND hypernetwork's training records.*1 of 3 edits.*e7"):
        replay(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    code = main(
        [
            "replay",
            "--model",
            "tiny-llama",
            "--editor",
            "mend",
            "--stream",
            str(stream),
            "--set",
            "layers=1-3",
            "--set",
            f"hypernet={paths[0]}",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "overlaps" in err


# ------------------------------------------------------------------------------------- the edited weights


def _plain_gradient(lm, edit) -> dict[str, torch.Tensor]:
    """∇W of the edit's mean target NLL for every parameter, by autograd, as the parameter is stored."""
    scorer = Scorer(lm.model, lm.tokenizer)
    named = dict(lm.model.named_parameters())
    flags = {n: p.requires_grad for n, p in named.items()}
    try:
        for p in named.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            loss = _mean_nll(scorer, _ids_mask(scorer, [(edit.rendered_prompt, edit.target_new)]), 1)
            grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
    return {n: g for n, g in zip(named, grads) if g is not None}


def _mlp_inputs_by_hand(lm, layers, edit) -> dict[tuple[int, str], torch.Tensor]:
    """What enters each MLP weight, from the MLP's own input: x (after the norm) for gate and up, the
    activation product act(gate x) ⊙ (up x) (GPT-2: act(c_fc x)) for down; real tokens only."""
    scorer = Scorer(lm.model, lm.tokenizer)
    data = _ids_mask(scorer, [(edit.rendered_prompt, edit.target_new)])
    seen = {}
    handles = [
        lm.adapter.layer(x).mlp.register_forward_pre_hook(lambda m, a, x=x: seen.__setitem__(x, a[0].detach()))
        for x in layers
    ]
    with torch.no_grad():
        lm.model(input_ids=data.ids, attention_mask=data.mask)
    for h in handles:
        h.remove()
    out, real = {}, data.mask.bool()
    with torch.no_grad():
        for x in layers:
            mlp, h = lm.adapter.layer(x).mlp, seen[x][real]
            if lm.adapter.family == "gpt2":
                out[(x, "up")], out[(x, "down")] = h, mlp.act(mlp.c_fc(h))
            else:
                out[(x, "gate")] = out[(x, "up")] = h
                out[(x, "down")] = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
    return out


@pytest.mark.parametrize("model,kinds", [("tiny-llama", ("gate", "up", "down")), ("tiny-gpt2", ("up", "down"))])
def test_gradient_factors_are_the_rank_one_terms_of_each_weights_gradient(model, kinds):
    lm = load_model(model)
    edit = make_edits(1, start=100)[0]
    targets = edit_targets(LAYERS, kinds)
    assert [t[1] for t in targets[: len(kinds)]] == list(kinds) and len(targets) == 3 * len(kinds)
    factors = edit_gradient_factors(lm, targets, [(edit.rendered_prompt, edit.target_new)])
    by_hand, grads = _mlp_inputs_by_hand(lm, LAYERS, edit), _plain_gradient(lm, edit)
    for target, (u, delta) in zip(targets, factors):
        assert torch.allclose(u, by_hand[target], atol=1e-5), target
        weight = lm.adapter.mlp_weight_view(*target)
        assert delta.shape[1] == weight.shape[0] and u.shape[1] == weight.shape[1]
        name = lm.adapter.mlp_proj_name(*target) + ".weight"
        grad = grads[name].T if lm.adapter.spec.transposed else grads[name]  # (out, in)
        assert torch.allclose(delta.T @ u, grad, atol=1e-6, rtol=1e-4), target


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_untrained_hypernetwork_steps_along_minus_alpha_times_the_gradient(model, tmp_path):
    """Identity init, no normalisation statistics yet: ΔW = −edit_lr ∇W for every edited weight, nothing else."""
    data = tmp_path / "train.jsonl"
    EditStream(make_edits(8)).to_jsonl(data)
    lm = load_model(model)
    path = train_hypernetwork(lm, LAYERS, str(data), small(steps=0, rank=4), directory=tmp_path / "h", progress=False)
    edit = make_edits(1, start=100)[0]
    grads = _plain_gradient(lm, edit)
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    delta = MENDEditor(MENDParams(layers="1-3", hypernet=str(path))).apply(lm, [edit])
    names = {lm.adapter.mlp_proj_name(x, k) + ".weight" for x in LAYERS for k in lm.adapter.mlp_kinds()}
    assert set(delta.changes) == names and len(names) == 3 * len(lm.adapter.mlp_kinds())
    for n, p in lm.model.named_parameters():  # exactly the intended weights moved, each by −α ∇W
        if n in names:
            change = delta.changes[n].materialize()
            assert torch.allclose(change, -TrainConfig.edit_lr * grads[n], atol=1e-9, rtol=1e-4), n
            assert torch.equal(p, base[n] + change)
        else:
            assert torch.equal(p, base[n]), n


def test_update_is_minus_alpha_times_transformed_factors_per_weight(trained):
    """Trained: ΔW = −α_w Σ δ̃ ũᵀ, (ũ, δ̃) from the shape's shared network in weight w's mode."""
    _, paths = trained
    lm = load_model("tiny-llama")
    net, _ = load_hypernetwork(paths[40], lm.device)
    # gate and up share one network (64 → 128), down has another (128 → 64); one mode per weight
    assert len(net.transforms) == 2 and net.transforms[0].n_modes == 6 and net.transforms[1].n_modes == 3
    assert net.group == [0, 0, 1] * 3 and net.mode == [0, 1, 0, 2, 3, 1, 4, 5, 2]
    assert net.transforms[0].scale1.shape == (6, 64 + 128)
    edit = make_edits(1, start=100)[0]
    by_hand = _mlp_inputs_by_hand(lm, LAYERS, edit)
    factors = edit_gradient_factors(lm, net.targets, [(edit.rendered_prompt, edit.target_new)])
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    delta = MENDEditor(MENDParams(layers="1-3", hypernet=str(paths[40]))).apply(lm, [edit])
    for i, (target, (_, d)) in enumerate(zip(net.targets, factors)):
        g = net.transforms[net.group[i]]
        z = torch.cat([g.norm_u(by_hand[target]), g.norm_delta(d)], -1)  # the network written out
        m = net.mode[i]
        h = z + ((z @ g.v1.T @ g.u1.T + g.b1) * g.scale1[m] + g.shift1[m]).clamp(min=0)
        out = h + ((h @ g.v2.T @ g.u2.T + g.b2) * g.scale2[m] + g.shift2[m]).clamp(min=0)
        u_t, d_t = out[:, : g.d_in], out[:, g.d_in :]
        expected = -net.log_lr[i].exp() * torch.einsum("to,ti->oi", d_t, u_t)
        name = lm.adapter.mlp_proj_name(*target) + ".weight"
        assert torch.allclose(delta.changes[name].materialize(), expected, atol=1e-6, rtol=1e-4), target
        assert torch.equal(lm.model.get_parameter(name), base[name] + delta.changes[name].materialize())


def test_down_only_setting_trains_one_network_per_layer_and_a_former_network_file_is_refused(tmp_path):
    data = tmp_path / "train.jsonl"
    EditStream(make_edits(8)).to_jsonl(data)
    lm = load_model("tiny-llama")
    config = small(steps=2, rank=4)
    path = train_hypernetwork(lm, LAYERS, str(data), config, params="down", progress=False)
    assert path.parent == hypernet_dir(lm, LAYERS, str(data), "down", config)
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))  # one unshared network per layer, no per-weight scale/shift
    assert sorted({k.split(".")[1] for k in tensors if k.startswith("transforms.")}) == ["0", "1", "2"]
    assert tensors["log_lr"].shape == (3,) and "transforms.0.scale1" not in tensors
    editor = make_editor("mend", {"hypernet": str(path), "params": "down"}).bind(lm)
    assert editor.hyperparameters()["edited_weights"] == [f"model.layers.{x}.mlp.down_proj.weight" for x in LAYERS]
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    delta = editor.apply(lm, make_edits(1, start=100))
    assert sorted(delta.changes) == [f"model.layers.{x}.mlp.down_proj.weight" for x in LAYERS]
    assert all(torch.equal(p, base[n]) for n, p in lm.model.named_parameters() if n not in delta.changes)
    with pytest.raises(ValueError, match="weights 1.down 2.down 3.down, not .* 1.gate 1.up 1.down"):
        make_editor("mend", {"hypernet": str(path), "layers": "1-3"}).bind(lm)
    with pytest.raises(ValueError, match=r"params must be comma-separated MLP projections of a gpt2 model \(up, d"):
        make_editor("mend", {"params": "gate"}).bind(load_model("tiny-gpt2"))
    # a file written before the network's form was recorded (ReLU, then nothing): refused in one line
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lifelong_mend"])
    assert meta["identity"]["network"] == "clamp"
    del meta["identity"]["network"]
    atomic_save_tensors(tensors, path, {"lifelong_mend": json.dumps(meta)})
    with pytest.raises(ValueError, match="former gradient network .* train it again with `lifelong train-mend`"):
        make_editor("mend", {"hypernet": str(path), "params": "down"}).bind(lm)


def test_both_layers_clamp_so_the_zero_initialised_factors_learn():
    """The original clamps each layer at 0 (gradient 1 at the zero start); a ReLU there has gradient 0,
    and the first layer's u and b would never move."""
    torch.manual_seed(0)
    net = GradientTransform(d_in=5, d_out=3, rank=2, n_modes=2)
    out_u, out_d = net(torch.randn(7, 5), torch.randn(7, 3), mode=1)
    (out_u.square().sum() + out_d.sum()).backward()
    for name in ("u1", "b1", "u2", "b2"):
        assert getattr(net, name).grad.abs().sum() > 0, name
    assert net.shift1.grad[1].abs().sum() > 0 and net.shift1.grad[0].abs().sum() == 0  # only the mode used
    assert net.v1.abs().mean() > 0.5  # v ~ N(0, 1), unscaled, as the original's LRLinear


def test_untrained_network_is_the_identity_in_every_mode():
    lm = load_model("tiny-llama")
    net = build_hypernetwork(lm, LAYERS, ("gate", "up", "down"), rank=4, edit_lr=1e-4)
    u, d = torch.randn(5, 64), torch.randn(5, 128)
    for i in range(len(net.targets)):
        if net.group[i] == 0:
            left, right = net.factors(i, u, d)
            assert torch.equal(right, u.T) and torch.allclose(left, -1e-4 * d.T)
