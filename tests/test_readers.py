"""Dataset readers (streams/readers/): small records written here, and the real files when present."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from streams.readers import (
    DATASETS,
    read_counterfact_easyedit,
    read_counterfact_rome,
    read_dataset,
    read_dyknow_edits,
    read_dyknow_facts,
    read_mquake,
    read_pitfalls_conflict,
    read_pitfalls_round,
    read_ripple_knowedit,
    read_zsre_knowedit,
    read_zsre_mend,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} not present")
UTC = datetime.timezone.utc


def write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def check_counts(report, read, used):
    assert (report.read, report.used, report.n_skipped) == (read, used, read - used)


# -- CounterFact ---------------------------------------------------------------------


def test_counterfact_rome(tmp_path):
    ok = {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "{} is located in",
            "relation_id": "P30",
            "target_new": {"str": "Antarctica"},
            "target_true": {"str": "Africa"},
            "subject": "Angola",
        },
        "paraphrase_prompts": ["Angola belongs to"],
        "neighborhood_prompts": ["South Africa is in"],
    }
    no_brace = json.loads(json.dumps(ok)) | {"case_id": 8}
    no_brace["requested_rewrite"]["prompt"] = "Angola is located in"
    empty = json.loads(json.dumps(ok)) | {"case_id": 9}
    empty["requested_rewrite"]["target_new"]["str"] = " "
    stream, report = read_counterfact_rome(write(tmp_path, "cf.json", [ok, no_brace, empty]))
    check_counts(report, 3, 1)
    e = stream[0]
    assert (e.id, e.subject, e.prompt, e.target_new, e.target_true) == (
        "cf-7",
        "Angola",
        "{} is located in",
        "Antarctica",
        "Africa",
    )
    assert e.neighborhood[0].answer == "Africa" and e.paraphrases == ("Angola belongs to",)
    assert e.timestamp == datetime.datetime(2024, 1, 1, tzinfo=UTC)
    assert [s[1] for s in report.skipped] == [8, 9]
    assert "no '{}'" in report.skipped[0][2] and "empty" in report.skipped[1][2]


def test_counterfact_easyedit(tmp_path):
    rows = [
        {
            "case_id": 0,
            "prompt": "The mother tongue of Danielle Darrieux is",
            "target_new": "English",
            "subject": "Danielle Darrieux",
            "ground_truth": "French",
            "rephrase_prompt": "Danielle Darrieux speaks",
            "locality_prompt": "Michel Rocard is a native speaker of",
            "locality_ground_truth": "French",
        },
        {
            "case_id": 1,
            "prompt": "The mother tongue of X is",
            "target_new": "English",
            "subject": "Nobody",
            "ground_truth": "French",
        },
        {
            "case_id": 2,
            "prompt": "The mother tongue of Y is",
            "target_new": "French",
            "subject": "Y",
            "ground_truth": "French",
        },
    ]
    stream, report = read_counterfact_easyedit(write(tmp_path, "cfe.json", rows))
    check_counts(report, 3, 1)
    e = stream[0]
    assert e.prompt == "The mother tongue of {} is" and e.rendered_prompt == rows[0]["prompt"]
    assert e.neighborhood[0].prompt == "Michel Rocard is a native speaker of"
    assert "not found in prompt" in report.skipped[0][2]
    assert "target_new equals target_true" in report.skipped[1][2]


# -- zsRE ---------------------------------------------------------------------------------


def test_zsre_mend(tmp_path):
    rows = [
        {
            "subject": "UniFirst",
            "src": "What is the product made by UniFirst?",
            "pred": "uniform",
            "rephrase": "What will be the product of UniFirst?",
            "alt": "unmanned aircraft",
            "answers": ["uniform"],
            "loc": "nq question: who played walter",
            "loc_ans": "John Goodman",
            "cond": "...",
        },
        {"subject": "Foo", "src": "What is Foo?", "alt": "", "answers": ["bar"]},
    ]
    stream, report = read_zsre_mend(write(tmp_path, "z.json", rows))
    check_counts(report, 2, 1)
    e = stream[0]
    assert (e.prompt, e.target_new, e.target_true) == (
        "What is the product made by {}?",
        "unmanned aircraft",
        "uniform",
    )
    assert e.neighborhood[0].prompt == "who played walter" and e.paraphrases == (
        "What will be the product of UniFirst?",
    )
    assert report.skipped[0][1] == 1 and "alt is empty" in report.skipped[0][2]


def test_zsre_knowedit_and_portability(tmp_path):
    rows = [
        {
            "subject": "Epaspidoceras",
            "target_new": "Noctuidae",
            "prompt": "Which family does Epaspidoceras belong to?",
            "ground_truth": ["Aspidoceratidae"],
            "rephrase_prompt": "What family are Epaspidoceras?",
            "locality": {
                "Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]}]
            },
            "portability": {"Reasoning": [{"prompt": "Common name?", "ground_truth": "Owlet moths"}]},
        },
        {"subject": "Q", "target_new": "A", "prompt": "Which?", "ground_truth": ["B"]},
    ]
    stream, report = read_zsre_knowedit(write(tmp_path, "zk.json", rows))
    check_counts(report, 2, 1)
    e = stream[0]
    assert e.target_true == "Aspidoceratidae" and e.neighborhood[0].answer == "genus"
    assert report.extras["portability"][e.id] == [("Reasoning", "Common name?", "Owlet moths")]


# -- RippleEdits / KnowEdit ---------------------------------------------------------------------


def test_ripple_knowedit_alias_lists_and_no_ground_truth(tmp_path):
    rows = [
        {
            "subject": "Ingrīda Amantova",
            "prompt": "The gender of Ingrīda Amantova is",
            "target_new": "female",
            "portability": {},
            "locality": {
                "Relation_Specificity": [
                    {"prompt": "The country of Ingrīda Amantova is", "ground_truth": [["Soviet Union", "USSR"]]}
                ]
            },
        },
        {"subject": "S", "prompt": "The thing is", "target_new": "x"},
    ]
    stream, report = read_ripple_knowedit(write(tmp_path, "wiki_recent_train.json", rows))
    check_counts(report, 2, 1)
    e = stream[0]
    assert e.target_true is None and e.neighborhood[0].answer == "Soviet Union"
    assert e.id == "ripple-wiki_recent_train-0"


# -- MQuAKE ----------------------------------------------------------------------------------


def _rw(subject, new, true, prompt="{} is a citizen of"):
    return {
        "prompt": prompt,
        "relation_id": "P27",
        "subject": subject,
        "target_new": {"str": new},
        "target_true": {"str": true},
        "question": f"What is the country of citizenship of {subject}?",
    }


def test_mquake_chains_and_multi_hop_extras(tmp_path):
    rows = [
        {
            "case_id": 1,
            "requested_rewrite": [_rw("Ellie Kemper", "Croatia", "USA"), _rw("Croatia", "X", "Y", "{} is ruled by")],
            "questions": ["Who heads the country of Ellie Kemper?"],
            "answer": "Trump",
            "answer_alias": ["DJT"],
            "new_answer": "Kolinda",
            "new_answer_alias": [],
        },
        {
            "case_id": 2,
            "requested_rewrite": [_rw("A", "B", "C"), _rw("D", "E", "F", "no placeholder")],
            "questions": ["?"],
            "answer": "a",
            "new_answer": "b",
        },
    ]
    stream, report = read_mquake(write(tmp_path, "mq.json", rows))
    check_counts(report, 2, 1)
    assert report.edits == 2 and [e.id for e in stream] == ["mquake-1-0", "mquake-1-1"]
    assert {e.chain.role for e in stream} == {"multi-hop"} and {e.chain.chain_id for e in stream} == {"mquake-1"}
    case = report.extras["multi_hop"]["mquake-1"]
    assert case.new_answer == "Kolinda" and case.edit_ids == ("mquake-1-0", "mquake-1-1")
    assert report.skipped[0][1] == 2  # the whole case goes, not half of it


# -- Pitfalls ------------------------------------------------------------------------------------


def _node(label):
    return {"id": "Q" + label, "label": label}


def _rel(pid, prompt):
    return {"id": pid, "prompt": prompt, "query": "?", "label": pid}


def test_pitfalls_round(tmp_path):
    write(tmp_path, "round_prompts.json", {"P69": ["{} studied at", "{} attended"]})
    rows = [
        {
            "type": "1-3@P69",
            "edit": {
                "relation": _rel("P69", "{} was educated at"),
                "subject": _node("Cary"),
                "object": _node("Duarte"),
                "new_object": _node("Klagenfurt"),
            },
            "true_objects": [_node("USC"), _node("Duarte"), _node("MIT")],
        },
        {
            "type": "1-2@P69",
            "edit": {
                "relation": _rel("P69", "{} was educated at"),
                "subject": _node("Bob"),
                "object": _node("Same"),
                "new_object": _node("Same"),
            },
            "true_objects": [],
        },
    ]
    stream, report = read_pitfalls_round(write(tmp_path, "easy.json", rows))
    check_counts(report, 2, 1)
    out, back = stream
    assert out.chain.role == "round-out" and back.chain.role == "round-back"
    assert out.chain.chain_id == back.chain.chain_id == "round-easy-0"
    assert (out.target_true, out.target_new, back.target_true, back.target_new) == (
        "Duarte",
        "Klagenfurt",
        "Klagenfurt",
        "Duarte",
    )
    assert report.extras["objects"]["round-easy-0"] == ("Duarte", "USC", "MIT")
    assert out.candidates == ("Duarte", "USC", "MIT", "Klagenfurt")
    assert out.paraphrases == ("Cary studied at", "Cary attended") and back.timestamp > out.timestamp


def _cedit(rel, s, o, new, true=None):
    d = {"relation": rel, "subject": _node(s), "object": _node(o), "new_object": _node(new)}
    if true:
        d["true_object"] = _node(true)
    return d


def test_pitfalls_conflict_composite_with_tied_fact(tmp_path):
    write(tmp_path, "conflict_prompts.json", {"P22": ["{}'s dad is"]})
    mother, spouse, father = (
        _rel("P25", "The mother of {} is"),
        _rel("P26", "The spouse of {} is"),
        _rel("P22", "The father of {} is"),
    )
    row = {
        "rule": "P25&P26>P22",
        "type": "composite",
        "prerequisites": [0],
        "triples": [{"relation": mother, "subject": _node("Josepha"), "object": _node("Theresa")}],
        "edits": [
            _cedit(spouse, "Theresa", "Francis", "Gena"),
            _cedit(father, "Josepha", "Francis", "John", true="Gena"),
        ],
    }
    broken = dict(row, edits=row["edits"][:1])
    stream, report = read_pitfalls_conflict(write(tmp_path, "composite_edit.json", [row, broken]))
    check_counts(report, 2, 1)
    assert [e.chain.role for e in stream] == ["tied-fact", "conflict-e1", "conflict-e2"]
    tied, e1, e2 = stream
    assert tied.target_new == "Theresa" and tied.target_true is None and tied.subject == "Josepha"
    assert e2.target_true == "Gena" and e2.paraphrases == ("Josepha's dad is",)
    assert report.extras["conflicts"]["composite-0"]["edits"]["conflict-e2"] == e2.id
    stream2, _ = read_pitfalls_conflict(tmp_path / "composite_edit.json", include_tied_fact=False)
    assert len(stream2) == 2


def test_pitfalls_conflict_reverse(tmp_path):
    work, creator = _rel("P800", "The notable work of {} is"), _rel("P170", "The creator of {} is")
    row = {
        "rule": "P800>P170",
        "type": "reverse",
        "prerequisites": [],
        "triples": [],
        "edits": [_cedit(work, "Goya", "May", "Bulls"), _cedit(creator, "Bulls", "Goya", "Strauss")],
    }
    stream, report = read_pitfalls_conflict(write(tmp_path, "reverse_edit.json", [row]))
    check_counts(report, 1, 1)
    assert [(e.chain.role, e.subject, e.target_new) for e in stream] == [
        ("conflict-e1", "Goya", "Bulls"),
        ("conflict-e2", "Bulls", "Strauss"),
    ]
    assert stream[0].paraphrases == ()  # no prompt file beside it


# -- DyKnow ----------------------------------------------------------------------------------------


def test_dyknow_edits_use_dataset_dates(tmp_path):
    rows = [
        {
            "prompt": "The CEO position at Amazon is currently held by",
            "target": "Andy Jassy",
            "subject": "CEO position at Amazon",
            "domain": "companies_byRevenue",
            "element": "Amazon",
            "attribute": None,
            "questions": {
                "generic": "The current CEO of Amazon is",
                "rephrased_2": "The CEO position at Amazon is currently held by",
            },
            "answers": [
                "Andy Jassy |S: +2021-07-06T00:00:00Z",
                "Jeff Bezos |S: +1996-05-00T00:00:00Z |E: +2021-07-05T00:00:00Z",
            ],
        },
        {"prompt": "P is", "target": "X", "subject": "Q", "answers": ["X |S: +2020-01-01T00:00:00Z"]},
    ]
    stream, report = read_dyknow_edits(write(tmp_path, "dk.json", rows))
    check_counts(report, 2, 1)
    e = stream[0]
    assert e.timestamp == datetime.datetime(2021, 7, 6, tzinfo=UTC)
    assert e.target_true == "Jeff Bezos" and e.paraphrases == ("The current CEO of Amazon is",)


def test_dyknow_facts_value_changes(tmp_path):
    data = {
        "countries_byGDP": {
            "Italy": {
                "President of Italy": {
                    "questions": {"generic": "The head of state in Italy is"},
                    "answers": [
                        "B |S: +2006-05-15T00:00:00Z |E: +2015-01-14T00:00:00Z",
                        "A |S: +1999-05-18T00:00:00Z",
                        "C |S: +2015-02-03T00:00:00Z",
                        "C |S: +2022-02-03T00:00:00Z",
                        "Z |E: +1990-01-01T00:00:00Z",
                    ],
                }
            }
        },
        "athletes_byPayment": {
            "Ronaldo": {
                "questions": {"generic": "Ronaldo plays for"},
                "answers": ["United |S: +2021-00-00T00:00:00Z", "Juventus |S: +2018-07-10T00:00:00Z"],
            }
        },
    }
    stream, report = read_dyknow_facts(write(tmp_path, "grc.json", data))
    # Italy: A->B, B->C, C->C (skipped), Z undated (skipped); Ronaldo: Juventus->United
    check_counts(report, 5, 3)
    assert [(e.target_true, e.target_new) for e in stream] == [("A", "B"), ("B", "C"), ("Juventus", "United")]
    assert stream[-1].timestamp == datetime.datetime(2021, 1, 1, tzinfo=UTC) and stream[-1].prompt == "{} plays for"
    reasons = " ".join(s[2] for s in report.skipped)
    assert "unchanged" in reasons and "no '|S:'" in reasons


def test_unknown_and_missing_datasets(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        read_dataset("nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_dataset("counterfact", data_dir=tmp_path)


def test_bad_json_is_one_clear_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        read_counterfact_rome(path)


# -- the real files --------------------------------------------------------------------------------

EXPECTED = {  # name: (read, used, edits) on the shared data as of writing
    "counterfact": (500, 500, 500),
    "counterfact_easyedit": (10000, 10000, 10000),
    "zsre_mend": (1000, 981, 981),
    "zsre": (1304, 1261, 1261),
    "mquake": (354, 354, 436),
    "pitfalls_round_easy": (2500, 2500, 5000),
    "pitfalls_round_hard": (2500, 2500, 5000),
    "pitfalls_reverse": (2500, 2500, 5000),
    "pitfalls_composite": (2000, 1976, 5928),
    "pitfalls_coverage": (2500, 2499, 4998),
    "ripple_recent": (570, 570, 570),
    "ripple_counterfact": (1428, 1422, 1422),
    "dyknow": (54, 54, 54),
    "dyknow_facts": (1021, 982, 982),
}


@needs_data
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_real_files(name):
    stream, report = read_dataset(name, DATA)
    assert report.read == report.used + report.n_skipped
    assert len(stream) == report.edits
    assert (report.read, report.used, report.edits) == EXPECTED[name]
    assert all(e.timestamp.tzinfo is not None for e in stream)
    for file, _where, reason in report.skipped:
        assert Path(file).exists() and reason


@needs_data
def test_real_file_values():
    cf, _ = read_dataset("counterfact", DATA)
    first = next(e for e in cf if e.id == "cf-20952") if any(e.id == "cf-20952" for e in cf) else cf[0]
    assert "{}" in first.prompt and first.target_true and first.neighborhood
    easy, rep = read_dataset("pitfalls_round_easy", DATA)
    out = easy[0]
    assert out.id == "round-easy-0-out" and out.subject == "fpart" and out.target_new == "franking"
    assert rep.extras["objects"]["round-easy-0"][0] == "data migration" and out.paraphrases
    comp, rep = read_dataset("pitfalls_composite", DATA)
    assert [e.chain.role for e in comp[:3]] == ["tied-fact", "conflict-e1", "conflict-e2"]
    assert comp[2].target_true == "Gena Rowlands" and comp[0].subject == "Archduchess Maria Josepha of Austria"
    mq, rep = read_dataset("mquake", DATA)
    assert mq[0].subject == "Ellie Kemper" and mq[0].target_new == "Croatia"
    assert rep.extras["multi_hop"]["mquake-1"].new_answer == "Kolinda Grabar-Kitarović"
    dk, _ = read_dataset("dyknow", DATA)
    amazon = next(e for e in dk if e.target_new == "Andy Jassy")
    assert amazon.timestamp == datetime.datetime(2021, 7, 6, tzinfo=UTC) and amazon.target_true == "Jeff Bezos"


@pytest.mark.skipif(not (DATA / "zsre").is_dir(), reason="../shared/data is absent")
def test_dataset_streams_by_name_warn_about_skipped_records():
    from streams import list_streams, load_stream

    assert "dataset:counterfact" in dict(list_streams())
    with pytest.warns(UserWarning, match=r"dataset:zsre: \d+ of 1304 records skipped"):
        stream = load_stream("dataset:zsre")
    assert len(stream) > 1000
