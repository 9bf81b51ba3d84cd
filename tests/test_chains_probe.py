"""The chain probe (probes/chains.py): plans, schedule, hand-computed values on a tiny model, replay rows."""

from __future__ import annotations

import math
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifelong.core.models import load_model
from lifelong.core.scorer import Scorer, Scores
from lifelong.replay import checkout, replay
from lifelong.run import RunConfig
from probes import ProbeContext, Schedule, make_probe
from probes import distortion as dm
from probes.base import chain_ends
from probes.chains import ChainProbe, ConflictPlan, RoundPlan, chain_plans
from streams import ChainLink, Edit, EditStream
from tests.conftest import TINY_FT

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
C, L = "completion;p=meantok", "later;p=meantok"  # the default p: exp(-mean token NLL), as the Pitfalls code


def ed(eid, day, subject, prompt, new, true, chain=None, role=None, relation="r", paraphrases=(), candidates=()):
    return Edit(
        id=eid,
        timestamp=T0 + timedelta(days=day),
        subject=subject,
        relation_id=relation,
        prompt=prompt,
        target_new=new,
        target_true=true,
        paraphrases=paraphrases,
        candidates=candidates,
        chain=ChainLink(chain, role) if chain else None,
    )


def chain_stream() -> list[Edit]:
    """14 steps: a round chain (steps 1, 3), reverse (4, 5), composite with a tied fact (6, 7), coverage
    (8, 9), a 2-round chain (10, 11, 12) and plain fillers (2, 13, 14)."""
    cap = ("City", "Town", "Port", "Nova")
    cap2 = ("Rome", "Oslo", "Bern", "Nova", "Kyiv")
    return [
        ed(
            "r1-out",
            0,
            "Alpha",
            "The capital of {} is",
            "Nova",
            "City",
            "r1",
            "round-out",
            "capital",
            ("Alpha's capital city is",),
            cap,
        ),
        ed("f1", 1, "Beta", "The capital of {} is", "Town", "Port", relation="capital"),
        ed(
            "r1-back",
            2,
            "Alpha",
            "The capital of {} is",
            "City",
            "Nova",
            "r1",
            "round-back",
            "capital",
            ("Alpha's capital city is",),
            cap,
        ),
        ed(
            "rev-e1",
            3,
            "Gamma",
            "The work of {} is",
            "Opus",
            "Song",
            "rev",
            "conflict-e1",
            "work",
            ("Gamma is known for the work",),
        ),
        ed("rev-e2", 4, "Opus", "The creator of {} is", "Delta", "Gamma", "rev", "conflict-e2", "creator"),
        ed("comp-tied", 4.5, "Eps", "The mother of {} is", "Zeta", None, "comp", "tied-fact", "mother"),
        ed("comp-e1", 5, "Zeta", "The spouse of {} is", "Kappa", "Iota", "comp", "conflict-e1", "spouse"),
        ed("comp-e2", 6, "Eps", "The father of {} is", "Lambda", "Kappa", "comp", "conflict-e2", "father"),
        ed("cov-e1", 7, "Mu", "The home of {} is", "Nu", "Xi", "cov", "conflict-e1", "home"),
        ed("cov-e2", 8, "Mu", "The home of {} is", "Omi", "Nu", "cov", "conflict-e2", "home"),
        ed("r2-0", 9, "Omega", "The capital of {} is", "Nova", "Rome", "r2", "round-out", "capital", (), cap2),
        ed("r2-1", 10, "Omega", "The capital of {} is", "Kyiv", "Nova", "r2", "round-out", "capital", (), cap2),
        ed("r2-2", 11, "Omega", "The capital of {} is", "Rome", "Kyiv", "r2", "round-back", "capital", (), cap2),
        ed("f2", 12, "Sigma", "The capital of {} is", "Town", "Port", relation="capital"),
        ed("f3", 13, "Tau", "The capital of {} is", "Port", "Town", relation="capital"),
    ]


def split(edits):
    facts = tuple(e for e in edits if e.chain and e.chain.role == "tied-fact")
    steps = EditStream([e for e in edits if e not in facts]).steps()
    return steps, facts


