"""Traced score expressions.

A score or summary function is called once, at definition time, with ``Value`` tracers instead
of tensors; every operation records an IR node (with the user's source line) and checks the
kinds of its operands, so a mistake is reported at the line that made it.

A value's kind is its ``rank`` — 0 a scalar, 1 a vector over channels, 2 a page's keys
(tokens × channels) — and its channel count ``width`` (``None`` = head_dim, or the length of a
channel subset or a projection). A channel subset remembers its channels (``chans``: the
constant list, or the ``top_channels`` node of a query-dependent one), so that a full head_dim
vector it meets is read at the same channels (``q[chans] * k`` is ``q[chans] * k[chans]``).
``kind="index"`` marks a channel index (``tw.top_channels``): it can only index a vector.

Python constructs that cannot be traced (``if`` on a value, ``float(v)``, ``math.exp(v)``,
``np.sqrt(v)``, ``torch.sum(v)``, ``len(v)``, ``v ** w``) raise an ``ExprTypeError`` at the
user's line saying what to write instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from numbers import Real

from ..compiler.ir import QUERY_LEAVES, Expr, Matrix
from ..errors import AxisError, ChannelIndexError, ExprTypeError
from .location import user_location
from .untraceable import Untraceable


@dataclass(frozen=True, eq=False)
class Value(Untraceable):
    expr: Expr
    rank: int
    width: int | None = None  # channels; None = head_dim
    context: str = "score"  # "score" | "summary" (a page's keys) | "token" (one key)
    chans: object = None  # a subset's channels: a tuple, a top_channels Expr, or None
    kind: str = "float"  # "float" | "index" (a channel index from tw.top_channels)

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
    def __pos__(self): return self
    def __abs__(self): return _unary("abs", self)
    def __pow__(self, o): return power(self, o)

    def __rpow__(self, o):
        raise ExprTypeError(f"{o!r} ** (a traced value): exponents must be constants", user_location(),
                            hint=f"write tw.exp(x * math.log({o!r}))")

    def __matmul__(self, o):
        """``a @ b``: ``tw.dot(a, b)`` of two vectors; ``x @ P`` a projection by a constant
        matrix ``P`` (``[D, R]``, or ``[Hkv, D, R]`` one per KV head)."""
        return dot(self, o) if isinstance(o, Value) else project(self, o)

    def __rmatmul__(self, o):
        raise ExprTypeError(f"{type(o).__name__} @ (a traced value): write the traced value "
                            "first, q @ P", user_location())

    # -- comparisons: traced, 1.0 where true and 0.0 where false (use them with tw.where) -------
    def __lt__(self, o): return _binary("lt", self, o)
    def __le__(self, o): return _binary("le", self, o)
    def __gt__(self, o): return _binary("gt", self, o)
    def __ge__(self, o): return _binary("ge", self, o)
    def __eq__(self, o): return _binary("eq", self, o)  # type: ignore[override]
    def __ne__(self, o): return _binary("ne", self, o)  # type: ignore[override]
    __hash__ = object.__hash__

    def __getitem__(self, index):
        return take(self, index)


def leaf(op: str, rank: int, context: str, **attrs) -> Value:
    return Value(Expr(op, (), tuple(sorted(attrs.items())), user_location()), rank, None, context)


def const(x: Real, context: str) -> Value:
    return leaf("const", 0, context, value=float(x))


def _as_value(x, context: str) -> Value:
    if isinstance(x, Value):
        if x.kind == "index":
            raise ExprTypeError("a channel index (tw.top_channels) only indexes a vector, "
                                "k[idx]; it has no arithmetic", user_location())
        return x
    if isinstance(x, Real) and not isinstance(x, bool):
        if not math.isfinite(x):  # the IR key (canonical JSON) has no inf/nan
            raise ExprTypeError(f"constant {x!r} in a score expression must be finite",
                                user_location())
        return const(x, context)
    raise ExprTypeError(f"cannot use a {type(x).__name__} in a score expression; only traced "
                        "values and Python numbers", user_location(),
                        hint="constant channel lists go in an index: q[[0, 5, 9]]; a constant "
                        "matrix in a projection: q @ P")


def _binary(op: str, a, b) -> Value:
    ctx = a.context if isinstance(a, Value) else b.context
    a, b = _as_value(a, ctx), _as_value(b, ctx)
    if a.rank and b.rank and a.width != b.width and a.rank == b.rank:
        a, b = _align(a, b, op)
    if a.rank and b.rank and (a.rank != b.rank or a.width != b.width):
        raise ExprTypeError(f"'{op}' of a {_describe(a)} and a {_describe(b)}: the shapes differ",
                            user_location(),
                            hint="index both operands with the same channels, or reduce first")
    rank, width = (a.rank, a.width) if a.rank else (b.rank, b.width)
    chans = _merge_chans(a, b)
    return Value(Expr(op, (a.expr, b.expr), (), user_location()), rank, width, ctx, chans)


def where(cond, a, b) -> Value:
    """``a`` where ``cond`` is true (non-zero), else ``b`` (``cond``: a comparison, say)."""
    ref = next((x for x in (cond, a, b) if isinstance(x, Value)), None)
    if ref is None:
        raise ExprTypeError("tw.where needs a traced value among its arguments", user_location())
    vals = [_as_value(v, ref.context) for v in (cond, a, b)]
    vecs = [v for v in vals if v.rank]
    subs = [v for v in vecs if v.width is not None]
    if len({v.rank for v in vecs}) > 1 or len({v.width for v in subs}) > 1:
        raise ExprTypeError("tw.where of " + ", ".join(_describe(v) for v in vals) + ": the "
                            "shapes differ", user_location(),
                            hint="index the operands with the same channels, or reduce first")
    chans = None
    if subs:
        chans = subs[0].chans if all(v.chans == subs[0].chans for v in subs) else None
        if any(v.width is None for v in vecs):
            vals = [_take_at(v, _known(chans, "where")) if v.rank and v.width is None else v
                    for v in vals]
    rank = max(v.rank for v in vals)
    width = subs[0].width if subs else None
    return Value(Expr("where", tuple(v.expr for v in vals), (), user_location()), rank, width,
                 ref.context, chans)


def _known(chans, op: str):
    if chans is None:
        raise ExprTypeError(f"'{op}' of a channel subset and a full head_dim vector: the subset "
                            "mixes several channel lists (or is a projection), so the full "
                            "vector's channels are unclear", user_location(),
                            hint="index (or project) the full vector explicitly")
    return chans


def _align(a: Value, b: Value, op: str) -> tuple[Value, Value]:
    """A full head_dim vector meeting a channel subset is read at the subset's channels."""
    full, part = (a, b) if a.width is None else (b, a) if b.width is None else (None, None)
    if full is None:
        return a, b
    full = _take_at(full, _known(part.chans, op))
    return (full, part) if a is not part else (part, full)


