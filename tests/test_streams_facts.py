"""Fact sets (tiny files written in tmp_path), the built-in stream and the stream registry."""

import copy
import datetime as dt
import json
from pathlib import Path

import pytest

import streams
import streams.facts
from streams import (
    STREAMS,
    EditStream,
    FactSetError,
    Neighbor,
    builtin_stream,
    list_streams,
    load_fact_set,
    load_stream,
)

UTC = dt.timezone.utc

TINY = {
    "name": "tiny",
    "description": "two relations, four facts",
    "relations": [
        {
            "id": "capital",
            "template": "The capital of {} is",
            "paraphrases": ["{}'s capital city is", "The seat of government of {} is"],
            "candidates": ["Paris", "Berlin", "Rome", "Madrid"],
        },
        {
            "id": "language",
            "template": "The official language of {} is",
            "paraphrases": ["In {}, people speak", "The main language of {} is"],
            "candidates": ["French", "German", "Italian"],
        },
    ],
    "facts": [
        {
            "id": "capital-france",
            "subject": "France",
            "relation": "capital",
            "target_true": "Paris",
            "target_new": "Rome",
            "neighborhood": [{"prompt": "The capital of Germany is", "answer": "Berlin"}],
        },
        {
            "id": "capital-spain",
            "subject": "Spain",
            "relation": "capital",
            "target_true": "Madrid",
            "target_new": "Berlin",
            "neighborhood": [{"prompt": "The capital of Italy is", "answer": "Rome"}],
        },
        {
            "id": "language-france",
            "subject": "France",
            "relation": "language",
            "target_true": "French",
            "target_new": "German",
            "neighborhood": [{"prompt": "The official language of Italy is", "answer": "Italian"}],
        },
        {
            "id": "language-italy",
            "subject": "Italy",
            "relation": "language",
            "target_true": "Italian",
            "target_new": "French",
            "neighborhood": [],
        },
    ],
}