def test_plans_find_each_chain_kind_and_its_steps():
    steps, facts = split(chain_stream())
    assert len(steps) == 14
    plans = chain_plans(steps, facts)
    assert set(plans) == {"r1", "rev", "comp", "cov", "r2"}
    r1, r2 = plans["r1"], plans["r2"]
    assert isinstance(r1, RoundPlan) and (r1.anchor_step, r1.end_step) == (1, 3)
    assert r1.objects == ("City", "Town", "Port") and r1.o_new == "Nova"
    assert r1.prompts == ("The capital of Alpha is", "Alpha's capital city is")
    # k-round: a = the last round-out step, o* its new object, every new object left out of Obj
    assert (r2.anchor_step, r2.end_step, r2.o, r2.o_new, r2.objects) == (
        11,
        12,
        "Rome",
        "Kyiv",
        ("Rome", "Oslo", "Bern"),
    )
    kinds = {cid: p.kind for cid, p in plans.items() if isinstance(p, ConflictPlan)}
    assert kinds == {"rev": "reverse", "comp": "composite", "cov": "coverage"}
    rev, comp, cov = plans["rev"], plans["comp"], plans["cov"]
    assert (rev.anchor_step, rev.end_step) == (4, 5)
    assert rev.implied == (("The work of Delta is", "Delta is known for the work"), "Opus")
    assert comp.implied == (("The spouse of Zeta is",), "Lambda") and comp.tied == (("The mother of Eps is",), "Zeta")
    assert cov.implied is None and cov.tied is None
    # a chain cut off by --steps is not a chain the probe measures
    assert "r2" not in chain_plans(steps[:11], facts)
    assert chain_ends(steps) == {3: ["r1"], 5: ["rev"], 7: ["comp"], 9: ["cov"], 12: ["r2"]}


def test_chains_schedule_is_due_where_a_chain_completes():
    steps, facts = split(chain_stream())
    sched = Schedule("chains")

    def ctx(k):
        return ProbeContext(
            step=k, timestamp=None, batch=steps[k - 1], history=list(steps[:k]), scorer=None, steps=steps
        )

    assert [k for k in range(1, 15) if sched.due(k, False, ctx(k))] == [3, 5, 7, 9, 12]
    assert sched.due(14, True, ctx(14)) and not sched.due(3, False, None)
    assert make_probe("chains:schedule=chains,remeasure=3").schedule.kind == "chains"


class Walk:
    """A tiny model whose step-k weights are θ0 plus k seeded perturbations of one MLP matrix, with a
    ``model_at`` like replay's (bitwise restore)."""

    def __init__(self, n_steps: int):
        self.lm = load_model("tiny-llama")
        self.scorer = Scorer(self.lm.model, self.lm.tokenizer)
        self.param = dict(self.lm.model.named_parameters())["model.layers.1.mlp.down_proj.weight"]
        gen = torch.Generator().manual_seed(0)
        w = self.param.detach().clone()
        self.states = [w.clone()]
        for _ in range(n_steps):
            w = w + 0.6 * w.std() * torch.randn(w.shape, generator=gen)
            self.states.append(w.clone())
        self.current = 0

    def set(self, k: int):
        with torch.no_grad():
            self.param.copy_(self.states[k])
        self.current = k

    def model_at(self, k: int):
        @contextmanager
        def at(j):
            now = self.current
            self.set(j)
            try:
                yield self.lm
            finally:
                self.set(now)

        return at

    def P(self, k: int, prompts, answer, prob: str = "meantok") -> float:
        """P_θk(answer | prompts) by hand: mean over the prompts of exp(-mean token NLL)
        (``seq``: of exp(joint log-prob))."""
        now = self.current
        self.set(k)
        s = self.scorer.score([(p, answer) for p in prompts])
        self.set(now)
        return float(np.mean(np.exp(s.logprob) if prob == "seq" else np.exp(-s.nll)))


def run_probe(walk: Walk, probe: ChainProbe, steps, facts, start: int = 1, reference=None):
    """Drive ``probe`` over the walk like replay does; returns (reference, rows by step)."""
    walk.set(0)
    if reference is None:
        ctx0 = ProbeContext(step=0, timestamp=None, batch=(), history=[], scorer=walk.scorer, steps=steps, facts=facts)
        reference, _ = probe.prepare(ctx0)
    out = {}
    for k in range(start, len(steps) + 1):
        walk.set(k)
        ctx = ProbeContext(
            step=k,
            timestamp=None,
            batch=steps[k - 1],
            history=list(steps[:k]),
            scorer=walk.scorer,
            reference=reference,
            is_last=k == len(steps),
            model_at=walk.model_at(k),
            steps=steps,
            facts=facts,
        )
        if probe.schedule.due(k, ctx.is_last, ctx):
            out[k] = probe.measure(ctx)
    return reference, out


