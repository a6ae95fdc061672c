"""The functions a score or summary may call: ``tw.sum``, ``tw.maximum``, ``tw.sqrt``,
``tw.where``, ``tw.top_channels``, ``tw.position``, ...

Python operators on traced values are traced too: ``+ - * /``, unary ``-``, ``abs()``, ``**``
with a constant exponent, comparisons (``<`` ... ``!=``: 1.0 where true, 0.0 where false) and
``@`` (``tw.dot`` of two vectors, or a projection ``q @ P``).
"""

from __future__ import annotations

from ..errors import ExprTypeError
from .location import user_location
from .trace import (
    Value,
    _binary,
    _unary,
    dot,
    project,
    reduce,
    score_leaf,
    top_channels,
    where,
)

__all__ = ["abs", "absmax", "distance", "dot", "exp", "head_dim", "log", "max", "maximum",
           "mean", "min", "minimum", "position", "project", "query_position", "sign", "softcap",
           "sqrt", "sum", "tanh", "top_channels", "where"]


def sum(x: Value, axis: int | None = None) -> Value:  # noqa: A001 - mirrors numpy
    """Sum over head_dim in a score, over the page's tokens (axis=0) in a summary."""
    return reduce("reduce_sum", x, axis)


def max(x: Value, axis: int | None = None) -> Value:  # noqa: A001
    """Largest element (a reduction); ``tw.maximum`` is the elementwise one."""
    return reduce("reduce_max", x, axis)


def min(x: Value, axis: int | None = None) -> Value:  # noqa: A001
    return reduce("reduce_min", x, axis)


def mean(x: Value, axis: int | None = None) -> Value:
    return reduce("reduce_mean", x, axis)


def absmax(x: Value, axis: int | None = None) -> Value:
    """``max(|x|)``: the per-channel magnitude bound of a page."""
    return reduce("reduce_max", _unary("abs", x), axis)


def maximum(a, b) -> Value:
    return _binary("maximum", a, b)


def minimum(a, b) -> Value:
    return _binary("minimum", a, b)


def abs(x: Value) -> Value:  # noqa: A001
    return _unary("abs", x)


def exp(x: Value) -> Value:
    return _unary("exp", x)


def log(x: Value) -> Value:
    """Natural logarithm (NaN below 0, -inf at 0; a NaN score ranks last)."""
    return _unary("log", x)


def sqrt(x: Value) -> Value:
    return _unary("sqrt", x)


def tanh(x: Value) -> Value:
    return _unary("tanh", x)


def sign(x: Value) -> Value:
    """-1, 0 or 1 (NaN stays NaN)."""
    return _unary("sign", x)


def softcap(x: Value, cap: float) -> Value:
    """``cap · tanh(x / cap)``: Gemma-2's logit cap, for a score that should saturate."""
    if isinstance(cap, bool) or not isinstance(cap, int | float) or not cap > 0:
        raise ExprTypeError(f"tw.softcap(x, cap={cap!r}): cap must be a positive number",
                            user_location())
    return tanh(x / float(cap)) * float(cap)


def position() -> Value:
    """The scored token's position in its request's context (0-based); in a per-page score,
    the position of the page's first token. A float32 scalar."""
    return score_leaf("position", "position")


def query_position() -> Value:
    """The position of the query's own token: the context length - 1."""
    return score_leaf("query_position", "query_position")


def distance() -> Value:
    """``tw.query_position() - tw.position()``: how far back the scored token (or the first
    token of the scored page) lies, ≥ 0."""
    return query_position() - position()


def head_dim() -> Value:
    """head_dim as a traced scalar (a constant once the pipeline meets a shape)."""
    return score_leaf("head_dim", "head_dim")
