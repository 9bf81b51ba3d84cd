"""MEND's hypernetwork training as published (issue #34): the toolkit's Llama settings by default, the edited
data set's training split (never an evaluated edit), early stopping on validation, and the training provenance
carried by the hypernetwork file, the run manifest and `show`."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from lifelong.core.models import load_model
from lifelong.editors import make_editor
from lifelong.editors.mend import (
    TRAIN_SPLITS,
    MENDParams,
    TrainConfig,
    hypernet_dir,
    load_hypernetwork,
    train_hypernetwork,
    training_preset,
    training_split,
)
from lifelong.editors.mend import training as mend_training
from streams import EditStream, load_stream
from streams.readers import default_data_dir
from tests.conftest import make_edits

LAYERS = [1, 2, 3]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))


def test_defaults_are_the_toolkits_llama_training_file():
    """EasyEdit hparams/TRAINING/MEND/llama-7b.yaml (lr, lr_lr, edit_lr and rank as the original's mend.yaml)."""
    published = asdict(TrainConfig())
    expected = {
        "lr": 1e-6,
        "lr_lr": 1e-4,
        "edit_lr": 1e-4,
        "rank": 1920,
        "c_edit": 0.1,
        "c_loc": 1.0,
        "batch_size": 1,
        "accumulate": 10,
        "grad_clip": 100.0,
        "eval_every": 1000,
        "holdout": 500,
        "patience": 30000,
        "stop_key": "es",
    }
    assert {k: published[k] for k in expected} == expected
    assert TrainConfig().steps < 100_000  # our cap, below the toolkit's max_iters
    assert MENDParams().training == "published" and MENDParams().train_data == "split:counterfact"
    former = asdict(training_preset("cpu-small"))  # the former defaults, as a named variant
    assert {k: former[k] for k in ("steps", "batch_size", "rank", "lr", "lr_lr", "accumulate", "patience")} == {
        "steps": 150,
        "batch_size": 4,
        "rank": 64,
        "lr": 1e-3,
        "lr_lr": 1e-2,
        "accumulate": 1,
        "patience": 0,
    }
    with pytest.raises(ValueError, match="training must be one of published, cpu-small, got 'fast'"):
        training_preset("fast")


def _counterfact_files(root, n_train=12):
    """A data directory with 3 evaluated ROME-format CounterFact records and an EasyEdit-format file of
    ``n_train`` records, two of which share a subject with the evaluated ones."""
    cf = root / "counterfact"
    cf.mkdir(parents=True)
    evaluated = [
        {
            "case_id": 900 + i,
            "requested_rewrite": {
                "prompt": "{} lives in",
                "subject": f"Evalperson {i}",
                "target_new": {"str": "Rome"},
                "target_true": {"str": "Oslo"},
            },
            "paraphrase_prompts": [f"Evalperson {i} is a resident of"],
            "neighborhood_prompts": ["Somebody lives in"],
        }
        for i in range(3)
    ]
    (cf / "counterfact_rome_500.json").write_text(json.dumps(evaluated))
    train = [
        {
            "case_id": i,
            "prompt": f"{subject} lives in",
            "subject": subject,
            "target_new": "Paris",
            "ground_truth": "Lima",
            "rephrase_prompt": f"{subject} is a resident of",
            "locality_prompt": "Anna lives in",
            "locality_ground_truth": "Bern",
        }
        for i, subject in enumerate(
            [f"Trainperson {i}" for i in range(n_train - 2)] + ["Evalperson 0", "evalperson  2"]
        )
    ]
    (cf / "counterfact_easyedit_edit.json").write_text(json.dumps(train))


def test_training_split_is_the_edited_sets_training_records_and_never_an_evaluated_edit(tmp_path, monkeypatch):
    _counterfact_files(tmp_path / "data")
    monkeypatch.setenv("LIFELONG_DATA", str(tmp_path / "data"))
    evaluated = load_stream("dataset:counterfact")
    split = training_split("counterfact")
    assert sorted(e.id for e in split) == sorted(f"cfe-{i}" for i in range(10))  # the 2 evaluated subjects out
    assert [e.id for e in training_split("counterfact")] == [e.id for e in split]  # a fixed order
    lm = load_model("tiny-llama")
    config = training_preset("cpu-small", steps=1, rank=4, holdout=3)
    path = train_hypernetwork(lm, LAYERS, "split:counterfact", config, progress=False)
    _, meta = load_hypernetwork(path, lm.device)
    assert meta["heldout_ids"] == [e.id for e in split[-3:]] and meta["train_ids"] == [e.id for e in split[:-3]]
    assert not {e.subject for e in evaluated} & {e.subject for e in split}
    editor = make_editor("mend", {"train_data": "split:counterfact", "training": "cpu-small", "hypernet": str(path)})
    editor.bind(lm).check_stream(evaluated)  # the evaluated edits are not among the training records
    with pytest.raises(ValueError, match="unknown MEND training split 'split:fever'"):
        training_split("fever")
    monkeypatch.setitem(TRAIN_SPLITS, "counterfact-long", ("counterfact_easyedit", ("counterfact",), 4))
    head = load_stream("dataset:counterfact_easyedit")[:4]  # a split that also leaves out the file's first records
    long = training_split("counterfact-long")
    assert sorted(e.id for e in long) == sorted(f"cfe-{i}" for i in range(4, 10))
    assert not {e.subject for e in head} & {e.subject for e in long}


@pytest.mark.skipif(not (default_data_dir() / "counterfact").is_dir(), reason="needs the shared data sets")
def test_the_shared_counterfact_split_leaves_out_every_reproduced_subject():
    split = training_split("counterfact")
    evaluated = {" ".join(e.subject.lower().split()) for e in load_stream("dataset:counterfact")}
    assert len(split) > 9000 and not evaluated & {" ".join(e.subject.lower().split()) for e in split}


def _scripted_validation(monkeypatch, values):
    """Replace the validation with a scripted edit-success curve, one value per validation."""
    calls = iter(values)

    def fake(lm, net, edits):
        es = next(calls)
        return {"es": es, "gen": es, "exact": es, "nll": 1 - es, "loc": 0.01, "loc_same": 1.0}

    monkeypatch.setattr(mend_training, "heldout_success", fake)


def test_early_stopping_stops_at_patience_on_a_plateau_and_keeps_the_best(tmp_path, monkeypatch):
    data = tmp_path / "train.jsonl"
    EditStream(make_edits(10)).to_jsonl(data)
    lm = load_model("tiny-llama")
    small = dict(rank=4, holdout=2, eval_every=1, checkpoint_every=1)
    # validations at steps 0 (untrained, no candidate), 1, 2, ...: best at step 2, no better after it
    _scripted_validation(monkeypatch, [0.9, 0.5, 0.7, 0.7, 0.6, 0.65, 0.7, 0.99, 0.99])
    config = training_preset("cpu-small", steps=20, patience=3, **small)
    path = train_hypernetwork(lm, LAYERS, str(data), config, directory=tmp_path / "es", progress=False)
    net, meta = load_hypernetwork(path, lm.device)
    t = meta["training"]
    assert (t["stopped"], t["steps_run"], t["val_step"], t["val"]["es"]) == ("plateau", 5, 2, 0.7)
    assert meta["steps"] == 5
    assert [r["step"] for r in mend_training.read_curve(path.parent / "curve.csv")] == list(range(6))
    # the kept network is the one of step 2: what a run that ends at step 2 trains
    _scripted_validation(monkeypatch, [0.0] * 3)
    capped = training_preset("cpu-small", steps=2, patience=0, **small)
    at2, _ = load_hypernetwork(
        train_hypernetwork(lm, LAYERS, str(data), capped, directory=tmp_path / "two", progress=False), lm.device
    )
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), at2.state_dict().values()))
    # a rising curve never plateaus: training runs to the cap
    _scripted_validation(monkeypatch, [0.1 * i for i in range(5)])
    rising = training_preset("cpu-small", steps=4, patience=2, **small)
    path = train_hypernetwork(lm, LAYERS, str(data), rising, directory=tmp_path / "cap", progress=False)
    t = load_hypernetwork(path, lm.device)[1]["training"]
    assert (t["stopped"], t["steps_run"], t["val_step"]) == ("cap", 4, 4)
    with pytest.raises(ValueError, match="early stopping .* needs validation records"):
        train_hypernetwork(lm, LAYERS, str(data), training_preset("cpu-small", patience=5, holdout=0), progress=False)


