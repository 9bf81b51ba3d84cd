"""The replay's settings are declared once (lifelong/run.py): the command line, TOML configs, manifests
and sweep specs take exactly those; numbers have one spelling in a run's identity; a seed with --sample
draws which edits are replayed, and runs that repeat each other are not counted as independent."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lifelong.cli import build_parser, main
from lifelong.config import SCALARS, read_config
from lifelong.core.stats import over_seeds
from lifelong.replay import replay
from lifelong.run import RUN_SETTINGS, RunConfig, RunDir
from lifelong.summary import Line, compare_table, configurations, seed_units, summary_table
from lifelong.sweep import SPEC_KEYS, load_spec
from streams import EditStream
from streams.errors import UserError
from tests.conftest import TINY_FT, make_edits

FLAGS = [s for s in RUN_SETTINGS if s.form == "flag"]


def test_cli_toml_manifest_and_sweep_take_exactly_the_declared_settings(tmp_path):
    replay_parser = build_parser().replay_parser
    dests = {a.dest for a in replay_parser._actions}
    assert {s.name for s in FLAGS} <= dests
    assert {s.name for s in FLAGS} == set(SCALARS) - {"out", "threads"}
    swept_elsewhere = {"editor": "editors", "seed": "seeds", "model": "model", "stream": "stream"}
    for s in FLAGS:
        assert (s.name if s.sweep == "scalar" else swept_elsewhere[s.name]) in SPEC_KEYS, s.name
    # Every declared setting is a RunConfig field with the declared default.
    config = RunConfig()
    assert all(getattr(config, s.name) == s.default for s in RUN_SETTINGS)
    # A value out of range is refused the same way by each.
    toml = tmp_path / "c.toml"
    toml.write_text("sample = 0\n")
    with pytest.raises(UserError, match="sample must be at least 1"):
        read_config(toml)
    spec = tmp_path / "s.toml"
    spec.write_text('editors = ["ft"]\nsample = 0\nmodel = "tiny-llama"\n')
    with pytest.raises(UserError, match="key 'sample': must be at least 1"):
        load_spec(spec)


def test_a_bad_setting_is_one_line_on_the_command_line(tmp_path, capsys):
    code = main(["replay", "--model", "tiny-llama", "--sample", "0", "--out", str(tmp_path / "r")])
    assert code == 2 and "--sample must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_2e_2_and_0_02_are_one_run(tmp_path, stream_file):
    overrides = dict(TINY_FT, lr="5e-2")
    first = replay(
        RunConfig(model="tiny-llama", stream=str(stream_file), editor_overrides=overrides, steps=2),
        tmp_path / "r",
        progress=False,
    )
    again = replay(
        RunConfig(model="tiny-llama", stream=str(stream_file), editor_overrides=dict(TINY_FT, lr="0.05"), steps=2),
        tmp_path / "r",
        progress=False,
    )
    assert again.run.manifest()["run_id"] == first.run.manifest()["run_id"]
    assert first.run.manifest()["identity"]["editor_overrides"]["lr"] == "0.05"


def test_the_seed_draws_the_sample_whole_chains_in_stream_order():
    from streams import ChainLink

    edits = make_edits(12)
    chained = [
        e
        if i not in (3, 7)
        else e.__class__(**{**e.__dict__, "chain": ChainLink("c1", "round-out" if i == 3 else "round-back")})
        for i, e in enumerate(edits)
    ]
    stream = EditStream(chained)
    a, b, a_again = stream.sample(6, 0), stream.sample(6, 1), stream.sample(6, 0)
    assert [e.id for e in a] == [e.id for e in a_again] and [e.id for e in a] != [e.id for e in b]
    for s in (a, b):
        ids = [e.id for e in s]
        assert ids == sorted(ids, key=lambda i: int(i[1:])) and len(ids) == 6  # stream order, exactly n
        assert ("e3" in ids) == ("e7" in ids)  # the chain whole or not at all
    with pytest.raises(ValueError, match="a sample of 13 edits"):
        stream.sample(13, 0)


def _tiny_run(tmp_path, stream_file, seed, sample=None):
    config = RunConfig(
        model="tiny-llama",
        stream=str(stream_file),
        editor_overrides=dict(TINY_FT),
        seed=seed,
        sample=sample,
        probe_every=2,
    )
    return replay(config, tmp_path / f"s{seed}-{sample}", progress=False).run


def test_identical_seeds_are_counted_once_and_sampled_seeds_are_units(tmp_path, stream_file, capsys):
    same = [_tiny_run(tmp_path, stream_file, seed) for seed in (0, 1)]
    assert configurations(same) == [[0, 1]]
    table = compare_table(same)
    row = table.filter(table["protocol"] == "es").row(1, named=True)  # efficacy at own step
    assert row[next(c for c in table.columns if c.endswith("seeds n"))] == 1  # the repeat counted once
    alone = summary_table(same[0])
    edits = alone.filter(alone["protocol"] == "es").row(1, named=True)["n"]
    assert edits == 6
    assert row[next(c for c in table.columns if c.endswith("pooled n"))] == edits  # not twice the edits
    code = main(["compare", str(same[0].path), str(same[1].path), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert code == 0 and "seed 1 repeats seed 0 exactly" in out and "counted once" in out

    drawn = [_tiny_run(tmp_path, stream_file, seed, sample=3) for seed in (0, 1)]
    assert configurations(drawn) == [[0, 1]]  # the seed's sample is the seed's, not another configuration
    ids = [{r["edit_id"] for r in run.results().to_dicts() if r["probe"] == "edit_quality"} for run in drawn]
    assert ids[0] != ids[1] and all(len(i) == 3 for i in ids)


def test_no_seed_interval_leaves_its_quantitys_range():
    low_ones = over_seeds([0.01, 3.0], bounds=(0.0, math.inf))
    assert low_ones.low == 0.0 and low_ones.high > 3.0
    share = over_seeds([0.98, 1.0, 1.0], bounds=(0.0, 1.0))
    assert share.high == 1.0 and 0 <= share.low < 0.98
    units = seed_units(
        [[Line("m", "p", over_seeds([1.0]))], [Line("m", "p", over_seeds([1.0]))]],
        [frozenset({"a"}), frozenset({"a"})],
    )
    assert units.distinct == [0] and units.repeats == {1: 0}
    assert np.isnan(over_seeds([]).value)


def test_a_run_dir_records_the_sample_only_when_set(tmp_path, stream_file):
    plain = _tiny_run(tmp_path, stream_file, 0)
    drawn = _tiny_run(tmp_path, stream_file, 0, sample=3)
    assert "sample" not in RunDir(plain.path).manifest()["identity"]
    assert RunDir(drawn.path).manifest()["identity"]["sample"] == 3
