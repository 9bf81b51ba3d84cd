"""Paper presets (lifelong/presets.py, probes/paper.py; docs/METRICS.md, "Paper presets")."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from lifelong.presets import PRESETS, apply_preset, parse_preset
from lifelong.run import RunConfig
from probes.paper import mean_ngram_entropy, ngram_entropy, token_accuracy_rows, words
from streams import EditStream
from streams.errors import UserError
from tests.conftest import TINY_FT, make_edits


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H2 = -(2/3 log2 2/3 + 1/3 log2 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # six distinct words: 5 distinct bigrams (log2 5 bits), 4 distinct trigrams (2 bits)
    distinct = (2 / 3 * math.log2(5) + 4 / 3 * 2.0) / 2
    assert ngram_entropy("the cat sat on a mat") == pytest.approx(distinct)
    # a degenerate (collapsed) text has none: every bigram and trigram is the same one
    assert ngram_entropy("Baby Baby Baby Baby Baby") == 0.0
    assert mean_ngram_entropy(["a b a b", "Baby Baby Baby"]) == pytest.approx((2 / 3 * h2 + 4 / 3) / 4)
    assert words("Paris, France.") == ["Paris", ",", "France", "."]


class _Scores:
    def __init__(self, token_acc, argmax):
        self.token_acc, self.argmax = np.asarray(token_acc), argmax


class _Scorer:
    """Scores fixed by hand: what the toolkit's token accuracy is computed from."""

    def __init__(self, table):
        self.table = table

    def score(self, pairs):
        return _Scores([self.table[p][0] for p in pairs], [self.table[p][1] for p in pairs])


def test_token_accuracy_rows_by_hand():
    from probes.base import ProbeContext

    e = make_edits(1)[0]
    n = e.neighborhood[0]
    table = {
        (e.rendered_prompt, e.target_new): (0.75, (1, 2, 3, 9)),  # 3 of 4 answer tokens right
        (e.paraphrases[0], e.target_new): (0.5, (1, 8, 3, 9)),
        (n.prompt, n.answer): (1 / 3, (5, 9, 7)),  # the neighbour's answer is tokens (5, 4, 4)
    }
    ctx = ProbeContext(
        step=1,
        timestamp=None,
        batch=(e,),
        history=[(e,)],
        scorer=_Scorer(table),  # type: ignore[arg-type]
        reference={"neighbor_argmax": {f"{n.prompt}\x1f{n.answer}": [5, 6, 7]}},
    )
    got = {(r.metric, r.protocol): r.value for r in token_accuracy_rows("final_quality", ctx, [e])}
    assert got[("efficacy", "token_acc")] == 0.75
    assert got[("generalization", "token_acc")] == 0.5
    assert got[("locality", "token_acc")] == pytest.approx(2 / 3)  # (5, 9, 7) vs θ0's (5, 6, 7)
    assert got[("locality", "token_acc_gold")] == pytest.approx(1 / 3)


def test_scorer_token_accuracy_is_the_teacher_forced_share_of_right_tokens():
    """EasyEdit's test_prediction_acc by hand on the tiny model: the argmax at each answer position,
    given the gold prefix, against the answer's tokens; the share that match."""
    from lifelong.core.models import load_model
    from lifelong.core.scorer import Scorer

    lm = load_model("tiny-llama")
    scorer = Scorer(lm.model, lm.tokenizer)
    prompt, answer = "The capital of Country1 is", "Nova Town City"
    p, a = scorer.encode(prompt, answer)
    with torch.no_grad():
        logits = lm.model(torch.tensor([list(p) + list(a)])).logits[0]
    predicted = logits[len(p) - 1 : len(p) + len(a) - 1].argmax(-1).tolist()
    by_hand = float(np.mean([x == y for x, y in zip(predicted, a)]))
    got = scorer.score([(prompt, answer)])
    assert len(a) >= 2 and got.token_acc[0] == pytest.approx(by_hand)
    assert list(got.argmax[0]) == predicted


