"""Hypothesis strategies over a small vocabulary: facts, edits, edit streams and tiny models.

Short strings keep byte-tokenized prompts short, so every drawn example runs in moments.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from lifelong.core.models import load_model
from lifelong.testing._requires import INSTALL_HINT
from streams import ChainLink, Edit, EditStream, Fact, Neighbor
from streams.facts import Relation

try:
    from hypothesis import strategies as st
except ImportError as err:  # a plain install: say which extra brings it
    raise ImportError(INSTALL_HINT) from err

SUBJECTS: tuple[str, ...] = ("Ada", "Bo", "Cy", "Dee", "Eli")
"""Subjects the strategies draw from."""

RELATIONS: tuple[Relation, ...] = (
    Relation("capital", "The capital of {} is", ("{}'s capital is",), ("Rome", "Oslo", "Lima", "Bern")),
    Relation("lang", "{} speaks", ("The language of {} is",), ("Dutch", "Thai", "Farsi", "Greek")),
    Relation("color", "{} is colored", ("The color of {} is",), ("red", "blue", "green", "pink")),
)
"""Relations the strategies draw from: template, paraphrase templates, candidate objects."""

_EPOCH = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


@st.composite
def facts(draw, subjects: Sequence[str] = SUBJECTS, relations: Sequence[Relation] = RELATIONS) -> Fact:
    """A :class:`streams.Fact` (subject, relation, true object, a different new object), maybe with a neighbor."""
    relation = draw(st.sampled_from(relations))
    subject = draw(st.sampled_from(subjects))
    true, new = draw(st.lists(st.sampled_from(relation.candidates), min_size=2, max_size=2, unique=True))
    neighborhood: tuple[Neighbor, ...] = ()
    if draw(st.booleans()):
        other = draw(st.sampled_from([s for s in subjects if s != subject] or list(subjects)))
        answer = draw(st.sampled_from(relation.candidates))
        neighborhood = (Neighbor(relation.template.replace("{}", other), answer),)
    return Fact(
        id=f"{subject}/{relation.id}",
        subject=subject,
        relation=relation,
        target_true=true,
        target_new=new,
        neighborhood=neighborhood,
    )


def _edit(
    fact: Fact,
    edit_id: str,
    timestamp: datetime.datetime,
    *,
    true: str | None,
    new: str,
    paraphrases: bool,
    chain: ChainLink | None = None,
) -> Edit:
    r = fact.relation
    return Edit(
        id=edit_id,
        timestamp=timestamp,
        subject=fact.subject,
        relation_id=r.id,
        prompt=r.template,
        target_new=new,
        target_true=true,
        paraphrases=tuple(p.replace("{}", fact.subject) for p in r.paraphrases) if paraphrases else (),
        neighborhood=fact.neighborhood,
        candidates=r.candidates,
        chain=chain,
    )


@st.composite
def edits(draw, edit_id: str = "e0", timestamp: datetime.datetime = _EPOCH) -> Edit:
    """A valid :class:`streams.Edit`: ``{}`` template, distinct non-empty targets, optional paraphrases/neighbors."""
    fact = draw(facts())
    true = fact.target_true if draw(st.booleans()) else None
    return _edit(fact, edit_id, timestamp, true=true, new=fact.target_new, paraphrases=draw(st.booleans()))


@st.composite
def edit_streams(
    draw, *, min_edits: int = 1, max_edits: int = 4, max_batch: int = 2, rounds: bool = True, conflicts: bool = True
) -> EditStream:
    """An :class:`EditStream` of ``min_edits``..``max_edits`` edits in steps of 1..``max_batch`` edits, one day apart.

    With ``rounds``, it may contain round edits (o → o* at one step, o* → o at a later one,
    same subject and relation; roles ``round-out``/``round-back``); with ``conflicts``,
    conflict chains (o → o1* then o1* → o2* on the same subject and relation; roles
    ``conflict-e1``/``conflict-e2``). A chain's second edit is always in a later step.
    """
    kinds = ["plain"] + (["round"] if rounds else []) + (["conflict"] if conflicts else [])
    if not 1 <= min_edits <= max_edits:
        raise ValueError(f"need 1 <= min_edits <= max_edits, got {min_edits} and {max_edits}")
    wanted = draw(st.lists(st.sampled_from(kinds), min_size=min_edits, max_size=max_edits))
    # Episodes: each is a list of (fact, true, new, role) in the order they must happen.
    episodes: list[list[tuple[Fact, str, str, str | None]]] = []
    budget = max_edits
    for kind in wanted:
        if budget == 0:
            break
        if budget == 1:  # a chain does not fit any more: a plain edit instead
            kind = "plain"
        size = 1 if kind == "plain" else 2
        budget -= size
        fact = draw(facts())
        if kind == "plain":
            episodes.append([(fact, fact.target_true, fact.target_new, None)])
        elif kind == "round":
            episodes.append(
                [
                    (fact, fact.target_true, fact.target_new, "round-out"),
                    (fact, fact.target_new, fact.target_true, "round-back"),
                ]
            )
        else:
            second = draw(st.sampled_from([o for o in fact.relation.candidates if o != fact.target_new]))
            episodes.append(
                [
                    (fact, fact.target_true, fact.target_new, "conflict-e1"),
                    (fact, fact.target_new, second, "conflict-e2"),
                ]
            )
    # Order: every episode's first edit in drawn order; each second edit goes after its first.
    order: list[tuple[int, int]] = [(i, 0) for i in range(len(episodes))]
    for i, episode in enumerate(episodes):
        if len(episode) == 2:
            first = order.index((i, 0))
            at = draw(st.integers(first + 1, len(order)))
            order.insert(at, (i, 1))
    # Steps: an edit may join the previous step unless that step is full or holds its chain's first edit.
    out: list[Edit] = []
    in_step: list[tuple[int, int]] = []
    step = 0
    paraphrases = draw(st.booleans())
    for n, (i, part) in enumerate(order):
        joins = bool(in_step) and len(in_step) < max_batch and (i, 0) not in in_step and draw(st.booleans())
        if not joins:
            step, in_step = step + 1, []
        in_step.append((i, part))
        fact, true, new, role = episodes[i][part]
        chain = ChainLink(f"c{i}", role) if role else None
        out.append(
            _edit(
                fact,
                f"e{n}",
                _EPOCH + datetime.timedelta(days=step - 1),
                true=true,
                new=new,
                paraphrases=paraphrases,
                chain=chain,
            )
        )
    return EditStream(out, name="hypothesis")


def tiny_model_specs(families: Sequence[str] = ("tiny-llama", "tiny-gpt2"), seeds: Sequence[int] = (0,)):
    """Model specs ``tiny-llama:SEED`` / ``tiny-gpt2:SEED`` that :func:`lifelong.core.models.load_model` understands."""
    return st.sampled_from([f"{f}:{s}" if s else f for f in families for s in seeds])


def tiny_models(families: Sequence[str] = ("tiny-llama", "tiny-gpt2"), seeds: Sequence[int] = (0,)):
    """Freshly loaded seeded tiny models (a new :class:`LoadedModel` per draw, so edits never leak)."""
    return tiny_model_specs(families, seeds).map(load_model)
