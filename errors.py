"""Errors a user of twilight can meet, one class per failure mode.

Every error raised because of a user's pipeline carries the location of the DSL line that caused
it, so the message reads like a compiler diagnostic::

    my_selector.py:14: unknown summary field 'kmid'; summary 'minmax' has: kmin, kmax
        return tw.sum(q * page.kmid)
    hint: use one of the fields the @tw.page_summary function returns
"""

from __future__ import annotations

import linecache
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceLoc:
    """A place in the user's source: where a DSL node was written."""

    file: str
    line: int
    function: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"

    def source_line(self) -> str:
        return linecache.getline(self.file, self.line).strip()


class TwilightError(Exception):
    """Base class of every error twilight raises on purpose."""


class PipelineError(TwilightError):
    """A malformed pipeline. The message names the DSL line and says what to change."""

    def __init__(self, message: str, loc: SourceLoc | None = None, hint: str | None = None):
        self.message, self.loc, self.hint = message, loc, hint
        super().__init__(self._render())

    def _render(self) -> str:
        head = f"{self.loc}: {self.message}" if self.loc else self.message
        parts = [head]
        if self.loc and self.loc.source_line():
            parts.append(f"    {self.loc.source_line()}")
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)


class ExprTypeError(PipelineError):
    """An expression combines values of incompatible kinds (vector vs scalar, channel counts)."""


class AxisError(PipelineError):
    """A reduction over the wrong axis (a summary must reduce tokens, a score head_dim)."""


class UnknownSummaryError(PipelineError, AttributeError):
    """A score reads a summary field the page summary does not define (an ``AttributeError``
    too, so that ``hasattr`` and Python's own probes of a summary view keep working)."""


class BudgetError(PipelineError):
    """A budget rule out of range: p outside (0, 1], a budget ≤ 0, a fraction outside (0, 1]."""


class ChannelIndexError(PipelineError):
    """A channel index outside [0, head_dim) or a per-head channel table of the wrong height."""


class StructureError(PipelineError):
    """A pipeline assembled from the wrong pieces (a pruner without an estimator, ...)."""


class UnsupportedPipeline(StructureError):
    """A valid pipeline that one backend cannot lower (the message names the backend and the
    part); another backend, or another group mode, may."""


class UnsupportedModel(TwilightError, NotImplementedError):
    """A model, or a use of it, that twilight's transformers backend cannot reproduce exactly.
    Raised by ``install`` (and by cache operations it cannot honour) with the feature named,
    never a silent change of the model's attention."""


class InputError(TwilightError, ValueError):
    """A tensor handed to twilight at run time has the wrong shape, dtype or values."""


class NonFiniteInputError(InputError):
    """A query holds NaN or inf; twilight refuses it rather than return a silent garbage set."""