def test_parse_and_conflicts():
    assert parse_preset("wise-t:T=10").spec == "wise-t:T=10"
    assert parse_preset("wise-t:T=10,sequences=3").sequence_length == 10
    assert parse_preset("counterfact-rome").spec == "counterfact-rome:B=1"
    assert parse_preset("retention@7").options == {"k": 7}
    for bad, says in (
        ("rome", "unknown preset 'rome'"),
        ("wise-t", "needs T="),
        ("wise-t:T=0", "T must be at least 1"),
        ("wise-t:B=3", "'B=3' is not an option of wise-t"),
        ("retention@x", "k must be a whole number"),
    ):
        with pytest.raises(UserError, match=says):
            parse_preset(bad)
    config, choice = apply_preset(RunConfig(preset="alphaedit-final"))
    assert config.batch_size == 100 and config.preset == "alphaedit-final:B=100"
    assert "final_quality" in config.probes and apply_preset(config)[0] == config  # applying twice changes nothing
    assert apply_preset(RunConfig(preset="retention@3"))[0].probe_every == 3
    with pytest.raises(UserError, match="--probe retention:schedule=every:2 conflicts with --preset retention@3"):
        apply_preset(RunConfig(preset="retention@3", probes=["retention:schedule=every:2"]))
    with pytest.raises(UserError, match="--batch-size 4 conflicts with --preset counterfact-rome:B=1"):
        apply_preset(RunConfig(preset="counterfact-rome", batch_size=4))
    with pytest.raises(UserError, match="--probe fluency:edits=all conflicts with --preset counterfact-rome"):
        apply_preset(RunConfig(preset="counterfact-rome", probes=["fluency:edits=all"]))
    # a probe the preset does not set may be added; the explicit value the preset sets is no conflict
    ok, _ = apply_preset(RunConfig(preset="counterfact-rome:B=2", batch_size=2, probes=["weight_drift"]))
    assert ok.probes[0] == "weight_drift" and ok.batch_size == 2


@pytest.fixture(scope="module")
def lm():
    from lifelong.core.models import load_model

    return load_model("tiny-llama")


def _stream(tmp_path, n):
    path = tmp_path / "s.jsonl"
    EditStream(make_edits(n)).to_jsonl(path)
    return path


@pytest.mark.parametrize(
    "spec", ["immediate", "retention@2", "counterfact-rome", "zsre-toolkit:B=2", "alphaedit-final:B=3"]
)
def test_each_preset_is_named_in_the_manifest_and_on_every_row(tmp_path, lm, spec):
    from lifelong.replay import replay

    config = RunConfig(
        model="tiny-llama", stream=str(_stream(tmp_path, 4)), editor_overrides=dict(TINY_FT), preset=spec
    )
    state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    try:
        run = replay(config, tmp_path / "run", lm=lm, progress=False).run
    finally:
        lm.model.load_state_dict(state)  # the module's model, for the next case
    canonical = parse_preset(spec).spec
    manifest = run.manifest()
    assert manifest["identity"]["preset"] == canonical
    results = run.results()
    assert results["preset"].unique().to_list() == [canonical]
    probes = set(results["probe"].unique())
    if spec.startswith("counterfact-rome"):
        fluency = results.filter(pl.col("probe") == "fluency")
        assert fluency.height == 4 and (fluency["value"] >= 0).all()  # one per edit, each at its own step
    if spec.startswith(("zsre-toolkit", "alphaedit-final")):
        final = results.filter(pl.col("probe") == "final_quality")
        last = final.filter(pl.col("step") == results["step"].max())
        assert set(last.filter(pl.col("metric") == "efficacy")["edit_id"]) == {f"e{i}" for i in range(4)}
        assert final["step"].unique().sort().to_list() == [0, results["step"].max()]  # θ0 and the final model
        assert ("token_acc" in set(final["protocol"])) == spec.startswith("zsre-toolkit")
    if spec == "retention@2":
        steps = results.filter((pl.col("probe") == "retention") & (pl.col("metric") == "retained_fraction"))["step"]
        assert sorted(set(steps)) == [2, 4]
    steps = {"immediate": 4, "retention@2": 4, "counterfact-rome": 4, "zsre-toolkit:B=2": 2, "alphaedit-final:B=3": 2}
    assert manifest["identity"]["stream_steps"] == steps[spec] and "edit_quality" in probes
    from lifelong.summary import format_summary

    shown = format_summary(run)
    assert f"preset {canonical}" in shown
    assert ("final_quality: efficacy at last step" in shown) == ("final_quality" in probes)