def test_accumulated_iterations_take_one_optimiser_step(tmp_path):
    """accumulate=k: one Adam step per k iterations (the original's accumulate_bs), checkpointed at that step."""
    data = tmp_path / "train.jsonl"
    EditStream(make_edits(10)).to_jsonl(data)
    lm = load_model("tiny-llama")
    one = training_preset("cpu-small", steps=2, rank=4, holdout=0, batch_size=1, accumulate=2, checkpoint_every=1)
    path = train_hypernetwork(lm, LAYERS, str(data), one, directory=tmp_path / "acc", progress=False)
    saved = torch.load(tmp_path / "acc" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2 and saved["optimizer"]["state"][0]["step"] == 1  # one Adam step for two iterations
    assert load_hypernetwork(path, lm.device)[1]["identity"]["config"]["accumulate"] == 2


def test_cache_is_keyed_on_the_training_settings_and_the_network_form(tmp_path, monkeypatch):
    lm = load_model("tiny-llama")
    published = hypernet_dir(lm, LAYERS, "split:counterfact", None, TrainConfig())
    cpu_small = hypernet_dir(lm, LAYERS, "split:counterfact", None, training_preset("cpu-small"))
    assert published != cpu_small and published == hypernet_dir(lm, LAYERS, "split:counterfact")
    with monkeypatch.context() as patch:
        patch.setattr("lifelong.editors.mend.training.NETWORK_FORM", "other")
        assert hypernet_dir(lm, LAYERS, "split:counterfact", None, TrainConfig()) != published
    assert hypernet_dir(lm, LAYERS, "split:counterfact", None, TrainConfig(rank=64)) != published
    assert hypernet_dir(lm, LAYERS, "split:counterfact", None, TrainConfig(steps=10)) == published  # the cap: no
    with pytest.raises(FileNotFoundError, match="--data split:counterfact --training published` first"):
        make_editor("mend", {}).bind(lm)


def test_manifest_and_show_carry_how_the_hypernetwork_was_trained(tmp_path, monkeypatch):
    from lifelong.cli import main
    from lifelong.run import RunDir
    from lifelong.summary import format_summary

    data = tmp_path / "train.jsonl"
    EditStream(make_edits(8)).to_jsonl(data)
    lm = load_model("tiny-llama")
    _scripted_validation(monkeypatch, [0.2, 0.4, 0.3, 0.3])
    config = training_preset("cpu-small", steps=10, rank=4, holdout=2, eval_every=1, patience=2)
    path = train_hypernetwork(lm, LAYERS, str(data), config, directory=tmp_path / "h", progress=False)
    line = "trained to a validation plateau: stopped after 3 steps (custom training), val es 0.4"
    hyper = make_editor("mend", {"hypernet": str(path), "layers": "1-3"}).bind(lm).hyperparameters()
    assert hyper["hypernet_training"].startswith(line) and "n=2, at step 1" in hyper["hypernet_training"]
    assert hyper["training"] == "custom"  # the given file's settings, not the default's name
    stream = tmp_path / "eval.jsonl"
    EditStream(make_edits(1, start=100)).to_jsonl(stream)
    run = tmp_path / "run"
    argv = ["replay", "--model", "tiny-llama", "--editor", "mend", "--stream", str(stream), "--quiet"]
    assert main([*argv, "--set", f"hypernet={path}", "--set", "layers=1-3", "--out", str(run)]) == 0
    assert RunDir(run).manifest()["identity"]["hyperparameters"]["hypernet_training"].startswith(line)
    assert f"hypernet_training={line}" in format_summary(RunDir(run))
