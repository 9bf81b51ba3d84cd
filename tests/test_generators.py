"""Chain generators (streams/generators.py) on small fact sets built here."""

from __future__ import annotations

import datetime

import pytest

from streams import FactSet
from streams.facts import Fact, Relation
from streams.generators import (
    coverage_chains,
    layout,
    plain_edits,
    reverse_chains,
    round_chains,
    round_chains_report,
    timestamps,
)

UTC = datetime.timezone.utc
CAP = Relation("capital", "The capital of {} is", ("{}'s capital is",), ("Paris", "Rome", "Berlin", "Madrid"))
CAPITAL_OF = Relation("capital_of", "{} is the capital of", (), ("France", "Italy", "Germany", "Spain"))
TWO = Relation("two", "{} is", (), ("yes", "no"))


def facts():
    return [
        Fact("fr", "France", CAP, "Paris", "Rome", ()),
        Fact("de", "Germany", CAP, "Berlin", "Madrid", ()),
        Fact("x", "X", TWO, "yes", "no", ()),
    ]


def fact_set():
    return FactSet("t", "test", {r.id: r for r in (CAP, CAPITAL_OF, TWO)}, tuple(facts()))


def fillers(n):
    rel = Relation("colour", "The colour of {} is", (), ("red", "blue"))
    return plain_edits([Fact(f"f{i}", f"Thing{i}", rel, "red", "blue", ()) for i in range(n)])


def test_round_chains_k1():
    chains = round_chains(facts())
    assert len(chains) == 3
    out, back = chains[0]
    assert (out.target_true, out.target_new, back.target_true, back.target_new) == ("Paris", "Rome", "Rome", "Paris")
    assert (out.chain.role, back.chain.role) == ("round-out", "round-back")
    assert out.chain.chain_id == back.chain.chain_id == "round-fr"
    assert out.paraphrases == ("France's capital is",)
    # Obj = the true objects of (s, r), o first, then the chain's new objects (as the Pitfalls reader);
    # this test used to pin candidates == the relation's candidates (false objects of France), the
    # former rule, now obj="relation"
    assert out.candidates == back.candidates == ("Paris", "Rome")


def test_round_chains_obj_is_the_true_objects_of_subject_and_relation():
    """A 1-to-N relation: France's 'city' facts give Obj = (Paris, Lyon), o first; o* = Rome stays out
    of Obj and is no true object; k = 2 draws its extra object among false candidates only."""
    from probes.chains import chain_plans

    city = Relation("city", "A city of {} is", (), ("Paris", "Lyon", "Rome", "Berlin", "Madrid"))
    fs = [
        Fact("fr1", "France", city, "Paris", "Rome", ()),
        Fact("fr2", "France", city, "Lyon", "Madrid", ()),
        Fact("de", "Germany", city, "Berlin", "Paris", ()),
    ]
    chains = round_chains(fs)
    assert [c[0].candidates for c in chains] == [
        ("Paris", "Lyon", "Rome"),
        ("Lyon", "Paris", "Madrid"),
        ("Berlin", "Paris"),
    ]
    plans = chain_plans([(e,) for c in chains for e in c])
    assert [plans[c[0].chain.chain_id].objects for c in chains] == [("Paris", "Lyon"), ("Lyon", "Paris"), ("Berlin",)]
    for seed in range(5):
        two = round_chains(fs[:2], k=2, seed=seed)
        assert two[0][1].target_new in ("Berlin", "Madrid")  # never Lyon, France's other true object
        assert plans_objects(two[0]) == ("Paris", "Lyon")
    # the former rule, named: Obj = o and the relation's other candidates
    old = round_chains(fs, obj="relation")
    assert plans_objects(old[0]) == ("Paris", "Lyon", "Berlin", "Madrid")
    assert [e.target_new for e in old[0]] == [e.target_new for e in chains[0]]
    # o* among the subject's true objects is no round edit away from the truth: left out, with a reason
    _, left = round_chains_report([Fact("a", "France", city, "Paris", "Lyon", ()), fs[1]])
    assert left == [("a", "target_new 'Lyon' is a true object of ('France', 'city')")]
    with pytest.raises(ValueError, match="obj"):
        round_chains(fs, obj="false")


def plans_objects(chain):
    from probes.chains import chain_plans

    return chain_plans([(e,) for e in chain])[chain[0].chain.chain_id].objects


def test_round_chains_k3_and_left_out():
    chains, left = round_chains_report(facts(), k=3, seed=1)
    assert [c[0].chain.chain_id for c in chains] == ["round-fr", "round-de"]
    assert left == [("x", "relation 'two' has too few candidates for a 3-round edit")]
    path = [chains[0][0].target_true] + [e.target_new for e in chains[0]]
    assert (
        path[0] == path[-1] == "Paris" and path[1] == "Rome" and len(set(path[1:-1])) == 3 and "Paris" not in path[1:-1]
    )
    assert [e.chain.role for e in chains[0]] == ["round-out"] * 3 + ["round-back"]
    assert all(a.target_new == b.target_true for a, b in zip(chains[0], chains[0][1:]))
    assert round_chains(facts(), k=3, seed=1) == chains  # seeded
    with pytest.raises(ValueError):
        round_chains(facts(), k=0)


def test_coverage_chains():
    chains = coverage_chains(fact_set(), seed=0)
    assert len(chains) == 2  # the 2-candidate relation cannot cover twice
    e1, e2 = chains[0]
    assert (e1.chain.role, e2.chain.role) == ("conflict-e1", "conflict-e2")
    assert e1.subject == e2.subject and e1.relation_id == e2.relation_id
    assert e1.target_new == e2.target_true == "Rome" and e2.target_new not in ("Paris", "Rome")


