"""Find the user's source line that is building a DSL node (for error messages)."""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig

from ..errors import SourceLoc

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# twilight's own code lives in these folders of the project root; frames there are internal.
_INTERNAL = tuple(
    os.path.join(_ROOT, d) + os.sep
    for d in ("frontend", "compiler", "runtime", "schedules", "cli")
) + (os.path.join(_ROOT, "__init__.py"),)




def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    locs = spec.submodule_search_locations if spec else None
    return os.path.join(next(iter(locs)), "") if locs else None


# Libraries a score may wrongly call into (torch.sum(v), np.sqrt(v)) and the standard library:
# their frames are never the user's line either.
_LIBRARIES = tuple(d for d in (_package_dir("torch"), _package_dir("numpy"),
                               os.path.join(sysconfig.get_paths()["stdlib"], "")) if d)


def _is_internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_INTERNAL) or path == _INTERNAL[-1]


def _is_user(filename: str) -> bool:
    return not (_is_internal(filename) or filename.startswith("<frozen")
                or os.path.abspath(filename).startswith(_LIBRARIES))


def user_location() -> SourceLoc | None:
    """The innermost stack frame outside twilight's own packages (and torch, numpy, the
    standard library)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if _is_user(code.co_filename):
            return SourceLoc(code.co_filename, frame.f_lineno, code.co_name)
        frame = frame.f_back
    return None


def raised_at(exc: BaseException) -> SourceLoc | None:
    """The innermost user frame of the traceback of ``exc`` (where a user's code raised)."""
    found, tb = None, exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if _is_user(code.co_filename):
            found = SourceLoc(code.co_filename, tb.tb_lineno, code.co_name)
        tb = tb.tb_next
    return found
