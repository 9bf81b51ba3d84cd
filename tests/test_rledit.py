"""RLEdit (issue #39): the authors' defaults, the sequence objective, training that resumes to the same
network, the update equation each edit applies, the kit, and the provenance a run carries."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from lifelong.core.models import load_model
from lifelong.editors import make_editor
from lifelong.editors.mend import OverlapError
from lifelong.editors.rledit import (
    RLEditNet,
    TrainConfig,
    build_hypernetwork,
    default_layers,
    load_hypernetwork,
    resolve_params,
    sequence_objective,
    train_hypernetwork,
    training_preset,
)
from lifelong.editors.rledit import training as rl_training
from lifelong.testing import check_editor
from streams import EditStream
from tests.conftest import make_edits

LAYERS = [1, 2]
TINY = dict(n_edits=2, chunk=1, num_seq=3, epochs=2, rank=4, n_blocks=2, edit_lr=1e-2, meta_lr=1e-3, back_depth=2)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny hypernetwork trained over two 3-step sequences of 2 edits (held out: 2 records)."""
    root = tmp_path_factory.mktemp("rledit")
    data = root / "train.jsonl"
    EditStream(make_edits(10)).to_jsonl(data)
    config = TrainConfig(**TINY, holdout=2, checkpoint_every=2)
    lm = load_model("tiny-llama")
    return train_hypernetwork(lm, LAYERS, str(data), config, directory=root / "h", progress=False), data


def test_defaults_are_the_authors():
    """zhrli324/RLEdit config/editor/rledit.yaml, config/config.yaml (num_seq), config/dataset/counterfact.yaml."""
    published = asdict(TrainConfig())
    expected = {
        "rank": 1024,
        "n_blocks": 4,
        "edit_lr": 1e-6,
        "meta_lr": 1e-5,
        "loc_coef": 0.6,
        "max_grad_norm": 1.0,
        "epochs": 1,
        "reg_coef": 1e-4,
        "time_decay": 0.95,
        "back_depth": 10,
        "num_seq": 400,
        "n_edits": 20,
        "chunk": 4,
        "steps": 0,
        "patience": 0,
    }
    assert {k: published[k] for k in expected} == expected
    assert default_layers(32) == list(range(22, 31))  # Llama-3-8B: model.layers.22-30
    lm = load_model("tiny-llama")
    assert resolve_params("", lm.adapter) == ("gate", "up")
    assert make_editor("rledit").params.training == "published"
    meta = {
        "identity": {"config": rl_training.config_identity(TrainConfig())},
        "training": {"stopped": "schedule", "steps_run": 400, "epochs_run": 1, "preset": "published", "val_n": 0},
    }
    assert rl_training.training_summary(meta).startswith("ran the authors' whole schedule: 400 steps, 1 optimiser step")
    meta["identity"]["config"]["num_seq"] = 8  # any other sequence is a cap, whatever its own schedule
    assert rl_training.training_summary(meta).startswith("stopped at the cap after 400 steps (the authors' schedule")
    with pytest.raises(ValueError, match="training must be one of published, cpu-capped, got 'fast'"):
        training_preset("fast")


def test_sequence_objective_is_the_authors_discounted_sum():
    """L_t = Σ_j γ^j (L_gen(t−j) + c_loc L_loc(t−j)) + c_reg Σ‖ΔW‖², most recent batch first, in float64."""
    config = TrainConfig(time_decay=0.5, loc_coef=0.6, reg_coef=0.1)
    gen = [
        torch.tensor(2.0, dtype=torch.float64),
        torch.tensor(3.0, dtype=torch.float64),
        torch.tensor(5.0, dtype=torch.float64),
    ]
    loc = [torch.tensor(x, dtype=torch.float64) for x in (0.1, 0.2, 0.4)]
    shifts = [torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64)]
    hand = (2 + 0.06) + 0.5 * (3 + 0.12) + 0.25 * (5 + 0.24) + 0.1 * (1 + 4 + 9 + 16 + 0.25)
    assert sequence_objective(gen, loc, shifts, config).item() == pytest.approx(hand, rel=1e-12)