def test_a_run_without_a_preset_keeps_its_identity_and_rows_say_none(tmp_path, lm):
    from lifelong.replay import replay
    from lifelong.run import identity_of

    config = RunConfig(model="tiny-llama", stream=str(_stream(tmp_path, 2)), editor_overrides=dict(TINY_FT))
    assert "preset" not in identity_of(config)  # run ids of runs made before presets do not change
    state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    try:
        run = replay(config, tmp_path / "run", lm=lm, progress=False).run
    finally:
        lm.model.load_state_dict(state)
    assert run.results()["preset"].null_count() == run.results().height


def test_results_from_before_the_preset_column_read_with_it(tmp_path):
    from lifelong.run import RESULT_SCHEMA, _read_parquet

    old = {k: v for k, v in RESULT_SCHEMA.items() if k != "preset"}
    row = ("r", 1, None, "edit_quality", "efficacy", "es", "e0", 1.0)
    pl.DataFrame([row], schema=old, orient="row").write_parquet(tmp_path / "old.parquet")
    got = _read_parquet(tmp_path / "old.parquet")
    assert got.columns == list(RESULT_SCHEMA) and got["preset"].to_list() == [None]


def test_wise_t_restores_theta0_bitwise_between_sequences_and_averages_over_them(tmp_path, lm, monkeypatch):
    from lifelong.core.delta import DeltaStore
    from lifelong.replay import replay
    from lifelong.run import RunDir

    theta0 = {k: v.detach().clone() for k, v in lm.model.named_parameters()}
    seen = []
    original = DeltaStore.revert_to_base

    def revert_and_compare(self, model):
        edited = any(not torch.equal(p, theta0[k]) for k, p in model.named_parameters())
        original(self, model)
        seen.append((edited, all(torch.equal(p, theta0[k]) for k, p in model.named_parameters())))

    monkeypatch.setattr(DeltaStore, "revert_to_base", revert_and_compare)
    config = RunConfig(
        model="tiny-llama", stream=str(_stream(tmp_path, 7)), editor_overrides=dict(TINY_FT), preset="wise-t:T=2"
    )
    result = replay(config, tmp_path / "wise", lm=lm, progress=False)
    # 7 edits, T = 2: three sequences, the seventh edit left out; each edited the model, then θ0 came back bitwise
    assert seen == [(True, True)] * 3
    summary = result.sequences
    assert summary is not None and summary["sequences"] == 3 and summary["edits_left_out"] == 1
    runs = [RunDir(tmp_path / "wise" / name) for name in summary["runs"]]
    for i, run in enumerate(runs):
        identity = run.manifest()["identity"]
        assert identity["preset"] == "wise-t:T=2" and identity["stream_edits"] == 2
        assert run.results()["preset"].unique().to_list() == ["wise-t:T=2"]
        assert set(run.results()["edit_id"].drop_nulls()) == {f"e{2 * i}", f"e{2 * i + 1}"}
    # the averaged figure: the mean over sequences of each sequence's mean over its edits, n = sequences
    es = next(f for f in summary["figures"] if (f["metric"], f["protocol"]) == ("efficacy", "token_acc"))
    per_sequence = []
    for run in runs:
        rows = run.results().filter(
            (pl.col("probe") == "final_quality") & (pl.col("step") == 2) & (pl.col("protocol") == "token_acc")
        )
        per_sequence.append(rows.filter(pl.col("metric") == "efficacy")["value"].mean())
    assert es["per_sequence"] == pytest.approx(per_sequence) and es["n"] == 3
    assert es["mean"] == pytest.approx(np.mean(per_sequence))
    assert 0.0 <= es["low"] <= es["mean"] <= es["high"] <= 1.0
    assert (tmp_path / "wise" / "preset.json").is_file()
    # resumed: complete sequences are not replayed; sequences=1 takes the first T edits only (WISE's own run)
    assert replay(config, tmp_path / "wise", lm=lm, progress=False).steps_run == 0
    one = RunConfig(**{**config.__dict__, "preset": "wise-t:T=2,sequences=1"})
    capped = replay(one, tmp_path / "one", lm=lm, progress=False).sequences
    assert capped is not None and capped["sequences"] == 1 and capped["figures"][0]["low"] is None


