"""The named datasets: name -> (file under the data directory, reader), and reading one by name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import MissingFileError, UserError
from ..stream import EditStream
from .common import ReadReport
from .counterfact import read_counterfact_easyedit, read_counterfact_rome
from .dyknow import read_dyknow_edits, read_dyknow_facts
from .mquake import read_mquake
from .pitfalls import read_pitfalls_conflict, read_pitfalls_round
from .zsre import read_ripple_knowedit, read_zsre_knowedit, read_zsre_mend

DATASETS: dict[str, tuple[str, Callable[[Path], tuple[EditStream, ReadReport]]]] = {
    "counterfact": ("counterfact/counterfact_rome_500.json", read_counterfact_rome),
    "counterfact_easyedit": ("counterfact/counterfact_easyedit_edit.json", read_counterfact_easyedit),
    "zsre_mend": ("zsre/zsre_mend_train_1k.json", read_zsre_mend),
    "zsre": ("zsre/ZsRE-test-all.json", read_zsre_knowedit),
    "mquake": ("mquake/MQuAKE-CF_AKEW_subset.json", read_mquake),
    "pitfalls_round_easy": ("pitfalls/gpt2-xl/easy.json", read_pitfalls_round),
    "pitfalls_round_hard": ("pitfalls/gpt2-xl/hard.json", read_pitfalls_round),
    "pitfalls_reverse": ("pitfalls/gpt2-xl/reverse_edit.json", read_pitfalls_conflict),
    "pitfalls_composite": ("pitfalls/gpt2-xl/composite_edit.json", read_pitfalls_conflict),
    "pitfalls_coverage": ("pitfalls/gpt2-xl/coverage_edit.json", read_pitfalls_conflict),
    "ripple_recent": ("ripple_knowedit/wiki_recent_train.json", read_ripple_knowedit),
    "ripple_counterfact": ("ripple_knowedit/wiki_counterfact_train.json", read_ripple_knowedit),
    "dyknow": ("dyknow/editing_dataset_gpt2-xl.json", read_dyknow_edits),
    "dyknow_facts": ("dyknow/grc_generated.json", read_dyknow_facts),
}
"""Dataset name -> (path relative to the data directory, reader)."""


def default_data_dir() -> Path:
    """``$LIFELONG_DATA`` if set, else ``shared/data`` beside the repository checkout."""
    env = os.environ.get("LIFELONG_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def dataset_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The file dataset ``name`` is read from; refused in one line when unknown or absent."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: expected one of {', '.join(sorted(DATASETS))}")
    path = (Path(data_dir) if data_dir is not None else default_data_dir()) / DATASETS[name][0]
    if not path.exists():
        raise MissingFileError(
            f"dataset {name!r} needs {path}, which does not exist (set LIFELONG_DATA or pass data_dir)"
        )
    return path


def read_dataset(name: str, data_dir: str | os.PathLike | None = None) -> tuple[EditStream, ReadReport]:
    """Read a dataset by name (see :data:`DATASETS`) from ``data_dir`` (default :func:`default_data_dir`)."""
    path = dataset_path(name, data_dir)
    return DATASETS[name][1](path)
