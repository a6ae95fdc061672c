"""Find the user's source line that is building a DSL node (for error messages)."""

from __future__ import annotations

import os
import sys

from ..errors import SourceLoc

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# twilight's own code lives in these folders of the project root; frames there are internal.
_INTERNAL = tuple(
    os.path.join(_ROOT, d) + os.sep
    for d in ("frontend", "compiler", "runtime", "schedules", "cli")
) + (os.path.join(_ROOT, "__init__.py"),)


def _is_internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_INTERNAL) or path == _INTERNAL[-1]


def user_location() -> SourceLoc | None:
    """The innermost stack frame outside twilight's own packages."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if not _is_internal(code.co_filename) and not code.co_filename.startswith("<frozen"):
            return SourceLoc(code.co_filename, frame.f_lineno, code.co_name)
        frame = frame.f_back
    return None
