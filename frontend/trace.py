"""Traced score expressions.

A score or summary function is called once, at definition time, with ``Value`` tracers instead
of tensors; every operation records an IR node (with the user's source line) and checks the
kinds of its operands, so a mistake is reported at the line that made it.

A value's kind is its ``rank`` — 0 a scalar, 1 a vector over channels, 2 a page's keys
(tokens × channels) — and its channel count ``width`` (``None`` = head_dim, or the length of a
channel subset).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

from ..compiler.ir import Expr
from ..errors import AxisError, ChannelIndexError, ExprTypeError
from .location import user_location


@dataclass(frozen=True)
class Value:
    expr: Expr
    rank: int
    width: int | None = None  # channels; None = head_dim
    context: str = "score"  # "score" | "summary"

    # -- arithmetic --------------------------------------------------------------------------
    def __add__(self, o): return _binary("add", self, o)
    def __radd__(self, o): return _binary("add", o, self)
    def __sub__(self, o): return _binary("sub", self, o)
    def __rsub__(self, o): return _binary("sub", o, self)
    def __mul__(self, o): return _binary("mul", self, o)
    def __rmul__(self, o): return _binary("mul", o, self)
    def __truediv__(self, o): return _binary("div", self, o)
    def __rtruediv__(self, o): return _binary("div", o, self)
    def __neg__(self): return _unary("neg", self)
    def __abs__(self): return _unary("abs", self)

    def __getitem__(self, index):
        return take(self, index)

    def __lt__(self, o):
        raise ExprTypeError("traced score values cannot be compared; use tw.maximum/tw.minimum "
                            "instead of if/else, min() or max()", user_location())

    __le__ = __gt__ = __ge__ = __lt__

    def __bool__(self):
        raise ExprTypeError("a traced score value has no truth value; use tw.maximum/tw.minimum "
                            "instead of if/else, min() or max()", user_location())

    def __iter__(self):
        raise ExprTypeError("a traced score value cannot be iterated; reduce it with "
                            "tw.sum/tw.max/tw.mean", user_location())


def leaf(op: str, rank: int, context: str, **attrs) -> Value:
    return Value(Expr(op, (), tuple(sorted(attrs.items())), user_location()), rank, None, context)


def const(x: Real, context: str) -> Value:
    return leaf("const", 0, context, value=float(x))


def _as_value(x, context: str) -> Value:
    if isinstance(x, Value):
        return x
    if isinstance(x, Real) and not isinstance(x, bool):
        if not math.isfinite(x):  # the IR key (canonical JSON) has no inf/nan
            raise ExprTypeError(f"constant {x!r} in a score expression must be finite",
                                user_location())
        return const(x, context)
    raise ExprTypeError(f"cannot use a {type(x).__name__} in a score expression; only traced "
                        "values and Python numbers", user_location(),
                        hint="constant channel lists go in an index: q[[0, 5, 9]]")


def _binary(op: str, a, b) -> Value:
    ctx = a.context if isinstance(a, Value) else b.context
    a, b = _as_value(a, ctx), _as_value(b, ctx)
    if a.rank and b.rank and (a.rank != b.rank or a.width != b.width):
        raise ExprTypeError(f"'{op}' of a {_describe(a)} and a {_describe(b)}: the shapes differ",
                            user_location(),
                            hint="index both operands with the same channels, or reduce first")
    rank, width = (a.rank, a.width) if a.rank else (b.rank, b.width)
    return Value(Expr(op, (a.expr, b.expr), (), user_location()), rank, width, ctx)


def _unary(op: str, a) -> Value:
    a = _as_value(a, "score")
    return Value(Expr(op, (a.expr,), (), user_location()), a.rank, a.width, a.context)


def _describe(v: Value) -> str:
    w = "head_dim" if v.width is None else str(v.width)
    return {0: "scalar", 1: f"vector of {w} channels", 2: f"page of keys × {w} channels"}[v.rank]


def normalize_channels(index) -> tuple:
    """A channel list (shared by all KV heads) or a table with one list per KV head."""
    if hasattr(index, "tolist"):
        index = index.tolist()
    if isinstance(index, int) or not isinstance(index, Sequence) or not len(index):
        raise ChannelIndexError(f"channel index must be a non-empty list of ints, got {index!r}",
                                user_location())
    if all(isinstance(c, int) and not isinstance(c, bool) for c in index):
        chans = tuple(int(c) for c in index)
        if min(chans) < 0:
            raise ChannelIndexError(f"negative channel index {min(chans)}", user_location())
        return chans
    rows = [normalize_channels(r) for r in index]
    if len({len(r) for r in rows}) != 1:
        raise ChannelIndexError("a per-head channel table needs the same number of channels "
                                "in every row", user_location())
    return tuple(rows)


def take(v: Value, index) -> Value:
    """``q[channels]`` in a score; ``k[:, channels]`` in a summary."""
    if v.context == "summary" and v.rank == 2:
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None)):
            raise AxisError("index a page's keys by channel as k[:, channels]", user_location(),
                            hint="axis 0 of k is the page's tokens, axis 1 its channels")
        index = index[1]
    elif v.rank != 1:
        raise ExprTypeError(f"cannot index a {_describe(v)}", user_location())
    if v.width is not None:
        raise ExprTypeError("channels can only be selected once, from a full head_dim vector",
                            user_location())
    chans = normalize_channels(index)
    width = len(chans[0]) if isinstance(chans[0], tuple) else len(chans)
    return Value(Expr("take", (v.expr,), (("channels", chans),), user_location()), v.rank, width,
                 v.context)


def reduce(op: str, v, axis) -> Value:
    v = _as_value(v, "score")
    if v.rank == 2:  # summary context: must reduce the page's tokens
        if axis != 0:
            raise AxisError(f"a page summary must reduce over the page's tokens (axis=0), got "
                            f"axis={axis}", user_location(),
                            hint="axis=1 reduces head_dim and leaves one value per token")
        return Value(Expr(op, (v.expr,), (("axis", "token"),), user_location()), 1, v.width,
                     v.context)
    if v.rank == 0:
        raise AxisError(f"'{op}' of a scalar: it is already reduced", user_location())
    if axis not in (None, -1, 0):
        raise AxisError(f"score values are vectors over head_dim; reduce with axis=-1 (or no "
                        f"axis), got axis={axis}", user_location())
    return Value(Expr(op, (v.expr,), (("axis", "channel"),), user_location()), 0, None,
                 v.context)
