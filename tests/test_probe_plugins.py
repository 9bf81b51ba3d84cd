"""A probe of one's own is one file: declared through an installed package's entry point (or named by
``module.path:Class``), it runs from the command line and shows in ``lifelong show`` and the dashboard,
with no change to the project."""

from __future__ import annotations

import textwrap

import pytest

from lifelong.cli import main
from lifelong.core.names import probe_name, unknown_probe
from lifelong.plots import dashboard_figure
from lifelong.run import RunDir
from tests.conftest import TINY_FT

PROBE_MODULE = '''
from probes import Probe, Row
from probes.metric_table import Metric


class TargetNLLProbe(Probe):
    """The new target's NLL for the edits of each step (a toy probe of a user's own)."""

    name = "target_nll"
    description = "Target NLL of each step's edits (a user's probe)"
    metrics = (Metric("target_nll", "nll", 0.0, float("inf"), "NLL of the new target, nats"),)

    def measure(self, ctx):
        pairs = [(e.rendered_prompt, e.target_new) for e in ctx.batch]
        scores = ctx.scorer.score(pairs)
        return [Row(self.name, "nll", "teacher_forced", float(v), e.id) for e, v in zip(ctx.batch, scores.nll)]
'''


@pytest.fixture
def installed_probe(tmp_path, monkeypatch):
    """A package on the path with a ``lifelong.probes`` entry point, as ``pip install`` would leave it."""
    site = tmp_path / "site"
    (site / "mine_probes").mkdir(parents=True)
    (site / "mine_probes" / "__init__.py").write_text(textwrap.dedent(PROBE_MODULE))
    dist = site / "mine_probes-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mine-probes\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lifelong.probes]\ntarget_nll = mine_probes:TargetNLLProbe\n")
    monkeypatch.syspath_prepend(str(site))
    return "target_nll"


def test_probe_spec_names():
    assert probe_name("perplexity:schedule=every:5,max_tokens=64") == ("perplexity", "schedule=every:5,max_tokens=64")
    assert probe_name("mine.probes:MyProbe") == ("mine.probes:MyProbe", "")
    assert probe_name("mine.probes:MyProbe:schedule=every:2") == ("mine.probes:MyProbe", "schedule=every:2")
    assert unknown_probe("mine.probes:MyProbe") is None  # loaded (and refused if absent) on use
    assert "unknown probe 'perplexty'" in unknown_probe("perplexty:max_tokens=3")


@pytest.mark.parametrize("spec", ["target_nll", "mine_probes:TargetNLLProbe:schedule=every:1"])
def test_an_installed_probe_runs_and_shows_in_the_summary_and_dashboard(
    installed_probe, spec, tmp_path, stream_file, capsys
):
    out = tmp_path / "run"
    sets = [f"--set={k}={v}" for k, v in TINY_FT.items()]
    argv = ["replay", "--model", "tiny-llama", "--stream", str(stream_file), "--steps", "2", "--probe", spec]
    assert main([*argv, *sets, "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    run = RunDir(out)
    rows = run.results().filter(run.results()["probe"] == "target_nll")
    assert rows.height == 2 and set(rows["step"].to_list()) == {1, 2}
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "target_nll: nll at last step" in shown and "teacher_forced" in shown
    figure = dashboard_figure(run)
    assert "Target NLL of each step's edits (a user's probe)" in [ax.get_title() for ax in figure.axes]
    # The run resumes and repeats from its manifest with the probe named as it was given.
    assert main(["replay", "--config", str(out), "--out", str(out), "--quiet"]) == 0
    assert main(["probes"]) == 0 and "target_nll" in capsys.readouterr().out


def test_a_probe_class_that_cannot_be_loaded_is_one_line(tmp_path, stream_file, capsys):
    code = main(
        ["replay", "--model", "tiny-llama", "--stream", str(stream_file), "--probe", "no_such_pkg:Probe"]
        + ["--out", str(tmp_path / "r")]
    )
    assert code == 2 and "probe class no_such_pkg:Probe: cannot be loaded" in capsys.readouterr().err