@pytest.fixture(scope="module")
def walked():
    torch.set_num_threads(1)
    steps, facts = split(chain_stream())
    walk = Walk(len(steps))
    probe = ChainProbe("every:1", ChainProbe.Options(remeasure=4))
    reference, rows = run_probe(walk, probe, steps, facts)
    return walk, steps, facts, reference, rows


def as_table(rows_by_step):
    return {(k, r.metric, r.protocol, r.edit_id): r.value for k, rows in rows_by_step.items() for r in rows}


def test_values_equal_the_metric_functions_on_hand_scored_probabilities(walked):
    walk, steps, facts, reference, rows = walked
    got = as_table(rows)
    P = walk.P
    expected = {}
    # round chain r1: a = 1, b = 3
    pr = ("The capital of Alpha is", "Alpha's capital city is")
    obj = ("City", "Town", "Port")
    p0 = [P(0, pr, o) for o in obj]
    pb = [P(3, pr, o) for o in obj]
    expected[(3, "round_success", C, "r1")] = dm.round_success(
        P(1, pr, "City"), P(1, pr, "Nova"), P(3, pr, "City"), P(3, pr, "Nova")
    )
    expected[(3, "distortion_js", C, "r1")] = dm.js_divergence(pb, p0)
    expected[(3, "distortion_js_pitfalls", C, "r1")] = dm.js_divergence(pb, p0) / 3 * 100
    ir1 = dm.ignore_rate(p0[1:], pb[1:])
    expected[(3, "ignore_rate", C, "r1")] = ir1
    expected[(3, "failure_rate", C, None)] = float(ir1 > 0.5)
    # re-measured at 3 + 4 = 7: θa stays step 1, θb is now step 7
    p7 = [P(7, pr, o) for o in obj]
    expected[(7, "distortion_js", L, "r1")] = dm.js_divergence(p7, p0)
    expected[(7, "round_success", L, "r1")] = dm.round_success(
        P(1, pr, "City"), P(1, pr, "Nova"), P(7, pr, "City"), P(7, pr, "Nova")
    )
    # reverse: m = 4, b = 5
    e1 = ("The work of Gamma is", "Gamma is known for the work")
    e2 = ("The creator of Opus is",)
    implied = ("The work of Delta is", "Delta is known for the work")
    expected[(5, "conflict_score_explicit", C, "rev")] = float(P(5, e2, "Delta") > P(5, e1, "Opus"))
    expected[(5, "conflict_score_implicit", C, "rev")] = float(P(5, implied, "Opus") > P(5, e1, "Opus"))
    expected[(5, "conflict_magnitude", C, "rev")] = dm.conflict_magnitude(P(4, e1, "Opus"), P(5, e1, "Opus"))
    expected[(13, "conflict_magnitude", L, "rev")] = dm.conflict_magnitude(P(4, e1, "Opus"), P(13, e1, "Opus"))
    # composite: m = 6, b = 7, tied fact measured at θ0
    c1 = ("The spouse of Zeta is",)
    expected[(7, "conflict_score_implicit", C, "comp")] = float(P(7, c1, "Lambda") > P(7, c1, "Kappa"))
    expected[(7, "conflict_magnitude", C, "comp")] = dm.conflict_magnitude(P(6, c1, "Kappa"), P(7, c1, "Kappa"))
    tied = ("The mother of Eps is",)
    expected[(7, "tied_fact_damage", C + ";ref=theta0", "comp")] = dm.tied_fact_damage(
        P(0, tied, "Zeta"), P(7, tied, "Zeta")
    )
    # 2-round chain: a = 11 (o* = Kyiv), b = 12; FR now over both round chains
    pr2 = ("The capital of Omega is",)
    obj2 = ("Rome", "Oslo", "Bern")
    ir2 = dm.ignore_rate([P(0, pr2, o) for o in obj2[1:]], [P(12, pr2, o) for o in obj2[1:]])
    expected[(12, "round_success", C, "r2")] = dm.round_success(
        P(11, pr2, "Rome"), P(11, pr2, "Kyiv"), P(12, pr2, "Rome"), P(12, pr2, "Kyiv")
    )
    expected[(12, "ignore_rate", C, "r2")] = ir2
    expected[(12, "failure_rate", C, None)] = dm.failure_rate([ir1, ir2])
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key  # batch composition moves the last float bits
    # the walk is not trivial: the checks above compare varied numbers
    assert len({round(v, 6) for k, v in got.items() if k[1] == "conflict_magnitude"}) > 2


