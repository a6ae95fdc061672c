"""The one writer of generated source, used by both backends.

Generated kernels are text (TVMScript for TVM, Python for Triton) so that every one can be read
and dumped (``twilightc compile --dump``). A template writes lines into a :class:`SourceWriter`;
nesting is ``with w.block(header):``, never indentation typed by hand, so a template can unroll
over the IR — any number of summary fields, score terms or pruners — with plain Python.

    >>> w = SourceWriter()
    >>> with w.block("for i in range(n):"):
    ...     w("acc += x[i]")
    >>> print(w.text(), end="")
    for i in range(n):
        acc += x[i]
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

__all__ = ["SourceWriter"]


class SourceWriter:
    """Lines of source with an indentation level and fresh names."""

    indent = "    "

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0
        self._ids = itertools.count()

    def __call__(self, *lines: str) -> None:
        """Write ``lines`` at the current depth (a line holding newlines keeps its own
        relative indentation)."""
        pad = self.indent * self.depth
        for line in lines:
            self.lines.extend(pad + part if part else "" for part in line.split("\n"))

    def fresh(self, stem: str) -> str:
        """A name no other ``fresh`` call of this writer returned."""
        return f"{stem}_{next(self._ids)}"

    @contextmanager
    def block(self, header: str):
        """``header`` (``for …:``, ``if …:``, ``def …:``), then its body one level deeper."""
        self(header)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