def _take_at(v: Value, chans) -> Value:
    if isinstance(chans, Expr):
        return Value(Expr("gather", (v.expr, chans), (), user_location()), v.rank,
                     chans.attr("r"), v.context, chans)
    return _take_const(v, chans)


def _merge_chans(a: Value, b: Value):
    ca = a.chans if a.rank else None
    cb = b.chans if b.rank else None
    if ca is None or cb is None:
        return ca if cb is None else cb if ca is None else None
    return ca if ca == cb else None


def _unary(op: str, a, **attrs) -> Value:
    if not isinstance(a, Value):
        raise ExprTypeError(f"tw.{op} of a {type(a).__name__}: the tw.* math functions take "
                            "traced values", user_location(),
                            hint=f"for a constant use Python's math.{op}")
    a = _as_value(a, a.context)
    return Value(Expr(op, (a.expr,), tuple(sorted(attrs.items())), user_location()), a.rank,
                 a.width, a.context, a.chans)


def power(x: Value, e) -> Value:
    """``x ** e`` for a constant ``e``: integer powers become products (every backend then
    computes exactly what the reference does), ``0.5`` a square root, others ``pow``."""
    if isinstance(e, Value) or isinstance(e, bool) or not isinstance(e, Real) \
            or not math.isfinite(e):
        raise ExprTypeError(f"x ** {type(e).__name__}: the exponent must be a constant number",
                            user_location(), hint="for a traced exponent write tw.exp(b * tw.log(a))")
    e = float(e)
    if e == int(e) and abs(e) <= 64:
        n = abs(int(e))
        if n == 0:
            return _binary("add", _binary("mul", x, 0.0), 1.0)
        out, base = None, x
        while n:  # binary exponentiation: few multiplies, fixed order
            if n & 1:
                out = base if out is None else _binary("mul", out, base)
            n >>= 1
            if n:
                base = _binary("mul", base, base)
        return out if e > 0 else _binary("div", 1.0, out)
    if e == 0.5:
        return _unary("sqrt", x)
    return _unary("pow", x, exponent=e)


