"""Progress bars for the whole program, silenced by ``--quiet`` at the moment they are made.

tqdm reads ``TQDM_*`` variables once, when it is imported, so setting ``TQDM_DISABLE`` later (as
``--quiet`` does, and sweep workers) would not reach bars made after. :func:`bar` reads it at each
call. Editors, the replay loop, sweeps and probe suites all use it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

_shown = [True]  # a stack: the innermost showing() wins


@contextmanager
def showing(flag: bool):
    """Bars made inside the block (an editor's, a probe suite's) show only if ``flag``: a replay run
    with ``progress=False`` keeps the transient bars of its steps quiet too."""
    _shown.append(flag and _shown[-1])
    try:
        yield
    finally:
        _shown.pop()


def quiet() -> bool:
    """Whether bars are off now: ``TQDM_DISABLE`` set (to anything but empty, 0 or false), or inside
    ``showing(False)``."""
    return not _shown[-1] or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")


def bar(iterable=None, *, show: bool = True, **kwargs):
    """``tqdm(iterable, **kwargs)``, off when ``show`` is False or bars are off (:func:`quiet`)."""
    from tqdm import tqdm

    if not show or quiet():
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
