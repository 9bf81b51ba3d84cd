"""Readers for the public knowledge-editing datasets (layouts in ``shared/data/README.md``).

Every reader returns ``(EditStream, ReadReport)``. The report counts the units
read, used and skipped, and names every skipped unit with its file, record
index (or id) and reason: no record is ever dropped silently. A *unit* is one
record of the file, except for DyKnow's ``grc_generated.json`` where it is one
dated value change. A record that yields a chain (round edit, conflict, MQuAKE
case) is used or skipped as a whole, so chains are never broken.

Timestamps are the dataset's own dates where it has them (DyKnow); otherwise
one edit per ``interval`` (default one day) from ``start`` (default
2024-01-01 UTC), in file order.

What the probes need and the :class:`~streams.edit.Edit` type has no field for
(MQuAKE's multi-hop questions, KnowEdit portability prompts, a Pitfalls round
edit's object set Obj, conflict metadata) goes to ``ReadReport.extras``.

One module per dataset family: ``common`` (ReadReport and the shared helpers),
``counterfact``, ``zsre`` (zsRE and the KnowEdit/RippleEdits splits), ``mquake``,
``pitfalls``, ``dyknow``, and ``registry`` (:data:`DATASETS`, :func:`read_dataset`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .common import ReadReport
from .counterfact import read_counterfact_easyedit, read_counterfact_rome
from .dyknow import read_dyknow_edits, read_dyknow_facts
from .mquake import MultiHopCase, read_mquake
from .pitfalls import read_pitfalls_conflict, read_pitfalls_round
from .registry import DATASETS, default_data_dir, read_dataset
from .registry import dataset_path as dataset_path  # public (streams.facts uses it), not in __all__ as before
from .zsre import read_ripple_knowedit, read_zsre_knowedit, read_zsre_mend

__all__: Sequence[str] = [
    "ReadReport",
    "MultiHopCase",
    "read_counterfact_rome",
    "read_counterfact_easyedit",
    "read_zsre_mend",
    "read_zsre_knowedit",
    "read_mquake",
    "read_pitfalls_round",
    "read_pitfalls_conflict",
    "read_ripple_knowedit",
    "read_dyknow_edits",
    "read_dyknow_facts",
    "DATASETS",
    "default_data_dir",
    "read_dataset",
]
