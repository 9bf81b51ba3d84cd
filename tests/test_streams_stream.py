"""EditStream: ordering, steps, composition, content hash and the JSONL file format."""

import dataclasses
import datetime as dt
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams import ROLES, ChainLink, Edit, EditError, EditStream, Neighbor, StreamFormatError

UTC = dt.timezone.utc
T0 = dt.datetime(2024, 1, 1, tzinfo=UTC)
DAY = dt.timedelta(days=1)


def edit(i, t=None, **overrides) -> Edit:
    fields = dict(
        id=f"e{i}",
        timestamp=T0 + i * DAY if t is None else t,
        subject=f"Subject {i}",
        relation_id="capital",
        prompt="The capital of {} is",
        target_new=f"New {i}",
        target_true=f"Old {i}",
    )
    fields.update(overrides)
    return Edit(**fields)


def daily(n, start=0, name="s") -> EditStream:
    return EditStream([edit(i) for i in range(start, start + n)], name=name)


def ids(stream) -> list[str]:
    return [e.id for e in stream]


# -- hypothesis strategy: any valid edit -------------------------------------------

nonblank = st.text(min_size=1, max_size=12).filter(lambda s: s.strip())
# include characters that trip naive line splitting and formatting
tricky = st.one_of(nonblank, st.sampled_from(["{x}", "a\u2028b", "a\nb", "é\u00a0ü", "a\x85b", "\"'\\", "{0}"]))


@st.composite
def edits(draw, edit_id=None):
    target_new = draw(tricky)
    target_true = draw(st.one_of(st.none(), tricky.filter(lambda s: s.strip() != target_new.strip())))
    chain = draw(st.one_of(st.none(), st.builds(ChainLink, nonblank, st.sampled_from(ROLES))))
    return Edit(
        id=edit_id if edit_id is not None else draw(nonblank),
        timestamp=draw(
            st.datetimes(
                min_value=dt.datetime(1990, 1, 1),
                max_value=dt.datetime(2100, 1, 1),
                timezones=st.sampled_from([UTC, dt.timezone(dt.timedelta(hours=-5))]),
            )
        ),
        subject=draw(tricky),
        relation_id=draw(tricky),
        prompt=draw(tricky) + "{}" + draw(st.text(max_size=5)),
        target_new=target_new,
        target_true=target_true,
        paraphrases=tuple(draw(st.lists(tricky, max_size=3))),
        neighborhood=tuple(draw(st.lists(st.builds(Neighbor, tricky, tricky), max_size=3))),
        candidates=tuple(draw(st.lists(tricky, max_size=4))),
        chain=chain,
    )


@st.composite
def streams_(draw, max_size=6):
    n = draw(st.integers(0, max_size))
    return EditStream([draw(edits(edit_id=f"id-{i}-" + draw(st.text(max_size=3)))) for i in range(n)])


# -- construction and sequence protocol ------------------------------------------------


def test_sorted_by_timestamp_stable_for_ties():
    t = T0 + DAY
    s = EditStream([edit(3), edit(1, t=t), edit(0), edit(2, t=t)])
    assert ids(s) == ["e0", "e1", "e2", "e3"]
    s = EditStream([edit(2, t=t), edit(1, t=t)])
    assert ids(s) == ["e2", "e1"]


def test_duplicate_ids_rejected():
    with pytest.raises(EditError, match="duplicate edit id 'e1'"):
        EditStream([edit(1), edit(2), edit(1, t=T0)])


def test_non_edit_rejected():
    with pytest.raises(TypeError, match="not an Edit"):
        EditStream([edit(1), {"id": "x"}])


def test_len_iter_getitem_slice():
    s = daily(5, name="five")
    assert len(s) == 5 and ids(s) == ["e0", "e1", "e2", "e3", "e4"]
    assert s[0].id == "e0" and s[-1].id == "e4"
    part = s[1:4]
    assert isinstance(part, EditStream) and part.name == "five"
    assert ids(part) == ["e1", "e2", "e3"]
    assert ids(s[::2]) == ["e0", "e2", "e4"]
    assert len(s[10:]) == 0
    with pytest.raises(IndexError):
        s[5]
    assert "five" in repr(s)


