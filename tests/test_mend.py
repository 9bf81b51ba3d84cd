"""MEND on tiny models: the hypernetwork's structure, training (resumable, cached), low-rank deltas, overlap refusal."""

from __future__ import annotations

import pytest
import torch

from lifelong.cli import main
from lifelong.editors import make_editor
from lifelong.editors.mend import (
    GradientTransform,
    MENDEditor,
    MENDParams,
    OverlapError,
    RunningNorm,
    TrainConfig,
    hypernet_dir,
    load_hypernetwork,
    train_hypernetwork,
)
from lifelong.models import load_model
from probes.scorer import Scorer
from streams import EditStream
from tests.conftest import make_edits

LAYERS = [1, 2, 3]


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
    paths = {steps: train_hypernetwork(lm, LAYERS, str(data), TrainConfig(steps=steps, checkpoint_every=10),
                                       directory=work / f"h{steps}", progress=False) for steps in (0, 40)}
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
    assert sorted(delta.changes) == sorted(lm.adapter.out_proj_param_name(x) for x in LAYERS)
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
    expected = (u - u.mean(0)) / (u.std(0) + 1e-8)
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
    config = TrainConfig(steps=4, checkpoint_every=1, rank=4)
    whole = train_hypernetwork(lm, LAYERS, str(data), config, directory=tmp_path / "a", progress=False)
    partial = train_hypernetwork(lm, LAYERS, str(data), config, directory=tmp_path / "b", progress=False, stop_after=2)
    assert not partial.exists() and (tmp_path / "b" / "checkpoint.pt").exists()
    resumed = train_hypernetwork(lm, LAYERS, str(data), config, directory=tmp_path / "b", progress=False)
    a, meta = load_hypernetwork(whole, lm.device)
    b, _ = load_hypernetwork(resumed, lm.device)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert meta["steps"] == 4 and meta["train_ids"] == [e.id for e in make_edits(12)]
    with pytest.raises(ValueError, match="different training set-up"):
        train_hypernetwork(lm, LAYERS, str(data), TrainConfig(steps=4, rank=8), directory=tmp_path / "b",
                           progress=False)


def test_cached_by_model_layers_and_data_and_found_by_the_editor(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    EditStream(make_edits(8)).to_jsonl(data)
    lm = load_model("tiny-llama")
    with pytest.raises(FileNotFoundError, match="run `lifelong train-mend --model tiny-llama --layers 1,2,3"):
        make_editor("mend", {"train_data": str(data)}).bind(lm)
    assert main(["train-mend", "--model", "tiny-llama", "--data", str(data), "--steps", "2", "--rank", "4",
                 "--quiet"]) == 0
    path = hypernet_dir(lm, LAYERS, str(data)) / "hypernet.safetensors"
    assert str(path.resolve()) in capsys.readouterr().out
    assert hypernet_dir(lm, [2, 3], str(data)) != path.parent and hypernet_dir(lm, LAYERS, "builtin") != path.parent
    editor = make_editor("mend", {"train_data": str(data)}).bind(lm)
    assert editor.hyperparameters()["hypernet_steps"] == 2
    assert editor.apply(lm, make_edits(1, start=50))


def test_replay_refuses_a_stream_overlapping_the_training_records(trained, tmp_path, capsys):
    from lifelong.replay import replay
    from lifelong.run import RunConfig

    data, paths = trained
    lm = load_model("tiny-llama")
    editor = MENDEditor(MENDParams(layers="1-3", hypernet=str(paths[0]))).bind(lm)
    editor.check_stream(EditStream(make_edits(3, start=100)))  # disjoint: fine
    stream = tmp_path / "eval.jsonl"
    EditStream(make_edits(2, start=100) + make_edits(1, start=7)).to_jsonl(stream)
    config = RunConfig(model="tiny-llama", editor="mend", stream=str(stream),
                       editor_overrides={"layers": "1-3", "hypernet": str(paths[0])})
    with pytest.raises(OverlapError, match="overlaps the MEND hypernetwork's training records.*1 of 3 edits.*e7"):
        replay(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    code = main(["replay", "--model", "tiny-llama", "--editor", "mend", "--stream", str(stream), "--set", "layers=1-3",
                 "--set", f"hypernet={paths[0]}", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "overlaps" in err
