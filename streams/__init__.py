"""What is edited, and when: edits, edit streams, the built-in fact set.

``streams`` is the light end of the project (stdlib + numpy): it imports neither
``lifelong`` nor ``probes``, so streams can be built, inspected and checked
without loading a model.

    >>> from streams import load_stream
    >>> stream = load_stream("builtin")          # or a path to a .jsonl file
    >>> for batch in stream.steps():             # one step per distinct timestamp
    ...     ...

The JSONL format is documented in ``streams/FORMAT.md``.
"""

from .catalog import STREAMS, builtin_chains_stream, list_streams, load_stream
from .edit import ROLES, ChainLink, Edit, EditError, Neighbor
from .errors import MissingFileError, UserError
from .facts import Fact, FactSet, FactSetError, Relation, builtin_stream, load_fact_set
from .generators import (
    chains_of,
    composite_chains,
    coverage_chains,
    layout,
    multihop_chains,
    plain_edits,
    reverse_chains,
    round_chains,
    timestamps,
)
from .readers import DATASETS, ReadReport, read_dataset
from .stream import EditStream, StreamFormatError

__all__ = [
    "UserError",
    "MissingFileError",
    "ROLES",
    "ChainLink",
    "Edit",
    "EditError",
    "Neighbor",
    "EditStream",
    "StreamFormatError",
    "Relation",
    "Fact",
    "FactSet",
    "FactSetError",
    "load_fact_set",
    "builtin_stream",
    "builtin_chains_stream",
    "STREAMS",
    "list_streams",
    "load_stream",
    "DATASETS",
    "ReadReport",
    "read_dataset",
    "plain_edits",
    "round_chains",
    "coverage_chains",
    "reverse_chains",
    "composite_chains",
    "multihop_chains",
    "chains_of",
    "timestamps",
    "layout",
]