# -- steps ---------------------------------------------------------------------------


def test_steps_one_per_distinct_timestamp():
    t1, t2 = T0, T0 + dt.timedelta(hours=1)
    s = EditStream([edit(0, t=t1), edit(1, t=t2), edit(2, t=t1), edit(3, t=t2), edit(4, t=T0 + DAY)])
    steps = s.steps()
    assert [[e.id for e in step] for step in steps] == [["e0", "e2"], ["e1", "e3"], ["e4"]]
    assert all(isinstance(step, tuple) for step in steps)
    assert EditStream([]).steps() == []


def test_steps_by_batch_size():
    s = daily(7)
    assert [len(b) for b in s.steps(batch_size=3)] == [3, 3, 1]
    assert [e.id for b in s.steps(batch_size=3) for e in b] == ids(s)
    assert [len(b) for b in s.steps(batch_size=1)] == [1] * 7
    assert [len(b) for b in s.steps(batch_size=100)] == [7]
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            s.steps(batch_size=bad)


def test_head_steps():
    s = EditStream([edit(0), edit(1, t=T0), edit(2), edit(3)])  # steps: {e0,e1}, {e2}, {e3}
    assert ids(s.head_steps(1)) == ["e0", "e1"]
    assert ids(s.head_steps(2)) == ["e0", "e1", "e2"]
    assert ids(s.head_steps(99)) == ids(s)
    assert len(s.head_steps(0)) == 0
    assert ids(s.head_steps(1, batch_size=3)) == ["e0", "e1", "e2"]
    with pytest.raises(ValueError):
        s.head_steps(-1)


def test_until_is_inclusive_and_accepts_naive():
    s = daily(5)
    assert ids(s.until(T0 + 2 * DAY)) == ["e0", "e1", "e2"]
    assert ids(s.until(dt.datetime(2024, 1, 2, 12))) == ["e0", "e1"]
    assert len(s.until(T0 - DAY)) == 0


# -- composition -------------------------------------------------------------------------


def test_concat_back_to_back():
    a, b = daily(3, name="a"), daily(2, start=3, name="b")
    c = a.concat(b)
    assert ids(c) == ["e0", "e1", "e2", "e3", "e4"] and c.name == "a"
    # touching timelines (b starts when a ends) are allowed
    touching = EditStream([edit(9, t=a[-1].timestamp)], name="t")
    assert ids(a.concat(touching))[-1] == "e9"
    assert ids(a.concat(EditStream([]), b)) == ids(c)


def test_concat_overlap_suggests_retimed():
    a, b = daily(3, name="a"), daily(3, start=10, name="b")
    overlapping = b.retimed(T0 + DAY, DAY)
    with pytest.raises(ValueError, match=r"retimed"):
        a.concat(overlapping)
    shifted = b.retimed(a[-1].timestamp + DAY, DAY)
    assert ids(a.concat(shifted)) == ["e0", "e1", "e2", "e10", "e11", "e12"]


def test_concat_duplicate_ids_rejected():
    with pytest.raises(EditError, match="duplicate edit id"):
        daily(2).concat(daily(2).retimed(T0 + 10 * DAY, DAY))


def test_interleave_merges_by_time_ties_in_argument_order():
    a = EditStream([edit(0, t=T0), edit(1, t=T0 + 2 * DAY)], name="a")
    b = EditStream([edit(2, t=T0), edit(3, t=T0 + DAY)], name="b")
    c = EditStream([edit(4, t=T0)], name="c")
    assert ids(a.interleave(b, c)) == ["e0", "e2", "e4", "e3", "e1"]
    assert ids(c.interleave(b, a)) == ["e4", "e2", "e0", "e3", "e1"]
    assert a.interleave(b).name == "a"