def test_wise_t_refuses_a_stream_shorter_than_one_sequence(tmp_path, lm):
    from lifelong.replay import replay

    config = RunConfig(model="tiny-llama", stream=str(_stream(tmp_path, 3)), preset="wise-t:T=5")
    with pytest.raises(UserError, match="3 edits, fewer than one sequence of 5"):
        replay(config, tmp_path / "w", lm=lm, progress=False)


def test_every_preset_is_documented():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "METRICS.md").read_text()
    section = text[text.index("Paper presets (issue #38)") :]
    for name in PRESETS:
        assert f"`{name.replace('@k', '@K')}" in section, name


def test_a_sweep_takes_a_preset_and_refuses_one_of_independent_sequences(tmp_path):
    from lifelong.sweep import SpecError, parse_spec

    EditStream(make_edits(4)).to_jsonl(tmp_path / "tiny.jsonl")
    text = 'model = "tiny-llama"\nstream = "tiny.jsonl"\neditors = ["ft"]\nseeds = [0]\npreset = "{}"\n'
    spec = parse_spec(text.format("zsre-toolkit:B=2"), "spec", tmp_path)
    cell = spec.cells[0]
    assert cell.config.preset == "zsre-toolkit:B=2" and cell.config.batch_size == 2 and cell.steps == 2
    with pytest.raises(SpecError, match="key 'preset': wise-t:T=2 writes a directory of runs"):
        parse_spec(text.format("wise-t:T=2"), "spec", tmp_path)


def test_the_command_line_refuses_a_conflicting_flag_in_one_line(tmp_path, capsys):
    from lifelong import cli

    EditStream(make_edits(2)).to_jsonl(tmp_path / "s.jsonl")
    argv = ["replay", "--model", "tiny-llama", "--stream", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "r")]
    assert cli.main([*argv, "--preset", "alphaedit-final", "--batch-size", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size 5 conflicts with --preset alphaedit-final:B=100" in err
    assert not (tmp_path / "r").exists()


def test_a_preset_run_is_repeated_from_its_manifest_as_the_same_run(tmp_path):
    """``--config MANIFEST`` gives the preset's probes back in their recorded spelling: the same probes, no conflict."""
    import json

    from lifelong import cli

    EditStream(make_edits(2)).to_jsonl(tmp_path / "s.jsonl")
    common = ["--stream", str(tmp_path / "s.jsonl"), "--quiet"]
    first = ["replay", "--model", "tiny-llama", *common, "--set", "layer=1", "--set", "max_steps=2"]
    assert cli.main([*first, "--preset", "zsre-toolkit:B=2", "--out", str(tmp_path / "a")]) == 0
    again = ["replay", "--config", str(tmp_path / "a" / "manifest.json"), *common, "--out", str(tmp_path / "b")]
    assert cli.main(again) == 0
    ids = [json.loads((tmp_path / d / "manifest.json").read_text())["run_id"] for d in "ab"]
    assert ids[0] == ids[1]
