"""The memory editor's lexical index (issue #19): exactly the exhaustive scorer's retrievals, through
replacements and state loads, with per-query work that does not grow with the records."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifelong.editors import make_editor
from streams import Edit

VOCAB = [
    "new",
    "york",
    "New",
    "paris",
    "st",
    "saint",
    "louis",
    "o'neil",
    "de",
    "la",
    "costa",
    "rica",
    "x1",
    "van",
    "der",
    "Berg",
    "the",
    "of",
]
RELATIONS = [("capital", "The capital of {} is"), ("born", "{} was born in"), ("lang", "The language of {} is")]


def _edit(i: int, subject: str, relation: int) -> Edit:
    rel, prompt = RELATIONS[relation]
    return Edit(
        id=f"m{i}",
        timestamp=datetime(2024, 1, 1, tzinfo=timezone.utc),
        subject=subject,
        relation_id=rel,
        prompt=prompt,
        target_new=f"T{i}",
    )


def _memory(threshold: float, top_k: int):
    return make_editor("memory", {"threshold": repr(threshold), "top_k": str(top_k)})


_subject = st.lists(st.sampled_from(VOCAB), min_size=1, max_size=4).map(" ".join) | st.sampled_from(["!!", "--"])
_prompt = st.lists(st.sampled_from(VOCAB + ["capital", "born", "language", "is", "in", "?"]), max_size=9).map(" ".join)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    batches=st.lists(st.lists(st.tuples(_subject, st.integers(0, 2)), min_size=1, max_size=6), min_size=1, max_size=6),
    prompts=st.lists(_prompt, min_size=1, max_size=6),
    threshold=st.sampled_from(
        [0.05, 0.1, 0.1000001, 0.2, 0.35, 0.5, 0.6, 2 / 3, 0.7, 0.75, 0.8, 0.9, 1.0, 1.05, 1.1, 1.2]
    )
    | st.floats(0.0, 1.3),
    top_k=st.integers(1, 4),
)
def test_indexed_lexical_retrieval_equals_the_exhaustive_scorer(batches, prompts, threshold, top_k):
    memory = _memory(threshold, top_k)
    n = 0
    for batch in batches:  # retrieval between applies: the index grows, and starts again after a replacement
        edits = [_edit(n + i, s, r) for i, (s, r) in enumerate(batch)]
        n += len(edits)
        memory.apply(None, edits)
        asked = prompts + [e.rendered_prompt for e in edits] + [f"{e.subject} {e.subject}" for e in edits]
        assert memory.retrieve(None, asked) == memory.retrieve_exhaustive(None, asked)
    # A state loaded whole, and steps loaded one by one, give the same retrievals.
    other = _memory(threshold, top_k)
    other.retrieve(None, prompts)
    other.load_state_dict(memory.state_dict())
    assert other.retrieve(None, prompts) == memory.retrieve_exhaustive(None, prompts)
    steps = []
    for batch_start in range(0, n, 3):
        step = _memory(threshold, top_k)
        step.apply(
            None,
            [
                _edit(batch_start + i, s, r)
                for i, (s, r) in enumerate([x for b in batches for x in b][batch_start : batch_start + 3])
            ],
        )
        steps.append(step.step_state())
    other.load_step_states(steps)
    assert [r["subject"] for r in other.records] == [r["subject"] for r in memory.records]
    assert other.retrieve(None, prompts) == memory.retrieve_exhaustive(None, prompts)


def test_replacement_keeps_the_index_consistent():
    memory = _memory(1.0, 2)
    memory.apply(None, [_edit(0, "Costa Rica", 0), _edit(1, "Paris", 0), _edit(2, "Rica", 1)])
    assert memory.retrieve(None, ["The capital of Paris is"]) == [[1]]
    memory.apply(None, [replace(_edit(3, "Costa Rica", 0), target_new="San Jose")])  # replaces record 0
    assert [r["subject"] for r in memory.records] == ["Paris", "Rica", "Costa Rica"]
    got = memory.retrieve(None, ["The capital of Paris is", "Costa Rica"])
    assert got == memory.retrieve_exhaustive(None, ["The capital of Paris is", "Costa Rica"]) == [[0], [1, 2]]


def test_per_query_work_stays_bounded_as_records_grow():
    """Candidate scores per query (not wall time): the index scores a handful of records whether 100 or
    5,000 are stored; the exhaustive scorer scores all of them."""
    work = {}
    for size in (100, 5000):
        memory = _memory(1.0, 1)
        memory.apply(None, [_edit(i, f"Country{i} Republic", i % 3) for i in range(size)])
        queries = [f"The capital of Country{i} Republic is" for i in range(0, size, size // 50)]
        memory.candidate_evaluations = 0
        found = memory.retrieve(None, queries)
        work[size] = memory.candidate_evaluations / len(queries)
        assert all(len(f) == 1 and memory.records[f[0]]["subject"] in q for f, q in zip(found, queries))
        memory.candidate_evaluations = 0
        assert memory.retrieve_exhaustive(None, queries[:5]) == found[:5]
        assert memory.candidate_evaluations == 5 * size
    assert work[100] <= 3 and work[5000] <= 3  # only "countryN" is indexed: "republic", in all, adds none