def test_shuffle_permutes_content_keeps_timeline():
    t = T0 + DAY
    s = EditStream([edit(i, t=t if i in (3, 4) else None) for i in range(20)])
    sh = s.shuffle(seed=7)
    assert sorted(ids(sh)) == sorted(ids(s))
    assert ids(sh) != ids(s)
    assert [e.timestamp for e in sh] == [e.timestamp for e in s]
    assert [len(step) for step in sh.steps()] == [len(step) for step in s.steps()]
    assert ids(s.shuffle(seed=7)) == ids(sh)
    assert ids(s.shuffle(seed=8)) != ids(sh)
    # only the timestamp moved: everything else of each edit is unchanged
    by_id = {e.id: e for e in s}
    for e in sh:
        assert dataclasses.replace(e, timestamp=by_id[e.id].timestamp) == by_id[e.id]


def test_retimed_regular_timestamps_same_order():
    s = EditStream([edit(0, t=T0), edit(1, t=T0), edit(2, t=T0 + 9 * DAY)])
    start = dt.datetime(2030, 5, 1, tzinfo=UTC)
    r = s.retimed(start, dt.timedelta(hours=6))
    assert ids(r) == ids(s)
    assert [e.timestamp for e in r] == [start + i * dt.timedelta(hours=6) for i in range(3)]
    assert len(s.retimed(start, dt.timedelta(0)).steps()) == 1
    assert s.retimed(dt.datetime(2030, 5, 1), DAY)[0].timestamp == start
    with pytest.raises(ValueError):
        s.retimed(start, -DAY)


def test_operations_do_not_mutate():
    s = daily(4)
    before = s.edits
    s.shuffle(1), s.retimed(T0, DAY), s[1:], s.until(T0), s.concat(daily(1, start=9)), s.interleave(daily(1, start=8))
    assert s.edits == before


# -- content hash ---------------------------------------------------------------------------


def test_hash_ignores_name_depends_on_order():
    s = daily(3, name="x")
    assert len(s.content_hash()) == 16
    assert s.content_hash() == EditStream(s.edits, name="y").content_hash()
    assert s.content_hash() != s[:2].content_hash()
    swapped = EditStream(
        [dataclasses.replace(s[0], timestamp=s[1].timestamp), dataclasses.replace(s[1], timestamp=s[0].timestamp), s[2]]
    )
    assert swapped.content_hash() != s.content_hash()


def test_hash_changes_when_any_field_changes():
    base = edit(
        1,
        paraphrases=("p Subject 1",),
        neighborhood=(Neighbor("q", "a"),),
        candidates=("New 1", "Old 1"),
        chain=ChainLink("c", "plain"),
    )
    changes = dict(
        id="other",
        timestamp=base.timestamp + dt.timedelta(microseconds=1),
        subject="S",
        relation_id="r",
        prompt="{} x",
        target_new="N",
        target_true=None,
        paraphrases=("p2",),
        neighborhood=(Neighbor("q", "b"),),
        candidates=("New 1",),
        chain=ChainLink("c", "round-out"),
    )
    assert set(changes) == {f.name for f in dataclasses.fields(Edit)}
    hashes = {EditStream([base]).content_hash()}
    for field, value in changes.items():
        hashes.add(EditStream([dataclasses.replace(base, **{field: value})]).content_hash())
    hashes.add(EditStream([dataclasses.replace(base, chain=None)]).content_hash())
    assert len(hashes) == len(changes) + 2


