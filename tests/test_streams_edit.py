"""Edit: validation at construction, dict round trip, error messages that name their source."""

import datetime as dt

import pytest

from streams import ROLES, ChainLink, Edit, EditError, Neighbor

UTC = dt.timezone.utc
T0 = dt.datetime(2024, 1, 5, tzinfo=UTC)


def make(**overrides) -> Edit:
    fields = dict(
        id="capital-france",
        timestamp=T0,
        subject="France",
        relation_id="capital",
        prompt="The capital of {} is",
        target_new="Rome",
        target_true="Paris",
    )
    fields.update(overrides)
    return Edit(**fields)


def full_dict(**overrides) -> dict:
    d = make(
        paraphrases=["France's capital city is"],
        neighborhood=[Neighbor("The capital of Germany is", "Berlin")],
        candidates=["Paris", "Rome", "Berlin"],
        chain=ChainLink("c1", "round-out"),
    ).to_dict()
    d.update(overrides)
    return d


# -- construction ----------------------------------------------------------------


def test_minimal_edit_and_defaults():
    e = make(target_true=None)
    assert e.paraphrases == () and e.neighborhood == () and e.candidates == ()
    assert e.chain is None and e.target_true is None


def test_rendered_prompt_uses_replace_not_format():
    e = make(subject="{weird} {0} name", prompt="About {}: the capital is")
    assert e.rendered_prompt == "About {weird} {0} name: the capital is"


def test_lists_become_tuples_and_edit_is_hashable():
    e = make(paraphrases=["a France", "b France"], candidates=["Rome", "Paris"], neighborhood=[Neighbor("p", "a")])
    assert e.paraphrases == ("a France", "b France")
    assert e.candidates == ("Rome", "Paris")
    assert e.neighborhood == (Neighbor("p", "a"),)
    assert hash(e) == hash(
        make(paraphrases=("a France", "b France"), candidates=("Rome", "Paris"), neighborhood=(Neighbor("p", "a"),))
    )


def test_naive_timestamp_is_taken_as_utc():
    e = make(timestamp=dt.datetime(2024, 1, 5, 12))
    assert e.timestamp == dt.datetime(2024, 1, 5, 12, tzinfo=UTC)
    assert e.timestamp.tzinfo is UTC


def test_aware_timestamp_is_converted_to_utc():
    plus_two = dt.timezone(dt.timedelta(hours=2))
    e = make(timestamp=dt.datetime(2024, 1, 5, 12, tzinfo=plus_two))
    assert e.timestamp.tzinfo is UTC and e.timestamp.hour == 10


def test_edit_is_frozen():
    e = make()
    with pytest.raises(AttributeError):
        e.subject = "Spain"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(id=""), "edit id is empty"),
        (dict(id="  "), "edit id is empty"),
        (dict(id=3), "edit id must be a string"),
        (dict(subject=" "), "edit 'capital-france': subject is empty"),
        (dict(subject=None), "subject must be a string"),
        (dict(relation_id=""), "relation_id is empty"),
        (dict(prompt="The capital of France is"), "has no '{}'"),
        (dict(target_new=""), "edit 'capital-france': target_new is empty"),
        (dict(target_new="  \t"), "target_new is empty"),
        (dict(target_true=""), "target_true is empty"),
        (dict(target_true="Rome"), "target_new equals target_true"),
        (dict(target_true=" Rome "), "target_new equals target_true"),
        (dict(timestamp="2024-01-05"), "timestamp must be a datetime"),
        (dict(timestamp=dt.date(2024, 1, 5)), "timestamp must be a datetime"),
        (dict(paraphrases="France's capital is"), "paraphrases must be a list"),
        (dict(paraphrases=["ok", ""]), "paraphrases[1] is empty"),
        (dict(candidates=["Rome", 3]), "candidates[1] must be a string"),
        (dict(neighborhood=[("p", "a")]), "neighborhood[0] must be a Neighbor"),
        (dict(chain=("c", "plain")), "chain must be a ChainLink"),
    ],
)
def test_construction_rejects(overrides, message):
    with pytest.raises(EditError) as info:
        make(**overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "prompt, answer, message",
    [
        ("", "Berlin", "neighbor prompt is empty"),
        ("The capital of Germany is", " ", "neighbor answer is empty"),
        ("The capital of Germany is", None, "neighbor answer must be a string"),
    ],
)
def test_neighbor_rejects_empty(prompt, answer, message):
    with pytest.raises(EditError, match=message):
        Neighbor(prompt, answer)


def test_chain_link_validation():
    for role in ROLES:
        assert ChainLink("c", role).role == role
    with pytest.raises(EditError, match="chain role 'sideways' is not one of plain"):
        ChainLink("c", "sideways")
    with pytest.raises(EditError, match="chain id is empty"):
        ChainLink("", "plain")