def test_rows_appear_at_completion_and_remeasure_steps_only(walked):
    _, _, _, _, rows = walked
    table = as_table(rows)
    completion = sorted({(k, e) for (k, m, p, e) in table if p == C and e})
    assert completion == [(3, "r1"), (5, "rev"), (7, "comp"), (9, "cov"), (12, "r2")]
    later = sorted({(k, e) for (k, m, p, e) in table if p == L and e})
    assert later == [
        (7, "r1"),
        (9, "rev"),
        (11, "comp"),
        (11, "r1"),
        (13, "cov"),
        (13, "rev"),
        (14, "comp"),
        (14, "cov"),
        (14, "r1"),
        (14, "r2"),
        (14, "rev"),
    ]
    metrics = {e: {m for (k, m, p, e2) in table if e2 == e and p == C} for e in ("r1", "rev", "comp", "cov")}
    assert metrics["r1"] == {"round_success", "distortion_js", "distortion_js_pitfalls", "ignore_rate"}
    assert metrics["rev"] == {"conflict_score_explicit", "conflict_score_implicit", "conflict_magnitude"}
    assert metrics["comp"] == metrics["rev"]  # TFD rows name their reference model: protocol C + ";ref=theta0"
    assert {m for (k, m, p, e) in table if e == "comp" and p == C + ";ref=theta0"} == {"tied_fact_damage"}
    assert not any(p.endswith("ref=thetam") for (k, m, p, e) in table)  # θm is the named variant, off by default
    assert metrics["cov"] == {"conflict_score_explicit", "conflict_magnitude"}


def test_checked_out_anchors_equal_remembered_ones(walked):
    """A chains-scheduled probe, and one started mid-run (a resume), check θa / θm and forgotten IRs
    out of the walk instead of remembering them, and must give the same rows."""
    walk, steps, facts, reference, rows = walked
    full = as_table(rows)
    sparse = ChainProbe("chains", ChainProbe.Options(remeasure=4))
    _, got = run_probe(walk, sparse, steps, facts, reference=reference)
    assert sorted(got) == [3, 5, 7, 9, 12, 14]
    for key, value in as_table(got).items():
        assert value == full[key], key
    resumed = ChainProbe("every:1", ChainProbe.Options(remeasure=4))
    _, late = run_probe(walk, resumed, steps, facts, start=5, reference=reference)
    late_table = as_table(late)
    assert late_table[(12, "failure_rate", C, None)] == full[(12, "failure_rate", C, None)]
    assert late_table == {k: v for k, v in full.items() if k[0] >= 5}


def test_sequence_and_token_probabilities_differ_only_in_p(walked):
    """prob=seq (whole-answer probability) is a named variant with its own protocol; the default is
    Pitfalls' per-token mean."""
    walk, steps, facts, _, rows = walked
    probe = ChainProbe("chains", ChainProbe.Options(prob="seq"))
    _, got = run_probe(walk, probe, steps, facts)
    pr = ("The capital of Alpha is", "Alpha's capital city is")
    walk.set(0)
    s0 = walk.scorer.score([(p, o) for o in ("City", "Town", "Port") for p in pr])
    walk.set(3)
    s3 = walk.scorer.score([(p, o) for o in ("City", "Town", "Port") for p in pr])
    seq = as_table(got)[(3, "distortion_js", "completion;p=seq", "r1")]
    assert seq == pytest.approx(
        dm.js_divergence(np.exp(s3.logprob).reshape(3, 2).mean(1), np.exp(s0.logprob).reshape(3, 2).mean(1)), rel=1e-5
    )
    p0 = np.exp(-s0.nll).reshape(3, 2).mean(1)
    p3 = np.exp(-s3.nll).reshape(3, 2).mean(1)
    meantok = as_table(rows)[(3, "distortion_js", C, "r1")]
    assert meantok == pytest.approx(dm.js_divergence(p3, p0), rel=1e-5)
    assert abs(meantok - seq) > 1e-6  # the tiny model's answers are several tokens: the kinds differ
    assert ChainProbe.Options(prob="token").prob == "meantok" and ChainProbe.Options(prob="sequence").prob == "seq"
    with pytest.raises(ValueError, match="meantok"):
        ChainProbe.Options(prob="joint")