def test_a_step_backpropagates_the_objective_over_the_last_back_depth_batches():
    """sequence_step's L_t recomputed by hand on tiny-llama: the current batch's update applied to the
    weights, CE on each recent batch's paraphrases, KL against the weights before the update; the
    oldest batch (beyond back_depth) left out."""
    lm = load_model("tiny-llama")
    config = TrainConfig(**{**TINY, "back_depth": 2, "time_decay": 0.7, "reg_coef": 10.0})
    net = build_hypernetwork(lm, LAYERS, ("gate", "up"), 4, 2, 1e-2, 0)
    edits = make_edits(6, start=40)
    history = [
        (
            [(e.rendered_prompt, e.target_new) for e in b],
            [(e.paraphrases[0], e.target_new) for e in b],
            [(e.neighborhood[0].prompt, e.neighborhood[0].answer) for e in b],
        )
        for b in (edits[0:2], edits[2:4], edits[4:6])
    ]
    out = rl_training.sequence_step(lm, net, history, config)
    assert all(p.grad is not None for p in net.parameters())  # L_t reaches the network through ΔW
    assert any(float(p.grad.abs().sum()) > 0 for p in net.parameters())
    # the blocks start at B = 0 and the authors' clamp(0) passes the gradient there (a ReLU would not)
    assert all(float(block.b.grad.abs().sum()) > 0 for block in net.net(0).blocks)
    scorer_ce, scorer_kl = [], []
    from lifelong.core.scorer import Scorer

    scorer = Scorer(lm.model, lm.tokenizer)
    views = [lm.adapter.mlp_weight_view(*t) for t in net.targets]
    before = [v.detach().clone() for v in views]
    for _, gen_pairs, loc_pairs in reversed(history[1:]):  # most recent first; history[0] is past back_depth
        ce, kl = 0.0, 0.0
        for pair, near in zip(gen_pairs, loc_pairs):  # chunk = 1: one pair per chunk
            d_loc = scorer.collate([scorer.encode(*near)])
            with torch.no_grad():
                ref = scorer.answer_logits(d_loc).double().log_softmax(-1)
                for v, s in zip(views, out["shifts"]):
                    v += s.T
                d = scorer.collate([scorer.encode(*pair)])
                logp = scorer.answer_logits(d).double().log_softmax(-1)
                ce += float(-logp.gather(1, d.targets[:, None]).mean())
                new = scorer.answer_logits(d_loc).double().log_softmax(-1)
                kl += float((ref.exp() * (ref - new)).sum() / ref.shape[0])
                for v, b in zip(views, before):
                    v.copy_(b)
        scorer_ce.append(ce)
        scorer_kl.append(kl)
    reg = sum(float((s.double() ** 2).sum()) for s in out["shifts"])
    hand = sum(0.7**j * (c + 0.6 * k) for j, (c, k) in enumerate(zip(scorer_ce, scorer_kl))) + 10.0 * reg
    assert out["total"] == pytest.approx(hand, rel=1e-4)


def test_training_resumes_to_the_same_network(tmp_path, trained):
    path, data = trained
    lm = load_model("tiny-llama")
    config = TrainConfig(**TINY, holdout=2, checkpoint_every=2)
    # killed after step 2 of the first 3-step sequence (its checkpoint holds the half-done sequence)
    partial = train_hypernetwork(lm, LAYERS, str(data), config, directory=tmp_path / "r", progress=False, stop_after=2)
    assert not partial.is_file() and (tmp_path / "r" / "checkpoint.pt").is_file()
    resumed = train_hypernetwork(lm, LAYERS, str(data), config, directory=tmp_path / "r", progress=False)
    a, _ = load_hypernetwork(path, lm.device)
    b, meta = load_hypernetwork(resumed, lm.device)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert meta["training"]["stopped"] == "cap" and meta["steps"] == 6 and meta["training"]["epochs_run"] == 2
    rows = (tmp_path / "r" / "curve.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3", "4", "5", "6"]
    assert torch.equal(
        lm.adapter.mlp_weight_view(1, "gate"), load_model("tiny-llama").adapter.mlp_weight_view(1, "gate")
    )


@pytest.mark.parametrize(
    "key, values, steps",
    [("es", [0.1, 0.3, 0.2, 0.2, 0.9], 3), ("nll", [9.0, 5.0, 4.0, 4.5, 4.2, 1.0], 4)],
)
def test_capped_training_stops_at_a_plateau_and_says_so(tmp_path, monkeypatch, key, values, steps):
    """Validation after each one-step epoch (the first, at step 0, is no candidate); patience 2 epochs."""
    data = tmp_path / "train.jsonl"
    EditStream(make_edits(10)).to_jsonl(data)
    scores = iter(values)
    monkeypatch.setattr(
        rl_training, "sequential_validation", lambda *a, **k: {"es": 0.0, "gen": 0.0, "ls": 1.0, key: next(scores)}
    )
    config = TrainConfig(**{**TINY, "epochs": 8, "num_seq": 1}, holdout=2, patience=2, stop_key=key)
    lm = load_model("tiny-llama")
    path = train_hypernetwork(lm, LAYERS, str(data), config, directory=tmp_path / "h", progress=False)
    _, meta = load_hypernetwork(path, torch.device("cpu"))
    summary = rl_training.training_summary(meta)
    assert summary.startswith(f"trained to a validation plateau (val {key}): stopped after {steps} steps (the authors'")
    assert f"), {steps} optimiser steps, sequences of 1 steps of 2 edits (custom training)" in summary
    best = max(values[1 : steps + 1]) if key == "es" else min(values[1 : steps + 1])
    assert f"val {key} {best:.3g}" in summary and f"after epoch {values.index(best)}" in summary


