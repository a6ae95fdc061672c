"""The functions a score or summary may call: ``tw.sum``, ``tw.maximum``, ``tw.dot``, ..."""

from __future__ import annotations

from .trace import Value, _binary, _unary, reduce


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


def dot(a: Value, b: Value) -> Value:
    """``sum(a * b)`` over head_dim (or the selected channels)."""
    return reduce("reduce_sum", _binary("mul", a, b), None)