class TableScorer:
    """A scorer whose log-probabilities come from a table per model state (for properties)."""

    def __init__(self, tables):
        self.tables, self.state = tables, 0

    def score(self, pairs):
        lp = np.array([self.tables[self.state][pair] for pair in pairs])
        n = len(pairs)
        return Scores(nll=-lp, logprob=lp, exact=np.zeros(n, bool), token_acc=np.zeros(n), argmax=[()] * n)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_metric_bounds_for_any_probabilities(data):
    steps, facts = split(chain_stream())
    pairs = sorted(
        {(p, a) for plan in chain_plans(steps, facts).values() for prompts, a in plan.queries() for p in prompts}
    )
    logp = st.floats(min_value=-60, max_value=0)
    tables = [{pair: data.draw(logp) for pair in pairs} for _ in range(len(steps) + 1)]
    scorer = TableScorer(tables)

    @contextmanager
    def at(k):
        now = scorer.state
        scorer.state = k
        try:
            yield None
        finally:
            scorer.state = now

    probe = ChainProbe("every:1", ChainProbe.Options(remeasure=2))
    reference, _ = probe.prepare(
        ProbeContext(step=0, timestamp=None, batch=(), history=[], scorer=scorer, steps=steps, facts=facts)
    )
    rows = []
    for k in range(1, len(steps) + 1):
        scorer.state = k
        rows += probe.measure(
            ProbeContext(
                step=k,
                timestamp=None,
                batch=steps[k - 1],
                history=list(steps[:k]),
                scorer=scorer,
                reference=reference,
                is_last=k == len(steps),
                model_at=lambda j: at(j),
                steps=steps,
                facts=facts,
            )
        )
    # IR and D of r1 from the table itself (Obj = City, Town, Port; θ0 = table 0, θb = table 3)
    prompts = ("The capital of Alpha is", "Alpha's capital city is")
    P = lambda k, o: float(np.mean([np.exp(tables[k][(x, o)]) for x in prompts]))  # noqa: E731
    objs = ("City", "Town", "Port")
    r1 = {r.metric: r.value for r in rows if r.edit_id == "r1" and r.protocol == C}
    assert r1["ignore_rate"] == dm.ignore_rate([P(0, o) for o in objs[1:]], [P(3, o) for o in objs[1:]])
    assert r1["distortion_js"] == dm.js_divergence([P(3, o) for o in objs], [P(0, o) for o in objs])
    by = {}
    for r in rows:
        by.setdefault(r.metric, []).append(r.value)
    assert set(by["round_success"]) <= {0.0, 0.5, 1.0}
    assert all(0 <= v <= math.log(2) + 1e-12 for v in by.get("distortion_js", []))
    assert all(0 <= v <= 1 for m in ("ignore_rate", "failure_rate") for v in by[m])
    assert all(v in (0.0, 1.0) for m in ("conflict_score_explicit", "conflict_score_implicit") for v in by[m])
    assert all(-1 <= v <= 1 for v in by["conflict_magnitude"])
    assert all(v <= 1 for v in by["tied_fact_damage"])


