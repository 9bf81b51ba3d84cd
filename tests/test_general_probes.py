"""Perplexity, its collapse step, and weight drift (docs/METRICS.md §5)."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
import polars as pl
import pytest
import torch
from scipy.stats import t as student_t

from lifelong.core.delta import Delta, ParamChange
from lifelong.core.model_access import token_nll
from lifelong.core.models import load_model
from lifelong.core.options import OptionError
from lifelong.core.scorer import Scorer
from lifelong.editors.base import Editor
from lifelong.replay import replay
from lifelong.run import RunConfig
from lifelong.summary import summary_table
from probes import make_probe
from probes.perplexity import BUILTIN_CORPUS, PerplexityProbe, collapse_step, split_sentences
from tests.conftest import SHARED_DATA, TINY_FT

TEXT = (
    "The red fox runs over the green hill at dawn. A small bird sings in the old oak tree. "
    "Rain falls on the quiet town and the river grows wide. "
) * 3


def train_to_repeat(lm, text: str, steps: int = 150) -> None:
    """Fit ``lm`` to reproduce ``text`` (teacher forcing on one chunk)."""
    ids = torch.tensor([[0, *lm.tokenizer(text).input_ids]])
    model = lm.model
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


@pytest.fixture(scope="module")
def trained():
    lm = load_model("tiny-llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_num_threads(1)
        train_to_repeat(lm, TEXT)
    return lm


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def shuffled(text: str, seed: int = 0) -> str:
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


def test_token_nll_matches_the_model_loss_and_ignores_padding():
    lm = load_model("tiny-llama")
    rows = [lm.tokenizer("hello world, again").input_ids, lm.tokenizer("a much longer row of text here").input_ids]
    total, count = token_nll(lm.model, rows, pad_id=0)
    for row, t, c in zip(rows, total, count):
        ids = torch.tensor([row])
        with torch.no_grad():
            loss = lm.model(input_ids=ids, labels=ids).loss.item()
        assert c == len(row) - 1
        assert t / c == pytest.approx(loss, rel=1e-5)
    # A batch of one gives the same as the padded batch of two.
    alone, _ = token_nll(lm.model, rows[:1], pad_id=0)
    assert alone[0] == pytest.approx(total[0], rel=1e-5)


def test_trained_text_has_lower_perplexity_than_shuffled(trained, tmp_path, text_file):
    shuffled_file = tmp_path / "shuffled.txt"
    shuffled_file.write_text(shuffled(TEXT))
    spec = "perplexity:chunk_tokens=64,corpus="
    seen = make_probe(spec + str(text_file)).perplexities(Scorer(trained.model, trained.tokenizer))
    scrambled = make_probe(spec + str(shuffled_file)).perplexities(Scorer(trained.model, trained.tokenizer))
    # Chunks restart the context, so a text memorised as one sequence is not perfect here.
    assert 3 * seen["corpus"] < scrambled["corpus"]
    assert 3 * seen["sentence_mean"] < scrambled["sentence_mean"]
    # Read as the one sequence it was trained on, the text is nearly certain.
    whole = make_probe(f"perplexity:chunk_tokens=1024,corpus={text_file}").perplexities(
        Scorer(trained.model, trained.tokenizer)
    )
    assert whole["corpus"] < 1.05
    # The untrained model sees no difference of that size.
    fresh = load_model("tiny-llama")
    a = make_probe(spec + str(text_file)).perplexities(Scorer(fresh.model, fresh.tokenizer))["corpus"]
    b = make_probe(spec + str(shuffled_file)).perplexities(Scorer(fresh.model, fresh.tokenizer))["corpus"]
    assert 0.7 < a / b < 1.3


def test_fixed_chunking_and_options(text_file):
    lm = load_model("tiny-llama")
    probe = make_probe(f"perplexity:chunk_tokens=50,max_tokens=120,corpus={text_file}")
    chunks, sentences = probe.rows_for(lm.tokenizer)
    assert [len(c) for c in chunks] == [51, 51, 21] and all(c[0] == lm.tokenizer.bos_token_id for c in chunks)
    assert len(sentences) == len(split_sentences(TEXT)) == 9
    assert probe.rows_for(lm.tokenizer)[0] is chunks  # encoded once
    assert split_sentences("Short. This one is kept! And this one? no") == ["This one is kept!", "And this one?"]
    with pytest.raises(FileNotFoundError, match="perplexity corpus 'nope.txt': no such file"):
        make_probe("perplexity:corpus=nope.txt")
    with pytest.raises(OptionError, match="threshold must be above 1"):
        make_probe("perplexity:threshold=0.5")
    assert make_probe("perplexity").path == BUILTIN_CORPUS


def test_builtin_corpus_is_a_few_thousand_tokens():
    lm = load_model("tiny-llama")  # byte-level: about 4-5 bytes per subword token
    text = BUILTIN_CORPUS.read_text()
    assert len(text.split()) > 1800 and len(split_sentences(text)) > 100
    chunks, _ = PerplexityProbe().rows_for(lm.tokenizer)
    assert len(chunks) == 8192 // 128  # cut to max_tokens


@pytest.mark.skipif(not (SHARED_DATA / "wikitext").is_dir(), reason="no ../shared/data/wikitext")
def test_wikitext_corpus_reads(monkeypatch):
    monkeypatch.setenv("LIFELONG_DATA", str(SHARED_DATA))
    lm = load_model("tiny-llama")
    probe = make_probe("perplexity:corpus=wikitext,max_tokens=512,max_sentences=8")
    chunks, sentences = probe.rows_for(lm.tokenizer)
    assert len(chunks) == 4 and len(sentences) == 8
    assert "\r" not in probe.text


def test_wikitext_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LIFELONG_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="perplexity corpus 'wikitext': .*wikitext-2-raw_test.txt not found"):
        make_probe("perplexity:corpus=wikitext")


@dataclass
class ScrambleParams:
    at_step: int = 3  # the step (1-based count of apply calls) that scrambles
    std: float = 1.0


class ScramblerEditor(Editor):
    """Test-only editor: does nothing until its ``at_step``-th batch, then overwrites one MLP output
    projection with noise."""

    name = "scrambler"
    description = "randomises one layer (test only)"
    Params = ScrambleParams

    def __init__(self, params=None):
        super().__init__(params)
        self.calls = 0

    def scope(self, lm):
        return [lm.adapter.out_proj_param_name(1)]

    def apply(self, lm, batch):
        self.calls += 1
        if self.calls != self.params.at_step:
            return Delta.empty()
        name = self.scope(lm)[0]
        weight = lm.model.get_parameter(name)
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(weight.shape, generator=gen) * self.params.std
        delta = Delta({name: ParamChange(dense=noise - weight.detach())})
        delta.apply(lm.model)
        return delta


def test_scrambled_layer_crosses_the_threshold_and_collapse_step_is_reported(trained, tmp_path, stream_file, text_file):
    lm = load_model("tiny-llama")
    lm.model.load_state_dict(trained.model.state_dict())
    cfg = RunConfig(
        model="tiny-llama",
        stream=str(stream_file),
        probe_every=2,
        probes=[f"perplexity:schedule=every:1,chunk_tokens=64,corpus={text_file}", "weight_drift"],
    )
    result = replay(cfg, tmp_path / "run", lm=lm, editor=ScramblerEditor(), progress=False)
    rows = result.run.results().filter(pl.col("probe") == "perplexity")
    ratio = rows.filter((pl.col("metric") == "ratio") & (pl.col("protocol") == "corpus")).sort("step")
    assert ratio["step"].to_list() == [0, 1, 2, 3, 4, 5, 6]
    assert ratio["value"].to_list()[:3] == [1.0, 1.0, 1.0]
    assert min(ratio["value"].to_list()[3:]) > 2.0
    results = result.run.results()
    assert collapse_step(results) == 3 and collapse_step(results, "sentence_mean") == 3
    table = {(m, p): v for m, p, v in summary_table(result.run).select("measure", "protocol", "value").iter_rows()}
    assert table[("perplexity collapse step (ratio >= 2)", "corpus")] == 3
    assert table[("perplexity ratio to θ0 at last step", "corpus")] == pytest.approx(ratio["value"][-1])

    # The corpus ratio's interval over chunks, recomputed by hand from θ0's and the last step's chunks.
    bounds = {
        m: rows.filter((pl.col("metric") == m) & (pl.col("protocol") == "corpus")).sort("step")["value"].to_list()
        for m in ("ratio_low", "ratio_high")
    }
    assert bounds["ratio_low"][0] == bounds["ratio_high"][0] == 1.0  # θ0 against itself
    assert all(lo <= r <= hi for lo, r, hi in zip(bounds["ratio_low"], ratio["value"], bounds["ratio_high"]))
    probe = make_probe(f"perplexity:chunk_tokens=64,corpus={text_file}")
    chunks = probe.rows_for(lm.tokenizer)[0]
    theta0 = result.run.load_reference()["perplexity"]["chunk_nll"]
    now, _ = token_nll(lm.model, chunks, pad_id=0)
    d, c = np.subtract(now, theta0), np.array([len(x) - 1 for x in chunks])  # per chunk: NLL change, tokens
    r = d.sum() / c.sum()
    half = student_t.ppf(0.975, len(c) - 1) * math.sqrt(len(c) / (len(c) - 1) * ((d - r * c) ** 2).sum()) / c.sum()
    assert math.exp(r) == pytest.approx(ratio["value"][-1], rel=1e-4)
    assert bounds["ratio_low"][-1] == pytest.approx(math.exp(r - half), rel=1e-4)
    assert bounds["ratio_high"][-1] == pytest.approx(math.exp(r + half), rel=1e-4)
    # Each chunk's NLL is a row (and its tokens at θ0): the same figures, read from the results.
    last = rows.filter((pl.col("metric") == "chunk_nll") & (pl.col("step") == 6)).sort("edit_id")
    tokens = rows.filter(pl.col("metric") == "chunk_tokens")
    assert last.height == len(chunks) and set(tokens["step"]) == {0} and tokens["value"].sum() == c.sum()
    by_id = dict(zip(last["edit_id"], last["value"]))
    assert [by_id[f"chunk:{i}"] for i in range(len(chunks))] == pytest.approx(list(now), rel=1e-5)
    line = summary_table(result.run).filter(
        (pl.col("measure") == "perplexity ratio to θ0 at last step") & (pl.col("protocol") == "corpus")
    )
    assert line["n"][0] == len(chunks) and line["low"][0] == pytest.approx(bounds["ratio_low"][-1])

    drift = results.filter(pl.col("probe") == "weight_drift")
    touched = drift.filter((pl.col("metric") == "touched") & (pl.col("protocol") == "total")).sort("step")
    weight = lm.model.get_parameter(lm.adapter.out_proj_param_name(1))
    assert touched["value"].to_list() == [0, 0, weight.numel(), weight.numel(), weight.numel(), weight.numel()]
    norm = drift.filter(
        (pl.col("metric") == "frobenius") & (pl.col("protocol") == "per_matrix") & (pl.col("step") == 6)
    )["value"][0]
    base = trained.model.get_parameter(lm.adapter.out_proj_param_name(1)).detach().double()
    assert norm == pytest.approx(float((weight.detach().double() - base).norm()), rel=1e-9)


def test_weight_drift_counts_a_sparse_edit(tmp_path, stream_file):
    lm = load_model("tiny-llama")
    cfg = RunConfig(
        model="tiny-llama",
        stream=str(stream_file),
        probe_every=3,
        editor_overrides=dict(TINY_FT),
        probes=["weight_drift:schedule=every:3"],
    )
    result = replay(cfg, tmp_path / "ft", lm=lm, progress=False)
    drift = result.run.results().filter(pl.col("probe") == "weight_drift")
    assert sorted(set(drift["step"])) == [3, 6]
    name = lm.adapter.out_proj_param_name(1)
    per = drift.filter((pl.col("edit_id") == name) & (pl.col("step") == 6))
    vals = dict(zip(per["metric"], per["value"]))
    w = lm.model.get_parameter(name).detach().double()
    w0 = load_model("tiny-llama").model.get_parameter(name).detach().double()
    assert vals["touched"] == int((w != w0).sum()) > 0
    assert vals["frobenius"] == pytest.approx(float((w - w0).norm()), rel=1e-9)
    assert vals["relative"] == pytest.approx(float((w - w0).norm() / w0.norm()), rel=1e-9)


def test_ratio_at_last_step_is_not_the_theta0_value_before_any_edit_step():
    """A run stopped before its first probed edit step has no ratio yet (not θ0's 1.0)."""
    import math

    import polars as pl

    from lifelong.summary import general_ability_lines

    row = {"probe": "perplexity", "protocol": "corpus", "edit_id": None}
    results = pl.DataFrame(
        [{**row, "step": 0, "metric": "perplexity", "value": 20.0}, {**row, "step": 0, "metric": "ratio", "value": 1.0}]
    )
    lines = {ln.measure: ln.estimate.value for ln in general_ability_lines(results) if ln.protocol == "corpus"}
    assert lines["perplexity at θ0"] == 20.0 and math.isnan(lines["perplexity ratio to θ0 at last step"])
    later = pl.concat([results, pl.DataFrame([{**row, "step": 5, "metric": "ratio", "value": 1.5}])])
    lines = {ln.measure: ln.estimate.value for ln in general_ability_lines(later) if ln.protocol == "corpus"}
    assert lines["perplexity ratio to θ0 at last step"] == 1.5


def test_perplexity_at_step_re_measures_what_the_probe_recorded(tmp_path, stream_file, text_file, capsys):
    """benchmarks/perplexity_at_step.py reads a kept step back from its deltas: on the run's own corpus
    it prints the ratio and interval the probe recorded, and the paired ratio of two runs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "ppl_at_step", BUILTIN_CORPUS.parents[2] / "benchmarks" / "perplexity_at_step.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    recorded = {}
    for lr in ("0.05", "0.2"):
        cfg = RunConfig(
            model="tiny-llama",
            stream=str(stream_file),
            steps=3,
            editor_overrides={**TINY_FT, "lr": lr},
            probes=[f"perplexity:schedule=every:1,chunk_tokens=64,corpus={text_file}"],
        )
        run = replay(cfg, tmp_path / f"ft{lr}", progress=False).run
        rows = run.results().filter((pl.col("step") == 3) & (pl.col("protocol") == "corpus"))
        recorded[lr] = {m: v for m, v in zip(rows["metric"], rows["value"]) if m.startswith("ratio")}
    tool.main(
        [str(tmp_path / "ft0.05"), str(tmp_path / "ft0.2"), f"--corpus={text_file}", "--chunk-tokens=64", "--threads=1"]
    )
    out = capsys.readouterr().out
    for lr, r in recorded.items():
        line = next(x for x in out.splitlines() if x.startswith(f"ft{lr} step 3: "))
        value, low, high = (float(v) for v in re.findall(r"[\d.]+(?:e[+-]?\d+)?", line.split("θ0 ")[1])[:3])
        assert value == pytest.approx(r["ratio"], rel=1e-3)
        assert (low, high) == (pytest.approx(r["ratio_low"], abs=2e-3), pytest.approx(r["ratio_high"], abs=2e-3))
    paired = next(x for x in out.splitlines() if "ft0.05 / ft0.2" in x)
    assert float(paired.split(": ")[1].split()[0]) == pytest.approx(
        recorded["0.05"]["ratio"] / recorded["0.2"]["ratio"], rel=1e-3
    )
