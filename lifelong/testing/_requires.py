"""The one message for a missing ``testing`` extra, shared by the modules that need hypothesis."""

from __future__ import annotations

INSTALL_HINT = (
    "lifelong.testing's strategies and check_editor need hypothesis, which this install lacks: "
    "pip install 'lifelong-editing[testing]' (from a clone: pip install -e '.[testing]')"
)


def hypothesis():
    """The hypothesis package, or an ImportError naming the extra that installs it."""
    try:
        import hypothesis
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return hypothesis