def test_replay_with_chain_probe_end_to_end(tmp_path):
    """FT replay of the chain stream (tied fact included in the file): rows at the completion steps, and
    CM's θm is the delta store's model at e1's step."""
    path = tmp_path / "chains.jsonl"
    EditStream(chain_stream()).to_jsonl(path)
    cfg = RunConfig(
        model="tiny-llama",
        stream=str(path),
        steps=9,
        probe_every=9,
        editor_overrides=dict(TINY_FT),
        probes=["chains:remeasure=2"],
    )
    result = replay(cfg, tmp_path / "run", progress=False)
    assert result.total_steps == 9
    rows = result.run.results().filter(pl.col("probe") == "chains")
    done = rows.filter(pl.col("protocol") == C).select("step", "edit_id").unique().sort("step")
    assert set(done.rows()) == {(3, "r1"), (3, None), (5, "rev"), (7, "comp"), (9, "cov")}
    assert set(rows.filter(pl.col("protocol") == L)["step"]) == {5, 7, 9}

    def p_at(step, prompts, answer):
        lm = checkout(result.run.path, step)
        s = Scorer(lm.model, lm.tokenizer).score([(p, answer) for p in prompts])
        return float(np.mean(np.exp(-s.nll)))

    e1 = ("The spouse of Zeta is",)
    cm = rows.filter(
        (pl.col("metric") == "conflict_magnitude") & (pl.col("edit_id") == "comp") & (pl.col("protocol") == C)
    )["value"].item()
    assert cm == pytest.approx(dm.conflict_magnitude(p_at(6, e1, "Kappa"), p_at(7, e1, "Kappa")), rel=1e-5)
    tfd = rows.filter(pl.col("metric") == "tied_fact_damage").filter(pl.col("step") == 7)["value"].item()
    tied = ("The mother of Eps is",)
    assert tfd == pytest.approx(
        dm.tied_fact_damage(p_at(0, tied, "Zeta"), p_at(7, tied, "Zeta")), rel=1e-4
    )  # a tiny θ0 probability amplifies float noise

    # the summary and the plots include the chain metrics
    from lifelong.plots import plot_run
    from lifelong.summary import summary_table

    table = summary_table(result.run)
    lines = dict(zip(zip(table["measure"], table["protocol"]), table["value"]))
    cms = rows.filter((pl.col("metric") == "conflict_magnitude") & (pl.col("protocol") == C))["value"]
    assert lines[("conflict magnitude (CM)", C)] == pytest.approx(cms.mean())
    assert lines[("failure rate (FR)", C)] in (0.0, 1.0)  # one round chain
    assert ("tied fact damage (TFD)", "last;p=meantok;ref=theta0") in lines
    assert result.run.plots_dir / "chains.png" in plot_run(result.run)


class TokenScorer:
    """Given per-token probabilities of each (prompt, answer) per model state: nll = mean −log p_j,
    logprob = Σ log p_j, as the real scorer computes them."""

    def __init__(self, tables):
        self.tables, self.state = tables, 0

    def score(self, pairs):
        toks = [np.array(self.tables[self.state][pair]) for pair in pairs]
        n = len(pairs)
        nll = np.array([-np.log(t).mean() for t in toks])
        return Scores(
            nll=nll,
            logprob=np.array([np.log(t).sum() for t in toks]),
            exact=np.zeros(n, bool),
            token_acc=np.zeros(n),
            argmax=[()] * n,
        )


def two_step_rows(probe, tables, steps, facts) -> list:
    """The probe's rows over a two-step stream scored from ``tables`` (θ0, after step 1, after step 2)."""
    scorer = TokenScorer(tables)
    reference, _ = probe.prepare(
        ProbeContext(step=0, timestamp=None, batch=(), history=[], scorer=scorer, steps=steps, facts=facts)
    )
    rows = []
    for k in (1, 2):
        scorer.state = k
        rows += probe.measure(
            ProbeContext(
                step=k,
                timestamp=None,
                batch=steps[k - 1],
                history=list(steps[:k]),
                scorer=scorer,
                reference=reference,
                is_last=k == 2,
                steps=steps,
                facts=facts,
            )
        )
    return rows


@pytest.mark.parametrize("prob, cm, cs", [("meantok", 0.5, 0.0), ("seq", 0.875, 1.0)])
def test_three_token_object_conflict_magnitude_by_hand(prob, cm, cs):
    """Coverage chain Mu: Xi → Nu (step 1) → Omi (step 2). o1* = Nu is three tokens, each p = 1 after
    e1 and 0.5 after e2; o2* = Omi is one token, p = 0.3 after e2.
    meantok (Pitfalls): P_m(Nu) = 1, P_b(Nu) = exp(−mean(−log 0.5)) = 0.5 → CM = (1 − 0.5)/1 = 0.5;
    CS = 1{0.3 > 0.5} = 0. seq: P_b(Nu) = 0.5³ = 0.125 → CM = 0.875; CS = 1{0.3 > 0.125} = 1."""
    edits = [
        ed("e1", 0, "Mu", "The home of {} is", "Nu", "Xi", "cov", "conflict-e1", "home"),
        ed("e2", 1, "Mu", "The home of {} is", "Omi", "Nu", "cov", "conflict-e2", "home"),
    ]
    steps, facts = split(edits)
    x = "The home of Mu is"
    tables = [{}, {(x, "Nu"): (1.0, 1.0, 1.0), (x, "Omi"): (0.1,)}, {(x, "Nu"): (0.5, 0.5, 0.5), (x, "Omi"): (0.3,)}]
    rows = two_step_rows(ChainProbe("every:1", ChainProbe.Options(prob=prob)), tables, steps, facts)
    got = {(r.metric, r.protocol): r.value for r in rows}
    assert got[("conflict_magnitude", f"completion;p={prob}")] == pytest.approx(cm)
    assert got[("conflict_score_explicit", f"completion;p={prob}")] == cs


