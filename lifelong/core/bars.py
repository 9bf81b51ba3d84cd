"""Progress bars for the whole program, silenced by ``--quiet`` at the moment they are made.

tqdm reads ``TQDM_*`` variables once, when it is imported, so setting ``TQDM_DISABLE`` later (as
``--quiet`` does, and sweep workers) would not reach bars made after. :func:`bar` reads it at each
call. Editors, the replay loop, sweeps and probe suites all use it.
"""

from __future__ import annotations

import os
import sys
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


def _on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def bar(iterable=None, *, show: bool = True, **kwargs):
    """``tqdm(iterable, **kwargs)``, off when ``show`` is False or bars are off (:func:`quiet`)."""
    from tqdm import tqdm

    if not show or quiet():
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


@contextmanager
def phase(desc: str, *, show: bool = True, tick_s: float = 1.0):
    """A one-line status naming a phase whose progress cannot be counted (imports, a model load): shown
    at once, its elapsed time moving every ``tick_s`` seconds until the block ends, then cleared. Off
    like every bar (:func:`quiet`), and shown only on a terminal: a bad input refused inside the block
    (a stream file's line, a damaged weight) then still reads as one line where stderr is kept (a log,
    a test's capture), and a terminal shows it on the cleared line. The ticking thread only redraws
    the line: nothing it does touches what the block computes."""
    if not show or quiet() or not _on_terminal():
        yield None
        return
    import threading

    from tqdm import tqdm

    line = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed} elapsed", leave=False)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(tick_s):
            line.refresh()

    ticker = threading.Thread(target=tick, name="lifelong-phase", daemon=True)
    ticker.start()
    try:
        yield line
    finally:
        stop.set()
        ticker.join()
        line.close()