def _describe(v: Value) -> str:
    w = "head_dim" if v.width is None else str(v.width)
    return {0: "scalar", 1: f"vector of {w} channels", 2: f"page of keys × {w} channels"}[v.rank]


def normalize_channels(index) -> tuple:
    """A channel list (shared by all KV heads) or a table with one list per KV head."""
    if hasattr(index, "tolist"):
        index = index.tolist()
    if isinstance(index, range):
        index = list(index)
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


def _slice_channels(s: slice) -> tuple:
    start, stop, step = s.start or 0, s.stop, s.step or 1
    if stop is None:
        raise ChannelIndexError(f"channel slice [{start}:]: give its end, e.g. q[{start}:64]; "
                                "head_dim is not known until the pipeline meets a cache",
                                user_location())
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, stop, step)) \
            or start < 0 or stop <= start or step < 1:
        raise ChannelIndexError(f"channel slice [{s.start}:{s.stop}:{s.step}]: use whole "
                                "numbers 0 ≤ start < stop and a positive step", user_location())
    return tuple(range(start, stop, step))


def take(v: Value, index) -> Value:
    """``q[channels]`` in a score; ``k[:, channels]`` in a summary. ``channels``: a list, a
    slice ``a:b``, one list per KV head, or a ``tw.top_channels`` index."""
    if v.kind == "index":
        raise ExprTypeError("a channel index cannot be indexed", user_location())
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
    if isinstance(index, Value):
        if index.kind != "index":
            raise ExprTypeError("a traced value used as a channel index: only tw.top_channels "
                                "gives one", user_location(), hint="k[tw.top_channels(q, r)]")
        return _take_at(v, index.expr)
    return _take_const(v, _slice_channels(index) if isinstance(index, slice)
                       else normalize_channels(index))


def _take_const(v: Value, chans: tuple) -> Value:
    width = len(chans[0]) if isinstance(chans[0], tuple) else len(chans)
    return Value(Expr("take", (v.expr,), (("channels", chans),), user_location()), v.rank, width,
                 v.context, chans)


def query_side(e: Expr) -> bool:
    """Does ``e`` read only the query (one value per head and step, whatever the token)?"""
    return all(n.op in QUERY_LEAVES or n.inputs for n in e.walk())


def top_channels(x: Value, r: int) -> Value:
    """The ``r`` channels of largest ``|x|`` of a query-side vector ``x`` (SparQ's ``i₁``)."""
    if not isinstance(x, Value) or x.context != "score" or x.rank != 1 or x.width is not None:
        raise ExprTypeError("tw.top_channels(x, r) takes a full head_dim vector of the query "
                            "inside a score, e.g. tw.top_channels(q, 16)", user_location())
    if not query_side(x.expr):
        raise ExprTypeError("tw.top_channels ranks the query's channels (one choice per head "
                            "and step); this vector reads the keys", user_location())
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ChannelIndexError(f"tw.top_channels(x, r={r!r}): r must be a whole number ≥ 1",
                                user_location())
    expr = Expr("top_channels", (x.expr,), (("r", r),), user_location())
    return Value(expr, 1, r, "score", expr, "index")