def test_an_edit_applies_the_update_equation_and_the_check_fails_when_it_is_broken(trained, monkeypatch):
    path, _ = trained
    factory = lambda: make_editor("rledit", {"hypernet": str(path), "layers": "1,2"})  # noqa: E731
    report = check_editor(
        factory, model="tiny-llama", max_examples=2, max_edits=3, invariants=["rledit_applies_hypernetwork"]
    )
    report.raise_if_failed()
    original = RLEditNet.shift

    def no_lambda(self, keys, grads, mode):  # the rule without its ridge term e^λ
        pk, pd = self(keys, grads, mode)
        values = -self.lr[mode] * (keys * pk).sum(-1, keepdim=True) * pd
        return torch.linalg.lstsq(keys, values).solution

    monkeypatch.setattr(RLEditNet, "shift", no_lambda)
    broken = check_editor(
        factory,
        model="tiny-llama",
        max_examples=1,
        max_edits=2,
        invariants=["rledit_applies_hypernetwork"],
        shrink=False,
    )
    assert broken.failed == ["rledit_applies_hypernetwork"]
    monkeypatch.setattr(RLEditNet, "shift", original)


def test_the_normaliser_is_editor_state(trained):
    """Each edit moves the normaliser (the authors' cache()); step 2 from step 1's saved state is step 2 live."""
    path, _ = trained
    lm = load_model("tiny-llama")
    live = make_editor("rledit", {"hypernet": str(path), "layers": "1,2"}).bind(lm)
    start = live.state_dict()
    first = live.apply(lm, make_edits(2, start=60))
    after_one = {k: v.clone() for k, v in live.state_dict().items()}
    assert any(not torch.equal(start[k], after_one[k]) for k in start)
    second = live.apply(lm, make_edits(2, start=62))
    lm2 = load_model("tiny-llama")
    first.apply(lm2.model)  # the weights after step 1
    resumed = make_editor("rledit", {"hypernet": str(path), "layers": "1,2"})
    resumed.load_state_dict(after_one)  # before bind: kept until the network loads
    again = resumed.bind(lm2).apply(lm2, make_edits(2, start=62))
    for name, change in second.changes.items():
        assert torch.equal(again.changes[name].materialize(), change.materialize()), name
    resumed.load_state_dict({})  # no state: the normaliser as trained
    assert all(torch.equal(resumed.state_dict()[k], start[k]) for k in start)


def test_manifest_and_show_carry_how_the_hypernetwork_was_trained(tmp_path, trained, capsys):
    from lifelong.cli import main
    from lifelong.run import RunDir
    from lifelong.summary import format_summary

    path, _ = trained
    stream = tmp_path / "eval.jsonl"
    EditStream(make_edits(2, start=100)).to_jsonl(stream)
    run = tmp_path / "run"
    argv = ["replay", "--model", "tiny-llama", "--editor", "rledit", "--stream", str(stream), "--quiet"]
    assert main([*argv, "--set", f"hypernet={path}", "--set", "layers=1,2", "--out", str(run)]) == 0
    line = (
        "stopped at the cap after 6 steps (the authors' schedule: one sequence of 400 steps of 20 edits), "
        "2 optimiser steps, sequences of 3 steps of 2 edits (custom training), val es"
    )
    assert RunDir(run).manifest()["identity"]["hyperparameters"]["hypernet_training"].startswith(line)
    assert f"hypernet_training={line}" in format_summary(RunDir(run))
    editor = make_editor("rledit", {"hypernet": str(path), "layers": "1,2"}).bind(load_model("tiny-llama"))
    with pytest.raises(OverlapError, match="overlaps the RLEdit hypernetwork's training records"):
        editor.check_stream(make_edits(1, start=0))  # a training record
    capsys.readouterr()
    assert main(["editors"]) == 0
    assert "rledit" in capsys.readouterr().out