def write(tmp_path, data, name="facts.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def tiny_path(tmp_path) -> Path:
    return write(tmp_path, TINY)


@pytest.fixture
def tiny_builtin(tiny_path, monkeypatch) -> Path:
    """Make the tiny file stand in for the packaged built-in fact set."""
    monkeypatch.setattr(streams.facts, "_builtin_path", lambda: tiny_path)
    return tiny_path


def test_load_tiny_fact_set(tiny_path):
    fs = load_fact_set(tiny_path)
    assert fs.name == "tiny" and fs.description.startswith("two")
    assert list(fs.relations) == ["capital", "language"]
    assert [f.id for f in fs.facts] == [f["id"] for f in TINY["facts"]]
    fact = fs.facts[0]
    assert fact.relation is fs.relations["capital"]
    assert fact.neighborhood == (Neighbor("The capital of Germany is", "Berlin"),)
    assert fs.relations["capital"].paraphrases == ("{}'s capital city is", "The seat of government of {} is")


def test_fact_to_edit(tiny_path):
    fact = load_fact_set(tiny_path).facts[0]
    t = dt.datetime(2024, 3, 1, tzinfo=UTC)
    e = fact.to_edit(t)
    assert (e.id, e.timestamp, e.subject, e.relation_id) == ("capital-france", t, "France", "capital")
    assert e.prompt == "The capital of {} is" and e.rendered_prompt == "The capital of France is"
    assert (e.target_true, e.target_new) == ("Paris", "Rome")
    assert e.paraphrases == ("France's capital city is", "The seat of government of France is")
    assert e.candidates == ("Paris", "Berlin", "Rome", "Madrid")
    assert e.neighborhood == fact.neighborhood and e.chain is None


def broken(mutate):
    data = copy.deepcopy(TINY)
    mutate(data)
    return data


def set_fact(i, **kw):
    return lambda d: d["facts"][i].update(kw)


def set_rel(i, **kw):
    return lambda d: d["relations"][i].update(kw)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            set_fact(1, relation="population"),
            "fact 'capital-spain': unknown relation 'population' (known: capital, language)",
        ),
        (
            set_fact(1, target_new="Lisbon"),
            "fact 'capital-spain': target_new 'Lisbon' is not among relation 'capital''s candidates",
        ),
        (set_fact(1, target_true="Lisbon"), "fact 'capital-spain': target_true 'Lisbon' is not among"),
        (set_fact(1, target_new="Madrid"), "fact 'capital-spain': target_new equals target_true"),
        (set_fact(1, subject=" "), "fact 'capital-spain': subject must be a non-empty string"),
        (set_fact(1, id="capital-france"), "fact 'capital-france': duplicate fact id"),
        (set_fact(1, colour="red"), "fact 'capital-spain': unknown field(s) 'colour'"),
        (lambda d: d["facts"][1].pop("neighborhood"), "fact 'capital-spain': missing field(s) 'neighborhood'"),
        (set_fact(1, neighborhood=[{"prompt": "x"}]), "fact 'capital-spain': neighborhood[0] must be an object"),
        (
            set_fact(1, neighborhood=[{"prompt": "", "answer": "a"}]),
            "fact 'capital-spain': neighborhood[0]: neighbor prompt is empty",
        ),
        (set_rel(0, template="The capital is"), "relation 'capital': template 'The capital is' has no '{}'"),
        (set_rel(0, paraphrases=["{} capital", "Capital:"]), "relation 'capital': paraphrase 'Capital:' has no '{}'"),
        (set_rel(0, candidates=["Paris", "Paris", "Rome"]), "relation 'capital': candidates contain duplicates"),
        (set_rel(0, candidates="Paris"), "relation 'capital': candidates must be a list of non-empty strings"),
        (set_rel(1, id="capital"), "relation 'capital': duplicate relation id"),
        (lambda d: d["relations"][0].pop("paraphrases"), "relation 'capital': missing field(s) 'paraphrases'"),
        (lambda d: d.pop("facts"), "missing top-level field(s) 'facts'"),
        (lambda d: d.update(facts=[]), "facts must be a non-empty list"),
        (lambda d: d["facts"].append("oops"), "facts[4]: expected a JSON object"),
    ],
)
def test_fact_set_validation_errors(tmp_path, mutate, message):
    path = write(tmp_path, broken(mutate))
    with pytest.raises(FactSetError) as info:
        load_fact_set(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ")
    assert message in text
    assert "\n" not in text


def test_fact_set_invalid_json(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text('{"name": "x",')
    with pytest.raises(FactSetError, match=r"facts.json: invalid JSON"):
        load_fact_set(path)


def test_fact_set_error_is_value_error():
    assert issubclass(FactSetError, ValueError)


# -- the built-in stream and the registry ------------------------------------------------


def test_builtin_stream_one_edit_per_interval(tiny_builtin):
    s = builtin_stream()
    assert isinstance(s, EditStream) and s.name == "builtin" and len(s) == 4
    assert sorted(e.id for e in s) == sorted(f["id"] for f in TINY["facts"])
    assert [e.timestamp for e in s] == [
        dt.datetime(2024, 1, 1, tzinfo=UTC) + i * dt.timedelta(days=1) for i in range(4)
    ]
    assert len(s.steps()) == 4


def test_builtin_stream_order_is_seeded(tiny_builtin):
    order = lambda seed: [e.id for e in builtin_stream(order_seed=seed)]  # noqa: E731
    assert order(0) == order(0)
    assert len({tuple(order(seed)) for seed in range(10)}) > 1
    start = dt.datetime(2025, 6, 1, tzinfo=UTC)
    s = builtin_stream(start=start, interval=dt.timedelta(hours=1))
    assert s[0].timestamp == start and s[-1].timestamp == start + dt.timedelta(hours=3)
    assert builtin_stream().content_hash() == builtin_stream().content_hash()


def test_registry_and_list_streams():
    assert "builtin" in STREAMS
    desc, factory = STREAMS["builtin"]
    assert isinstance(desc, str) and desc and callable(factory)
    listed = list_streams()
    assert ("builtin", desc) in listed
    names = [name for name, _ in listed]
    assert names == sorted(names)
    assert [n for n in names if not n.startswith("dataset:")] == sorted(STREAMS)
    assert "dataset:counterfact" in names


def test_load_stream_by_name(tiny_builtin):
    assert [e.id for e in load_stream("builtin")] == [e.id for e in builtin_stream()]


def test_load_stream_by_path(tmp_path, tiny_builtin):
    path = tmp_path / "mine.jsonl"
    builtin_stream().to_jsonl(path)
    for spec in (str(path), path):
        s = load_stream(spec)
        assert s.name == "mine" and s.content_hash() == builtin_stream().content_hash()


def test_load_stream_unknown():
    with pytest.raises(ValueError) as info:
        load_stream("nope")
    assert str(info.value) == (
        "unknown stream 'nope': expected one of builtin, builtin-chains, dataset:NAME "
        "(see 'lifelong streams'), or a path to a .jsonl file"
    )


def test_load_stream_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_stream(str(tmp_path / "absent.jsonl"))


def test_streams_package_is_light():
    import subprocess
    import sys

    code = (
        "import sys, streams; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'lifelong', 'probes', 'transformers')); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the real packaged fact set ----------------------------------------------------------------


def test_packaged_builtin_facts():
    path = streams.facts._builtin_path()
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    fs = load_fact_set()
    assert len(fs.facts) >= 80
    assert len(fs.relations) >= 8
    for rel in fs.relations.values():
        assert len(rel.paraphrases) >= 2, rel.id
    for fact in fs.facts:
        assert fact.target_true in fact.relation.candidates, fact.id
        assert fact.target_new in fact.relation.candidates, fact.id
        assert fact.target_new != fact.target_true, fact.id
        assert fact.neighborhood, fact.id
    s = builtin_stream()
    assert len(s) == len(fs.facts) and len({e.relation_id for e in s[:20]}) > 1


def test_builtin_chains_stream():
    """builtin-chains: the built-in facts with 6 round chains over facts with several true objects and
    4 conflict chains (2 reverse, 2 composite) laid in, every chain complete by step 32."""
    from probes.base import chain_ends
    from probes.chains import chain_kinds

    s = load_stream("builtin-chains")
    assert s.name == "builtin-chains" and s.content_hash() == streams.builtin_chains_stream().content_hash()
    assert "builtin-chains" in dict(list_streams())
    tied = [e for e in s if e.chain is not None and e.chain.role == "tied-fact"]
    applied = EditStream([e for e in s if e not in tied])
    steps = [tuple(b) for b in applied.steps()]
    kinds = chain_kinds(steps, tied)
    assert sorted(kinds.values()) == ["composite"] * 2 + ["reverse"] * 2 + ["round"] * 6
    assert max(chain_ends(steps)) == 32 and len(chain_ends(steps)) == 10
    # The demo's 20 steps complete 3 round chains and 3 conflicts (2 reverse, 1 composite).
    early = chain_kinds(steps[:20], tied)
    assert sorted(early.values()) == ["composite", "reverse", "reverse", "round", "round", "round"]
    rounds = [e for e in s if e.chain is not None and e.chain.role == "round-out"]
    for e in rounds:  # Obj = candidates without the new object: the true objects, o first
        obj = [c for c in e.candidates if c != e.target_new]
        assert obj[0] == e.target_true and len(obj) > 1, e.id
    assert {e.subject for e in rounds} == {
        "Switzerland",
        "Belgium",
        "Canada",
        "Luxembourg",
        "Singapore",
        "the United States",
    }
    # every other built-in fact once, as a plain edit, in the builtin stream's order
    chained = {e.id for e in s if e.chain is not None}
    plain = [e.id for e in s if e.chain is None]
    base = [e.id for e in builtin_stream()]
    assert plain == [i for i in base if i in set(plain)] and len(base) - len(plain) == 6
    assert len(chained) == 6 * 2 + 2 * 2 + 2 * 3
    assert list(s) == list(streams.builtin_chains_stream())  # fixed seed: the same stream every time


def test_make_demo_probes_every_dashboard_panel_and_completes_chains():
    """`make demo`: perplexity, downstream and chain probes, and enough steps of builtin-chains for
    round chains (the distortion panel) and conflicts to complete."""
    import re
    import shlex

    from probes.chains import chain_kinds

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe is not None
    args = shlex.split(recipe.group(1).replace("\\\n", " "))
    assert args[args.index("--stream") + 1] == "builtin-chains"
    probes = {args[i + 1].split(":", 1)[0] for i, a in enumerate(args) if a == "--probe"}
    assert {"perplexity", "downstream", "chains"} <= probes
    n = int(args[args.index("--steps") + 1])
    s = load_stream("builtin-chains")
    tied = [e for e in s if e.chain is not None and e.chain.role == "tied-fact"]
    steps = [tuple(b) for b in EditStream([e for e in s if e not in tied]).steps()][:n]
    kinds = list(chain_kinds(steps, tied).values())  # the chains complete within the n steps
    assert {"round", "reverse", "composite"} <= set(kinds) and kinds.count("round") >= 2


def test_builtin_stream_unchanged_by_builtin_chains():
    """The builtin stream's first edits and size stay what runs were made with."""
    s = builtin_stream()
    assert len(s) == 113 and s.name == "builtin" and all(e.chain is None for e in s)
    assert s.content_hash() == "295c0e4511b05c0c"  # as before builtin-chains was added
