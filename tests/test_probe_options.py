"""Extra probes from specs (``--probe name:key=value``) and the context's step checkout."""

from dataclasses import dataclass

import pytest
import torch

from lifelong.core.models import load_model
from lifelong.core.options import OptionError, split_spec
from lifelong.replay import default_suite, replay
from lifelong.run import RunConfig
from probes import PROBES, Probe, Row, UnknownProbeError, make_probe
from tests.conftest import TINY_FT


@dataclass
class NormOptions:
    scale: float = 1.0
    label: str = "w"


class WeightNormProbe(Probe):
    """Norm of the edited matrices now, at step 1 (checked out) and at θ0."""

    name = "weight_norm_test"
    Options = NormOptions

    def measure(self, ctx):
        names = sorted(ctx.base_params)
        params = dict(ctx.scorer.model.named_parameters())
        now = [params[n].detach().clone() for n in names]
        with ctx.at_step(1):
            first = sum(float(params[n].norm()) for n in names)
        after = [params[n].detach() for n in names]
        assert all(torch.equal(a, b) for a, b in zip(now, after)), "model_at did not restore the live weights"
        base = sum(float(ctx.base_params[n].norm()) for n in names)
        return [
            Row(self.name, "at_step_1", self.options.label, first * self.options.scale),
            Row(self.name, "theta0", self.options.label, base * self.options.scale),
        ]


@pytest.fixture
def norm_probe(monkeypatch):
    monkeypatch.setitem(PROBES, WeightNormProbe.name, WeightNormProbe)


def test_split_spec_reads_name_and_options():
    assert split_spec("perplexity") == ("perplexity", {})
    assert split_spec("ppl:schedule=every:5, corpus=a/b.txt") == ("ppl", {"schedule": "every:5", "corpus": "a/b.txt"})
    with pytest.raises(OptionError, match="bad item 'oops'"):
        split_spec("ppl:oops")


def test_make_probe_types_options_and_schedule(norm_probe):
    probe = make_probe("weight_norm_test:schedule=log,scale=2.5")
    assert probe.schedule.spec == "log" and probe.options == NormOptions(scale=2.5)
    assert probe.config() == {"name": "weight_norm_test", "schedule": "log", "options": {"scale": 2.5, "label": "w"}}
    with pytest.raises(UnknownProbeError, match="unknown probe 'nope'"):
        make_probe("nope")
    with pytest.raises(OptionError, match="probe 'weight_norm_test' has no option 'sclae'"):
        make_probe("weight_norm_test:sclae=2")
    with pytest.raises(OptionError, match="weight_norm_test.scale: cannot read 'big' as float"):
        make_probe("weight_norm_test:scale=big")
    with pytest.raises(OptionError, match="unknown probe schedule 'weekly'"):
        make_probe("weight_norm_test:schedule=weekly")


def test_a_probe_given_twice_is_refused_and_a_default_can_be_replaced(norm_probe):
    suite = default_suite(RunConfig(probe_every=3, probes=["retention:schedule=log,fraction=0.5"]))
    assert [p.config() for p in suite.probes] == [
        {"name": "edit_quality", "schedule": "every:1"},
        {"name": "retention", "schedule": "log", "options": {"fraction": 0.5, "seed": 0, "sample": 500}},
    ]
    with pytest.raises(ValueError, match="probe 'weight_norm_test' is given twice"):
        default_suite(RunConfig(probes=["weight_norm_test", "weight_norm_test:scale=2"]))


def test_extra_probe_sees_earlier_steps_and_theta0(tmp_path, stream_file, norm_probe):
    lm = load_model("tiny-llama")
    cfg = RunConfig(
        model="tiny-llama",
        stream=str(stream_file),
        probe_every=2,
        editor_overrides=dict(TINY_FT),
        probes=["weight_norm_test:schedule=every:2"],
    )
    result = replay(cfg, tmp_path / "run", lm=lm, progress=False)
    rows = result.run.results().filter(result.run.results()["probe"] == "weight_norm_test")
    assert sorted(set(rows["step"])) == [2, 4, 6]
    at1 = rows.filter(rows["metric"] == "at_step_1")["value"].to_list()
    assert len(set(round(v, 6) for v in at1)) == 1, "step 1 checked out from different steps differs"
    theta0 = rows.filter(rows["metric"] == "theta0")["value"].to_list()
    assert at1[0] != theta0[0]
    assert result.run.manifest()["identity"]["probes"][-1] == {
        "name": "weight_norm_test",
        "schedule": "every:2",
        "options": {"scale": 1.0, "label": "w"},
    }


def test_retention_panel_is_seeded_stable_and_exact_where_probed(tmp_path, stream_file):
    from probes.edit_quality import in_panel

    ids = [f"e{i}" for i in range(2000)]
    share = sum(in_panel(i, 0.25, seed=3) for i in ids) / len(ids)
    assert 0.2 < share < 0.3
    assert [in_panel(i, 0.25, 3) for i in ids] == [in_panel(i, 0.25, 3) for i in ids]
    assert [in_panel(i, 0.25, 3) for i in ids] != [in_panel(i, 0.25, 4) for i in ids]

    lm = load_model("tiny-llama")
    full = replay(
        RunConfig(model="tiny-llama", stream=str(stream_file), probe_every=2, editor_overrides=dict(TINY_FT)),
        tmp_path / "all",
        lm=lm,
        progress=False,
    ).run.results()
    lm = load_model("tiny-llama")
    part = replay(
        RunConfig(
            model="tiny-llama",
            stream=str(stream_file),
            editor_overrides=dict(TINY_FT),
            probes=["retention:schedule=every:2,fraction=0.5,seed=1"],
        ),
        tmp_path / "panel",
        lm=lm,
        progress=False,
    ).run.results()
    cols = ["step", "edit_id", "protocol", "value"]
    pick = (full["probe"] == "retention") & (full["metric"] == "retention")
    panel = part.filter((part["probe"] == "retention") & (part["metric"] == "retention"))
    assert 0 < panel.height < full.filter(pick).height
    assert all(in_panel(e, 0.5, 1) for e in panel["edit_id"])
    # Every entry probed equals the full matrix's entry.
    joined = panel.select(cols).join(full.filter(pick).select(cols), on=["step", "edit_id", "protocol"])
    assert joined.height == panel.height and (joined["value"] == joined["value_right"]).all()