def test_reverse_chains():
    chains = reverse_chains(fact_set(), {"capital": "capital_of"}, seed=0)
    assert len(chains) == 2
    e1, e2 = chains[0]
    assert (e2.subject, e2.relation_id, e2.target_true) == ("Rome", "capital_of", "France")
    assert e2.target_new in ("Italy", "Germany", "Spain") and e2.rendered_prompt.startswith("Rome is the capital of")
    assert e2.chain == e1.chain.__class__("reverse-fr", "conflict-e2")
    with pytest.raises(ValueError):
        reverse_chains(facts(), {"capital": "capital_of"})


@pytest.mark.parametrize("gap", [0, 3, 100])
def test_layout_gap_between_chain_edits(gap):
    chains = round_chains(facts()[:2])
    stream = layout(chains, fillers(2 * gap + 5), gap=gap, name="g")
    ids = [e.id for e in stream]
    for chain in chains:
        a, b = ids.index(chain[0].id), ids.index(chain[1].id)
        assert b - a == gap + 1
    assert len(stream) == 4 + 2 * gap + 5 and len(stream.steps()) == len(stream)  # one edit per step
    assert all(e.chain is not None for e in stream)
    assert {e.chain.role for e in stream} >= {"round-out", "round-back", "plain"}
    assert stream.name == "g"


def test_layout_gap_range_between_and_errors():
    chains = round_chains(facts()[:2])
    stream = layout(chains, fillers(30), gap=(2, 5), between=4, seed=3)
    ids = [e.id for e in stream]
    for chain in chains:
        assert 3 <= ids.index(chain[1].id) - ids.index(chain[0].id) <= 6
    assert ids.index(chains[1][0].id) - ids.index(chains[0][1].id) == 5
    with pytest.raises(ValueError, match="not enough filler"):
        layout(chains, fillers(1), gap=1)
    with pytest.raises(ValueError):
        layout(chains, fillers(10), gap=-1)


def test_timestamps_regular_poisson_given():
    start = datetime.datetime(2024, 3, 1, tzinfo=UTC)
    reg = timestamps(3, start=start, interval=datetime.timedelta(hours=2))
    assert reg == [start, start + datetime.timedelta(hours=2), start + datetime.timedelta(hours=4)]
    p1 = timestamps(200, "poisson", start=start, seed=5)
    assert p1 == timestamps(200, "poisson", start=start, seed=5) and p1 != timestamps(
        200, "poisson", start=start, seed=6
    )
    assert all(b > a for a, b in zip(p1, p1[1:])) and p1[0] == start
    mean_gap = (p1[-1] - p1[0]).total_seconds() / 199 / 86400
    assert 0.7 < mean_gap < 1.3
    chains = round_chains(facts()[:1])
    given = [start, start + datetime.timedelta(days=9)]
    stream = layout(chains, times=given)
    assert [e.timestamp for e in stream] == given
    with pytest.raises(ValueError):
        layout(chains, times=[start])
    with pytest.raises(ValueError):
        layout(chains, times=[start, start])
    with pytest.raises(ValueError):
        timestamps(2, "weekly")
    assert len(layout(chains, fillers(3), gap=1, times="poisson", seed=2)) == 5


def test_builtin_fact_set_rounds():
    from streams import load_fact_set

    fs = load_fact_set()
    chains = round_chains(fs, k=2)
    stream = layout(chains, gap=0)
    assert len(stream) == 3 * len(chains) and len(chains) > 0


CITY = Relation("city_country", "The city of {} is in the country of", ("{} lies in",), ("France", "Italy", "Spain"))
CITY_CAP = Relation("city_capital", "The capital of the country of {} is", (), ("Paris", "Rome", "Berlin", "Madrid"))


def test_composite_chains_carry_their_tied_fact():
    from streams.generators import composite_chains

    fs = FactSet(
        "t",
        "test",
        {r.id: r for r in (CAP, CITY, CITY_CAP)},
        (Fact("lyon", "Lyon", CITY, "France", "Italy", ()), Fact("fr", "France", CAP, "Paris", "Rome", ())),
    )
    (chain,) = composite_chains(fs, [("city_country", "capital", "city_capital")], seed=1)
    tied, e1, e2 = chain
    assert [e.chain.role for e in chain] == ["tied-fact", "conflict-e1", "conflict-e2"]
    assert len({e.chain.chain_id for e in chain}) == 1
    assert (tied.subject, tied.target_new, tied.target_true) == ("Lyon", "France", None)
    assert (e1.subject, e1.target_true, e1.target_new) == ("France", "Paris", "Rome")
    assert (e2.subject, e2.prompt, e2.target_true) == ("Lyon", CITY_CAP.template, "Rome")
    assert e2.target_new in ("Berlin", "Madrid")
    assert composite_chains(fs, [("capital", "city_country", "city_capital")]) == []  # no fact links them
    with pytest.raises(ValueError, match="'nope' is not in relations"):
        composite_chains(fs, [("city_country", "capital", "nope")])


def test_multihop_chains_follow_the_new_object():
    from streams.generators import chains_of, multihop_chains

    rome = Fact("rome", "Rome", CAPITAL_OF, "Italy", "Spain", ())
    chains = multihop_chains([*facts(), rome])
    assert [[(e.subject, e.target_true, e.target_new) for e in c] for c in chains] == [
        [("France", "Paris", "Rome"), ("Rome", "Italy", "Spain")]
    ]
    assert {e.chain.role for e in chains[0]} == {"multi-hop"}
    stream = layout(chains + plain_edits(facts()[1:2]), gap=0)
    assert [tuple(e.id for e in c) for c in chains_of(stream)] == [
        ("multihop-fr-rome-0", "multihop-fr-rome-1"),
        ("plain-de",),
    ]
