"""The project's one exception type for user mistakes.

A :class:`UserError` is something the person running the simulator can fix: bad input, a bad option,
a bad or missing file, an unsupported model, a run that cannot be used as asked. The ``lifelong``
command prints it as one line, ``lifelong: error: ...``, with exit status 2; any other exception is
a bug in the project (or an editor) and keeps its traceback.

It lives in ``streams``, the package that imports neither of the others, so ``streams``, ``probes``
and ``lifelong`` can all raise it. It is a ``ValueError``, so code that catches ``ValueError``
catches it too.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake of the user's (input, options, files, models, runs); the message is one line and says
    what to fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named, or one the asked-for data needs, does not exist. Also a
    ``FileNotFoundError``, as such errors were before."""


__all__ = ["MissingFileError", "UserError"]
