"""Named streams and how a ``--stream`` spec resolves: a registered name (``builtin``,
``builtin-chains``), ``dataset:NAME`` (a reader of ``streams.readers``) or a ``.jsonl`` file."""

from __future__ import annotations

import importlib.resources
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from .errors import MissingFileError, UserError
from .facts import builtin_stream, load_fact_set
from .generators import composite_chains, layout, reverse_chains, round_chains
from .stream import EditStream


def _chain_facts_path() -> Path:
    return Path(str(importlib.resources.files("streams") / "data" / "chain_facts.json"))


# What builtin-chains chains (fact ids of the built-in set, relation ids of chain_facts.json).
CHAIN_REVERSE_FACTS = ("capital-france", "capital-germany")  # capital's inverse is city_country
CHAIN_REVERSE_INVERSE = {"capital": "city_country"}
CHAIN_COMPOSITE_FACTS = ("city_country-madrid", "language-spain", "city_country-moscow", "language-russia")
CHAIN_COMPOSITE_RULES = (("city_country", "language", "city_language"),)  # city in x, x speaks y -> city speaks y
# Plain edits between a chain's edits, and between chains: few, so that a short run completes chains.
CHAIN_GAP, CHAIN_BETWEEN = 1, 0


def builtin_chains_stream(seed: int = 0, gap: int = CHAIN_GAP, between: int = CHAIN_BETWEEN) -> EditStream:
    """The built-in stream with round and conflict chains laid in (:func:`streams.generators.layout`).

    Round chains o → o* → o (k = 1), one per subject of ``chain_facts.json`` (its first fact; the
    subject's other facts give the further true objects, so Obj has several): five official-language
    facts and one flag colour. Conflict chains over built-in facts: two reverse (capital, whose
    inverse is city_country) and two composite (city_country ∧ language → city_language, a relation
    of ``chain_facts.json``). Kinds alternate, ``gap`` plain edits between a chain's edits and
    ``between`` between chains (a composite chain's tied-fact record, never applied, takes a
    timestamp and is followed by ``gap`` plain edits too); the plain edits are the other built-in
    facts in the ``builtin`` stream's order (those the conflicts use left out), the rest after the
    last chain. The defaults (gap 1, between 0) complete every chain by step 32, and 3 round,
    2 reverse and 1 composite chain within the 20 steps ``make demo`` replays.
    One edit per day from 2024-01-01, as ``builtin``; ``seed`` draws the conflicts' second objects.
    """
    base = load_fact_set()
    extra = load_fact_set(_chain_facts_path())
    relations = {**base.relations, **extra.relations}
    by_id = {f.id: f for f in base.facts}
    firsts: dict[tuple[str, str], str] = {}  # (s, r) -> its first fact, the one chained
    for f in extra.facts:
        firsts.setdefault((f.subject, f.relation.id), f"round-{f.id}")
    rounds = [c for c in round_chains(extra, seed=seed) if c[0].chain and c[0].chain.chain_id in firsts.values()]
    reverse = reverse_chains([by_id[i] for i in CHAIN_REVERSE_FACTS], CHAIN_REVERSE_INVERSE, relations, seed=seed)
    composite = composite_chains([by_id[i] for i in CHAIN_COMPOSITE_FACTS], CHAIN_COMPOSITE_RULES, relations, seed=seed)
    conflicts = [c for pair in zip(reverse, composite) for c in pair]
    chains = [c for pair in zip(rounds, conflicts) for c in pair] + rounds[len(conflicts) :]
    used = {*CHAIN_REVERSE_FACTS, *CHAIN_COMPOSITE_FACTS}
    fillers = [e for e in builtin_stream() if e.id not in used]
    return layout(chains, fillers, gap=gap, between=between, name="builtin-chains")


STREAMS: dict[str, tuple[str, Callable[[], EditStream]]] = {
    "builtin": ("every built-in fact once, one edit per day, relations mixed (offline)", builtin_stream),
    "builtin-chains": (
        "builtin with 6 round chains over facts with several true objects and 4 conflict chains "
        "(2 reverse, 2 composite) laid in, all complete by step 32 (offline)",
        builtin_chains_stream,
    ),
}
"""Named streams: name -> (one-line description, factory)."""


DATASET_PREFIX = "dataset:"


def list_streams() -> list[tuple[str, str]]:
    """``(name, description)`` of every registered stream and readable dataset, sorted by name."""
    from .readers import DATASETS

    named = [(name, desc) for name, (desc, _) in STREAMS.items()]
    named += [(DATASET_PREFIX + name, f"read from the data directory: {rel}") for name, (rel, _) in DATASETS.items()]
    return sorted(named)


def check_stream_spec(spec: str | os.PathLike) -> None:
    """Refuse, in one line and without reading it, a stream that is not registered, a dataset that is
    unknown or absent, or a ``.jsonl`` file that does not exist."""
    spec_str = os.fspath(spec)
    if spec_str in STREAMS:
        return
    if spec_str.startswith(DATASET_PREFIX):
        from .readers import dataset_path

        dataset_path(spec_str[len(DATASET_PREFIX) :])
    elif spec_str.endswith(".jsonl"):
        if not os.path.isfile(spec_str):
            raise MissingFileError(f"stream file {spec_str} does not exist")
    else:
        raise UserError(
            f"unknown stream {spec_str!r}: expected one of {', '.join(sorted(STREAMS))}, dataset:NAME "
            "(see 'lifelong streams'), or a path to a .jsonl file"
        )


def load_stream(spec: str | os.PathLike) -> EditStream:
    """A registered stream by name, or a stream read from a ``.jsonl`` file path."""
    spec_str = os.fspath(spec)
    check_stream_spec(spec_str)
    if spec_str in STREAMS:
        return STREAMS[spec_str][1]()
    if spec_str.startswith(DATASET_PREFIX):
        from .readers import read_dataset

        stream, report = read_dataset(spec_str[len(DATASET_PREFIX) :])
        if report.skipped:  # never silently: say how many records the reader could not use
            warnings.warn(
                f"{spec_str}: {len(report.skipped)} of {report.read} records skipped "
                "(streams.readers.read_dataset lists them with reasons)",
                stacklevel=2,
            )
        return stream
    return EditStream.from_jsonl(spec_str)