def test_edit_error_is_value_error():
    assert issubclass(EditError, ValueError)


# -- dict round trip ------------------------------------------------------------


def test_to_dict_is_json_ready_with_z_timestamp():
    d = full_dict()
    assert d["timestamp"] == "2024-01-05T00:00:00Z"
    assert d["neighborhood"] == [{"prompt": "The capital of Germany is", "answer": "Berlin"}]
    assert d["chain"] == {"chain_id": "c1", "role": "round-out"}
    assert isinstance(d["paraphrases"], list)


def test_from_dict_inverts_to_dict():
    d = full_dict()
    e = Edit.from_dict(d)
    assert e.to_dict() == d
    micro = make(timestamp=dt.datetime(2024, 1, 5, 1, 2, 3, 4567, tzinfo=UTC))
    assert Edit.from_dict(micro.to_dict()) == micro


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2024-01-05", dt.datetime(2024, 1, 5, tzinfo=UTC)),
        ("2024-01-05T12:30:00Z", dt.datetime(2024, 1, 5, 12, 30, tzinfo=UTC)),
        ("2024-01-05T12:30:00+02:00", dt.datetime(2024, 1, 5, 10, 30, tzinfo=UTC)),
        ("2024-01-05T12:30:00", dt.datetime(2024, 1, 5, 12, 30, tzinfo=UTC)),
        ("2024-01-05T12:30:00.250000Z", dt.datetime(2024, 1, 5, 12, 30, 0, 250000, tzinfo=UTC)),
    ],
)
def test_from_dict_timestamp_formats(text, expected):
    e = Edit.from_dict(full_dict(timestamp=text))
    assert e.timestamp == expected and e.timestamp.tzinfo is UTC


def test_from_dict_optional_fields_may_be_absent():
    d = {k: full_dict()[k] for k in ("id", "timestamp", "subject", "relation_id", "prompt", "target_new")}
    e = Edit.from_dict(d)
    assert e.target_true is None and e.chain is None and e.paraphrases == ()


WHERE = "stream.jsonl:12: "


@pytest.mark.parametrize(
    "d, message",
    [
        (full_dict(target_new=""), "stream.jsonl:12: edit 'capital-france': target_new is empty"),
        (full_dict(extra=1), "stream.jsonl:12: edit 'capital-france': unknown field(s) 'extra'"),
        (
            {k: v for k, v in full_dict().items() if k != "subject"},
            "stream.jsonl:12: edit 'capital-france': missing required field(s) 'subject'",
        ),
        ({k: v for k, v in full_dict().items() if k != "id"}, "stream.jsonl:12: edit: missing required field(s) 'id'"),
        (full_dict(id=""), "stream.jsonl:12: edit id is empty"),
        (full_dict(timestamp="yesterday"), "timestamp 'yesterday' is not ISO 8601"),
        (full_dict(timestamp=20240105), "timestamp must be an ISO 8601 string, got int"),
        (full_dict(subject=5), "stream.jsonl:12: edit 'capital-france': subject must be a string, got int"),
        (full_dict(target_true=5), "target_true must be a string or None"),
        (full_dict(paraphrases="x"), "paraphrases must be a list, got str"),
        (full_dict(candidates={"a": 1}), "candidates must be a list, got dict"),
        (full_dict(neighborhood=[["p", "a"]]), "neighborhood[0] must be an object with exactly 'prompt' and 'answer'"),
        (full_dict(neighborhood=[{"prompt": "p", "answer": "a", "x": 1}]), "neighborhood[0] must be an object"),
        (
            full_dict(neighborhood=[{"prompt": "p", "answer": ""}]),
            "stream.jsonl:12: edit 'capital-france': neighborhood[0]: neighbor answer is empty",
        ),
        (
            full_dict(chain={"chain_id": "c", "role": "bogus"}),
            "stream.jsonl:12: edit 'capital-france': chain role 'bogus' is not one of",
        ),
        (full_dict(chain={"chain_id": "c"}), "chain must be null or an object with exactly 'chain_id' and 'role'"),
        (full_dict(prompt="no slot"), "has no '{}'"),
        (full_dict(target_true="Rome"), "target_new equals target_true"),
    ],
)
def test_from_dict_errors_name_the_source(d, message):
    with pytest.raises(EditError) as info:
        Edit.from_dict(d, where=WHERE)
    text = str(info.value)
    assert text.startswith(WHERE)
    assert message in text
    assert "\n" not in text


def test_from_dict_rejects_non_object():
    with pytest.raises(EditError, match="^x:1: edit: expected a JSON object, got list$"):
        Edit.from_dict([1, 2], where="x:1: ")