@pytest.mark.parametrize(
    "tfd_ref, expected",
    [("theta0", {"theta0": 0.75}), ("thetam", {"thetam": 0.5}), ("both", {"theta0": 0.75, "thetam": 0.5})],
)
def test_tied_fact_damage_reference_by_hand(tfd_ref, expected):
    """Composite chain: tied fact k_f = (Eps, mother, Zeta) at P 0.4 under θ0, 0.2 after e1 (θm, step 1),
    0.1 after e2 (θb, step 2). ref=theta0 (the Pitfalls code's summarize.py, default):
    (0.4 − 0.1)/0.4 = 0.75; ref=thetam (the paper's equation): (0.2 − 0.1)/0.2 = 0.5."""
    edits = [
        ed("t", 0, "Eps", "The mother of {} is", "Zeta", None, "comp", "tied-fact", "mother"),
        ed("e1", 0, "Zeta", "The spouse of {} is", "Kappa", "Iota", "comp", "conflict-e1", "spouse"),
        ed("e2", 1, "Eps", "The father of {} is", "Lambda", "Kappa", "comp", "conflict-e2", "father"),
    ]
    steps, facts = split(edits)
    t, c1, c2 = "The mother of Eps is", "The spouse of Zeta is", "The father of Eps is"
    base = {(c1, "Kappa"): (0.1,), (c1, "Lambda"): (0.1,), (c2, "Lambda"): (0.1,)}
    tables = [base | {(t, "Zeta"): (0.4,)}, base | {(t, "Zeta"): (0.2,)}, base | {(t, "Zeta"): (0.1,)}]
    rows = two_step_rows(ChainProbe("every:1", ChainProbe.Options(tfd_ref=tfd_ref)), tables, steps, facts)
    got = {r.protocol.rsplit("ref=", 1)[1]: r.value for r in rows if r.metric == "tied_fact_damage"}
    assert got == pytest.approx(expected)
    assert {r.protocol for r in rows if r.metric == "tied_fact_damage"} == {
        f"completion;p=meantok;ref={ref}" for ref in expected
    }
    with pytest.raises(ValueError, match="tfd_ref"):
        ChainProbe.Options(tfd_ref="theta1")


def test_replay_of_builtin_chains_gives_distortion_and_conflict_rows(tmp_path):
    """The demo's stream, chains back to back (gap 0): a tiny-model FT replay through the last chain
    has distortion and ignore rate for each of the 6 round chains and CM for each of the 4 conflicts."""
    from streams import builtin_chains_stream

    path = tmp_path / "builtin-chains.jsonl"
    builtin_chains_stream(gap=0, between=0).to_jsonl(path)
    cfg = RunConfig(
        model="tiny-llama",
        stream=str(path),
        steps=20,  # 6 round and 4 conflict chains of 2 applied edits each
        probe_every=20,
        editor_overrides=dict(TINY_FT),
        probes=["chains"],
    )
    result = replay(cfg, tmp_path / "run", progress=False)
    rows = result.run.results().filter((pl.col("probe") == "chains") & pl.col("protocol").str.starts_with(C))
    chains = lambda metric: set(rows.filter(pl.col("metric") == metric)["edit_id"])  # noqa: E731
    assert len(chains("distortion_js")) == 6 and chains("distortion_js") == chains("ignore_rate")
    assert len(chains("conflict_magnitude")) == 4
    assert len(chains("conflict_score_implicit")) == 4 and len(chains("tied_fact_damage")) == 2
    from lifelong.plots import _panels

    assert "distortion" in _panels(result.run.results())
