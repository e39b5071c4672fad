"""The one error base class of the library, and the one-line rendering every front end uses.

Every error gaaf-patch raises on purpose derives from :class:`GaafError`, so a caller (the CLI, a training
script) can tell "the input or the environment is wrong; the message says what to do" from an internal bug by
type alone. The subclasses keep their historical second base (``ValueError``, ``RuntimeError``) so existing
``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = ["GaafError", "one_line"]


class GaafError(Exception):
    """Base class of every error gaaf-patch raises on purpose; the message is one line that says what to do."""


def one_line(e: BaseException, limit: int | None = None) -> str:
    """``e``'s message on one line (a ``KeyError``'s key without its quotes), cut to ``limit`` characters."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(str(text).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