def reduce(op: str, v, axis) -> Value:
    if not isinstance(v, Value):
        raise ExprTypeError(f"tw.{op.removeprefix('reduce_')} of a {type(v).__name__}: it "
                            "reduces traced values", user_location())
    v = _as_value(v, v.context)
    if v.rank == 2:  # summary context: must reduce the page's tokens
        if axis != 0:
            raise AxisError(f"a page summary must reduce over the page's tokens (axis=0), got "
                            f"axis={axis}", user_location(),
                            hint="axis=1 reduces head_dim and leaves one value per token")
        return replace(v, expr=Expr(op, (v.expr,), (("axis", "token"),), user_location()),
                       rank=1)
    if v.rank == 0:
        raise AxisError(f"'{op}' of a scalar: it is already reduced", user_location())
    if axis not in (None, -1, 0):
        raise AxisError(f"score values are vectors over head_dim; reduce with axis=-1 (or no "
                        f"axis), got axis={axis}", user_location())
    return Value(Expr(op, (v.expr,), (("axis", "channel"),), user_location()), 0, None,
                 v.context)


def dot(a: Value, b: Value) -> Value:
    """``sum(a * b)`` over head_dim (or the selected channels)."""
    return reduce("reduce_sum", _binary("mul", a, b), None)


def project(x: Value, matrix) -> Value:
    """``x @ P`` with a constant ``P`` (``[D, R]``, or ``[Hkv, D, R]``): width ``R``. In a score
    ``x`` must be query-side (project the keys in a ``@tw.token_summary``, kept on append)."""
    if not isinstance(x, Value) or x.rank == 0 or x.kind != "float":
        raise ExprTypeError("a projection x @ P takes a traced vector x", user_location())
    try:
        m = Matrix.of(matrix)
    except (TypeError, ValueError) as e:
        raise ExprTypeError(f"x @ P: P must be a rectangular matrix of numbers ({e})",
                            user_location()) from None
    if len(m.shape) not in (2, 3) or not all(m.shape):
        raise ExprTypeError(f"x @ P: P must be [D, R] or [Hkv, D, R], got shape {list(m.shape)}",
                            user_location())
    if not all(math.isfinite(v) for v in m.values()):
        raise ExprTypeError("x @ P: P holds NaN or inf", user_location())
    if x.width is not None and x.width != m.in_width:
        raise ExprTypeError(f"x @ P: x has {x.width} channels, P has {m.in_width} rows",
                            user_location())
    if x.context == "score" and not query_side(x.expr):
        raise ExprTypeError("a score projects the query only: projecting each key per step "
                            "costs a full key read", user_location(),
                            hint="keep k @ P per token with @tw.token_summary (computed once, "
                            "on append) and score q @ P against it")
    return Value(Expr("project", (x.expr,), (("matrix", m),), user_location()), x.rank,
                 m.out_width, x.context)


# ---- what a score may ask about the scored token ----------------------------------------------
_SCOPE: ContextVar[str | None] = ContextVar("twilight_trace_scope", default=None)


@contextmanager
def scope(kind: str) -> Iterator[None]:
    """Mark the trace of one score (``"score"``) or summary (``"summary"``, ``"token"``)."""
    token = _SCOPE.set(kind)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def score_leaf(op: str, name: str) -> Value:
    """A scalar feature of the scored unit (``position``) or of the step (``query_position``,
    ``head_dim``); positions only inside a score."""
    kind = _SCOPE.get()
    if kind is None or (kind != "score" and op != "head_dim"):
        raise ExprTypeError(f"tw.{name}() is a feature of the scored token and step: call it "
                            "inside a @tw.score function", user_location())
    return leaf(op, 0, "score" if kind == "score" else kind)
