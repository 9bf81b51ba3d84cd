"""The reproduction's chain claims (#34): each chain its own run from θ0 (independent units), controls made
from the same chains (o → o → o; an unrelated second edit), and figures over chains paired by chain."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from benchmarks.reproduction import measures as m
from benchmarks.reproduction import runner
from benchmarks.reproduction.claims import Arm
from streams import builtin_chains_stream
from streams.generators import chains_of, layout
from tests.conftest import TINY_FT


def _chains(kind: str) -> list[tuple]:
    return [c for c in chains_of(builtin_chains_stream()) if c[0].chain is not None and c[-1].id.startswith(kind)]


def test_noop_round_aims_every_edit_at_o_and_keeps_the_chain():
    chains = _chains("round")[:3]
    for before, after in zip(chains, runner.noop_round(chains), strict=True):
        o = before[-1].target_new
        assert [e.target_new for e in after] == [o] * len(before)
        assert all(e.target_true is None for e in after)
        assert [(e.id, e.chain, e.prompt, e.subject, e.timestamp) for e in after] == [
            (e.id, e.chain, e.prompt, e.subject, e.timestamp) for e in before
        ]
    layout(runner.noop_round(chains))  # a valid stream: chains, ids and timestamps as before


def test_unrelated_e2_takes_another_subjects_second_edit_in_the_chains_place():
    chains = _chains("reverse")[:2] + _chains("composite")[:2]
    swapped = runner.unrelated_e2(chains)
    for i, (before, after) in enumerate(zip(chains, swapped, strict=True)):
        e2 = next(e for e in before if e.chain.role == "conflict-e2")
        new = next(e for e in after if e.chain.role == "conflict-e2")
        assert new.chain == e2.chain and new.timestamp == e2.timestamp and new.id == f"{e2.id}~unrelated"
        assert new.subject not in {e.subject for e in before}
        nxt = next(e for e in chains[(i + 1) % len(chains)] if e.chain.role == "conflict-e2")
        assert (new.subject, new.prompt, new.target_new) == (nxt.subject, nxt.prompt, nxt.target_new)
        kept = lambda chain: [e for e in chain if e.chain.role != "conflict-e2"]  # noqa: E731
        assert kept(after) == kept(before)
    stream = layout(swapped)
    assert [e.chain.role for e in stream][:3] == [e.chain.role for e in layout(chains)][:3]  # e1 stays before e2
    with pytest.raises(ValueError, match="at least two chains"):
        runner.unrelated_e2(chains[:1])


def _unit_rows(values: dict[str, float], metric: str = "distortion_js") -> pl.DataFrame:
    rows = [(2, "chains", metric, "completion;p=meantok", unit, v, unit) for unit, v in values.items()]
    schema = ["step", "probe", "metric", "protocol", "edit_id", "value", m.UNIT]
    return pl.DataFrame(rows, schema=schema, orient="row")


def test_chain_units_count_a_chain_drawn_twice_once_and_pair_by_chain():
    seed0 = _unit_rows({"c1": 0.2, "c2": 0.4})
    seed1 = _unit_rows({"c2": 0.4, "c3": 0.6})  # c2 again: the same chain from θ0, not a new unit
    assert m.chain_units([seed0, seed1], "distortion_js") == {"c1": 0.2, "c2": 0.4, "c3": 0.6}
    e = m.chain_unit_estimate([seed0, seed1], "distortion_js")
    assert e.n == 3 and math.isclose(e.value, 0.4) and 0.2 <= e.low <= e.value <= e.high <= 0.6
    control = _unit_rows({"c1": 0.1, "c2": 0.1, "c3": 0.1, "c4": 0.9})  # c4: no partner, left out
    d = m.chain_unit_difference([seed0, seed1], [control], "distortion_js")
    assert d.n == 3 and math.isclose(d.value, 0.3) and 0.1 <= d.low <= d.high <= 0.5
    with pytest.raises(ValueError, match="units"):
        m.chain_units([seed0.drop(m.UNIT)], "distortion_js")


def test_zero_one_chain_figures_get_wilson_and_their_differences_newcombes_paired_interval():
    fails = _unit_rows({f"c{i}": float(i % 2) for i in range(20)}, "failure_rate")
    e = m.chain_unit_estimate([fails], "failure_rate")
    assert e.method == "wilson" and e.n == 20 and e.value == 0.5
    never = _unit_rows({f"c{i}": 0.0 for i in range(20)}, "failure_rate")
    d = m.chain_unit_difference([fails], [never], "failure_rate")
    assert d.method == "newcombe paired" and d.n == 20 and 0.0 < d.low < 0.5 < d.high < 1.0
    # every pair agreeing (3 chains, the same FR in both arms): not a zero-width interval at 0
    same = _unit_rows({"c1": 1.0, "c2": 1.0, "c3": 0.0}, "failure_rate")
    tie = m.chain_unit_difference([same], [same], "failure_rate")
    assert tie.value == 0 and tie.low < -0.4 and tie.high > 0.4


def test_newcombes_paired_interval_by_hand():
    from lifelong.core.stats import newcombe_paired_difference

    # Cavo et al. 2012 as in Fagerland, Lydersen & Laake's book (chapter 8): 59 / 6 / 16 / 80, −0.0621
    # [−0.1186, −0.0046]
    low, high = newcombe_paired_difference(59, 6, 16, 80)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)
    assert newcombe_paired_difference(0, 0, 0, 3) == pytest.approx((-0.5615, 0.5615), abs=1e-4)  # Wilson(0, 3)
    assert newcombe_paired_difference(0, 5, 0, 0) == pytest.approx((0.3855, 1.0), abs=1e-4)  # √(2·0.4345²) below 1


@pytest.fixture
def chain_arm(monkeypatch):
    chains = _chains("round")[:2]
    monkeypatch.setattr(runner, "build_stream", lambda source, count, seed, transform="": layout(chains[:count]))
    return Arm("ft", "ft", "round", {"quick": 2}, dict(TINY_FT), ("chains",), 1000000, units="chains")


def test_a_chain_unit_arm_runs_each_chain_from_theta0_and_reads_them_back(tmp_path, chain_arm):
    model = runner.BaseModel("tiny-llama")
    lm, base = model.lm, model.base
    results = runner.run_arm(lm, base, chain_arm, "quick", 0, tmp_path, "tiny-llama", 1)
    chain_ids = [c[0].chain.chain_id for c in _chains("round")[:2]]
    assert all(torch.equal(p, base[n]) for n, p in lm.model.named_parameters())  # θ0 put back after the last
    assert results[m.UNIT].unique(maintain_order=True).to_list() == chain_ids
    folder = runner.run_dir(tmp_path, "quick", chain_arm, 0)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(chain_ids)
    key = ["step", "probe", "metric", "protocol", "edit_id"]
    # the second chain's run is the run of that chain alone from θ0: the first chain's edits were put back
    cid, config = runner.chain_configs(chain_arm, "quick", 0, tmp_path, "tiny-llama")[1]
    alone = runner._replay_from_theta0(lm, base, chain_arm, config, tmp_path / "alone", 1)
    mine = results.filter(pl.col(m.UNIT) == cid).drop(m.UNIT, "run_id")
    assert mine.sort(key).equals(alone.drop("run_id").sort(key))
    assert set(mine.filter(pl.col("probe") == "chains")["edit_id"].drop_nulls().to_list()) == {cid}
    stored = runner.stored_results(tmp_path, "quick", chain_arm, 0, model)
    assert stored is not None and stored.sort([m.UNIT, *key]).equals(results.sort([m.UNIT, *key]))
    assert set(m.chain_units([stored], "distortion_js")) == set(chain_ids)
    assert runner.run_minutes(tmp_path, "quick", type("C", (), {"arms": (chain_arm,)})(), range(1)) > 0


def test_a_run_kept_in_the_archive_is_read_on_another_machine_while_its_identity_holds(tmp_path, chain_arm, capsys):
    import dataclasses

    model = runner.BaseModel("tiny-llama")
    archive, key = tmp_path / "archive", [m.UNIT, "step", "probe", "metric", "protocol", "edit_id"]
    runner.run_arm(model.lm, model.base, chain_arm, "quick", 0, tmp_path / "work", "tiny-llama", 1)
    first = runner.stored_results(tmp_path / "work", "quick", chain_arm, 0, model, archive)
    assert first is not None
    folder = archive / "tiny-llama" / "quick" / runner.run_dir(tmp_path, "quick", chain_arm, 0).name
    assert len(list(folder.glob("*.parquet"))) == len(list(folder.glob("*.json"))) == 2  # one per chain
    elsewhere = runner.stored_results(tmp_path / "fresh", "quick", chain_arm, 0, model, archive)  # no run dirs
    assert elsewhere is not None and elsewhere.sort(key).equals(first.sort(key))
    claim = type("C", (), {"arms": (chain_arm,)})()
    assert runner.run_minutes(tmp_path / "fresh", "quick", claim, range(1), archive, "tiny-llama") > 0
    changed = dataclasses.replace(chain_arm, overrides={**chain_arm.overrides, "lr": "0.01"})
    assert runner.stored_results(tmp_path / "fresh2", "quick", changed, 0, model, archive) is None
    assert "an archived run made by other settings (differs in: editor_overrides" in capsys.readouterr().out
    assert runner.stored_results(tmp_path / "fresh3", "quick", chain_arm, 0, model, None) is None


def test_intervals_over_seeds_stay_within_each_quantitys_range():
    unbounded = iter([1.0, 1.0, 0.9])
    assert m.per_seed([None] * 3, lambda r: next(unbounded)).high > 1.0  # a t interval over 3 seeds leaves [0, 1] ...
    values = iter([1.0, 1.0, 0.9])
    share = m.per_seed([None] * 3, lambda r: next(values), m.SHARE)
    assert share.high == 1.0 and share.low < share.value  # ... cut to the share's range it does not
    assert m.paired_difference([1.0, 1.0, 0.1], [0.0, 0.0, 0.0]).high == 1.0
    low, high = m.CHAIN_RANGES["distortion_js"]
    assert (low, high) == (0.0, math.log(2))