def test_hash_stable_across_processes():
    s = EditStream([edit(1, subject="Zürich {x}", paraphrases=("é",))])
    code = (
        "import datetime as dt; from streams import Edit, EditStream;"
        "t = dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc);"
        "print(EditStream([Edit('e1', t, 'Zürich {x}', 'capital', 'The capital of {} is', 'New 1', 'Old 1',"
        " paraphrases=('é',))]).content_hash())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert out.stdout.strip() == s.content_hash()


# -- JSONL ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=streams_())
def test_jsonl_round_trip_exact(tmp_path, stream):
    path = tmp_path / "round.jsonl"
    if len(stream) == 0:
        return
    stream.to_jsonl(path)
    back = EditStream.from_jsonl(path)
    assert back.edits == stream.edits
    assert back.content_hash() == stream.content_hash()
    assert back.name == "round"
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line] == [
        e.to_dict() for e in stream
    ]


@settings(max_examples=60, deadline=None)
@given(e=edits())
def test_dict_round_trip_exact(e):
    assert Edit.from_dict(json.loads(json.dumps(e.to_dict()))) == e


def test_to_jsonl_is_atomic_and_leaves_no_temp(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("old content\n")
    daily(3).to_jsonl(path)
    assert [p.name for p in tmp_path.iterdir()] == ["s.jsonl"]
    assert len(path.read_text().splitlines()) == 3


def test_to_jsonl_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "s.jsonl"
    path.write_text("old content\n")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("streams.stream.os.replace", boom)
    with pytest.raises(OSError):
        daily(3).to_jsonl(path)
    assert path.read_text() == "old content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["s.jsonl"]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def line(i, **overrides):
    d = edit(i).to_dict()
    d.update(overrides)
    return json.dumps(d)


def test_from_jsonl_blank_lines_unsorted_and_name(tmp_path):
    path = write_lines(tmp_path / "mine.jsonl", ["", line(2), "   ", line(0), line(1), ""])
    s = EditStream.from_jsonl(path)
    assert ids(s) == ["e0", "e1", "e2"] and s.name == "mine"
    assert EditStream.from_jsonl(path, name="other").name == "other"


@pytest.mark.parametrize(
    "bad, lineno, reason",
    [
        ("{not json", 3, "invalid JSON"),
        ("[1, 2]", 3, "expected a JSON object, got list"),
        ('"just a string"', 3, "expected a JSON object, got str"),
        (line(9, target_new=""), 3, "edit 'e9': target_new is empty"),
        (line(9, prompt="no slot"), 3, "edit 'e9': prompt 'no slot' has no '{}'"),
        (line(9, colour="red"), 3, "edit 'e9': unknown field(s) 'colour'"),
        (line(9, timestamp="soon"), 3, "edit 'e9': timestamp 'soon' is not ISO 8601"),
        (line(9, chain={"chain_id": "c", "role": "nope"}), 3, "chain role 'nope'"),
        (line(9, target_true="New 9"), 3, "target_new equals target_true"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad, lineno, reason):
    path = write_lines(tmp_path / "stream.jsonl", [line(0), "", bad, line(1)])
    with pytest.raises(StreamFormatError) as info:
        EditStream.from_jsonl(path)
    text = str(info.value)
    assert text.startswith(f"{path}:{lineno}: ")
    assert reason in text
    assert "\n" not in text


def test_bad_line_loads_nothing(tmp_path):
    good = [line(i) for i in range(50)]
    path = write_lines(tmp_path / "stream.jsonl", good + [line(99, subject="")])
    result = None
    with pytest.raises(StreamFormatError, match=r"stream.jsonl:51: edit 'e99': subject is empty"):
        result = EditStream.from_jsonl(path)
    assert result is None


def test_duplicate_ids_report_both_lines(tmp_path):
    path = write_lines(tmp_path / "stream.jsonl", [line(0), line(1), line(0, target_new="Other")])
    with pytest.raises(StreamFormatError, match=r"stream.jsonl:3: duplicate edit id 'e0' \(first on line 1\)"):
        EditStream.from_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_has_no_edits(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(StreamFormatError, match="no edits"):
        EditStream.from_jsonl(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(StreamFormatError, match="not UTF-8"):
        EditStream.from_jsonl(path)


def test_stream_format_error_is_value_error():
    assert issubclass(StreamFormatError, ValueError)


# -- bounds (issue #17 item 8): every oversized or pathological line is one clear line naming file and line


def test_line_longer_than_the_bound_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    from streams import stream as stream_module

    path = tmp_path / "stream.jsonl"
    huge = line(5, paraphrases=["x" * 1000] * 1200)  # ~1.2 MB on one line
    write_lines(path, [line(0), huge, line(1)])
    sizes = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def readline(self, size=-1):
            out = self.f.readline(size)
            sizes.append((size, len(out)))
            return out

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(stream_module, "open", lambda p, mode: Spy(real_open(p, mode)), raising=False)
    with pytest.raises(StreamFormatError) as info:
        EditStream.from_jsonl(path)
    assert str(info.value) == (
        f"{path}:2: line longer than {stream_module.MAX_LINE_BYTES:,} bytes "
        "(an edit is a few KB; see streams/FORMAT.md)"
    )
    assert all(0 < size <= stream_module.MAX_LINE_BYTES + 2 and n <= size for size, n in sizes)


def test_line_of_exactly_the_bound_is_read(tmp_path):
    from streams.stream import MAX_LINE_BYTES

    text = line(0, paraphrases=["y" * 70_000])
    text = text[:-1] + " " * (MAX_LINE_BYTES - len(text.encode())) + "}"
    assert len(text.encode()) == MAX_LINE_BYTES
    path = tmp_path / "s.jsonl"
    path.write_bytes(text.encode() + b"\r\n")
    with pytest.raises(
        StreamFormatError,
        match=r"s.jsonl:1: paraphrases\[0\]: string of 70,000 characters, "
        r"longer than 65,536",
    ):
        EditStream.from_jsonl(path)  # the line itself is accepted; its one long string is not


@pytest.mark.parametrize(
    "bad, reason",
    [
        (line(9, subject="S" * 70_000), "subject: string of 70,000 characters, longer than 65,536"),
        (line(9, neighborhood=[{"prompt": "p", "answer": "a" * 65_537}]), "neighborhood[0].answer: string of 65,537"),
        ('{"id": "e9", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nests deeper than 4 levels"),
        ('{"id": "e9", "x": [[[[1]]]]}', "JSON nests deeper than 4 levels"),
        ('{"id": "e9", "n": 1' + "0" * 5000 + "}", "invalid JSON: Exceeds the limit"),
        (
            line(9, timestamp="9999-12-31T23:00:00-05:00"),
            "edit 'e9': timestamp '9999-12-31T23:00:00-05:00' is out of range",
        ),
        (line(9, timestamp="0001-01-01T00:00:00+01:00"), "is out of range in UTC"),
        (line(9).replace('"Subject 9"', '"Subject \\ud800"', 1), "subject: string holds a lone surrogate escape"),
        (line(9).replace('"id"', '"\\udfff"', 1), "key '\\udfff': string holds a lone surrogate escape"),
    ],
)
def test_pathological_line_is_one_clear_line(tmp_path, bad, reason):
    path = write_lines(tmp_path / "stream.jsonl", [line(0), bad])
    with pytest.raises(StreamFormatError) as info:
        EditStream.from_jsonl(path)
    text = str(info.value)
    assert text.startswith(f"{path}:2: ") and reason in text and "\n" not in text
    text.encode("utf-8")  # printable as it is


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(line(0).encode() + b"\n" + line(1).encode().replace(b"Subject 1", b"Subject \xff1") + b"\n")
    with pytest.raises(StreamFormatError, match=r"s.jsonl:2: not UTF-8 text"):
        EditStream.from_jsonl(path)


def test_byte_order_mark_and_crlf_are_read(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (line(0) + "\r\n" + line(1) + "\r\n").encode())
    assert ids(EditStream.from_jsonl(path)) == ["e0", "e1"]
