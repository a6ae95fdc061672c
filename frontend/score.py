"""Summaries and scores: the functions a user writes, traced once into IR.

* ``@tw.page_summary`` — what the cache keeps per page and KV head: reductions of the page's
  keys over its tokens (``tw.min(k, axis=0)``, ``tw.max(...)``, ``tw.mean(...)``, ...);
* ``@tw.token_summary`` — what the cache keeps per token and KV head, computed on append: maps
  of each key (``k @ P``, ``k[chans]``, ``tw.abs(k)``, ...);
* ``@tw.score(per="page" | "token", summary=...)`` — one scalar per page (over its summary)
  or per token (over its key ``k``, or its token summary).

Any Python error raised while tracing (a ``TypeError`` of an unsupported construct, a
``NameError``, a score that calls itself) is reported as an ``ExprTypeError`` at the user's line.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

from ..compiler import ir
from ..errors import ExprTypeError, StructureError, TwilightError, UnknownSummaryError
from .location import raised_at, user_location
from .trace import Value, leaf, scope


@dataclasses.dataclass(frozen=True)
class SummaryDef:
    ir: ir.Summary

    def __call__(self, *args, **kwargs):
        raise ExprTypeError(f"'{self.ir.name}' is a summary (traced once, kept by the cache); "
                            "it is not called", user_location(),
                            hint="pass it as @tw.score(summary=...) and read its fields")


@dataclasses.dataclass(frozen=True)
class ScoreDef:
    ir: ir.Score

    def __call__(self, *args, **kwargs):
        raise ExprTypeError(f"'{self.ir.name}' is a @tw.score (already traced): a score cannot "
                            "call a score, itself included", user_location(),
                            hint="write the shared formula as a plain Python function of (q, k) "
                            "and call it from each score")

    def __repr__(self) -> str:
        return f"<score {self.ir.name!r} per {self.ir.per}>"


def trace(f: Callable, args: tuple, what: str):
    """Call ``f`` on tracers; a Python error inside becomes an ``ExprTypeError`` at its line."""
    try:
        return f(*args)
    except TwilightError:
        raise
    except RecursionError as e:
        raise ExprTypeError(f"{what} '{f.__name__}' recurses without end (does it call itself?)",
                            raised_at(e) or user_location(),
                            hint="scores are traced once; write loops over constants, not "
                            "recursion over traced values") from None
    except NameError as e:
        raise ExprTypeError(f"{what} '{f.__name__}': {e}", raised_at(e) or user_location(),
                            hint="a score cannot call itself or a score defined later") from None
    except Exception as e:  # noqa: BLE001 - any construct the tracer cannot follow
        raise ExprTypeError(f"{what} '{f.__name__}' used something the tracer cannot follow: "
                            f"{type(e).__name__}: {e}", raised_at(e) or user_location(),
                            hint="scores are traced, not run: use the tw.* functions and Python "
                            "operators on traced values, Python numbers as constants") from None


def _field_value(v, fname: str, f: Callable, loc) -> ir.SummaryField:
    if not isinstance(v, Value) or v.rank != 1 or v.kind != "float":
        raise ExprTypeError(f"summary field '{fname}' must be a per-channel vector, e.g. "
                            "tw.min(k, axis=0) (page) or k @ P (token)",
                            getattr(getattr(v, "expr", None), "loc", None) or loc)
    return ir.SummaryField(str(fname), v.expr, v.expr.loc)


def _summary(per: str, fn: Callable | None, name: str | None):
    def build(f: Callable) -> SummaryDef:
        loc = user_location()
        k = leaf("page_k", 2, "summary") if per == "page" else leaf("k", 1, "token")
        with scope("summary" if per == "page" else "token"):
            out = trace(f, (k,), "summary")
        if not isinstance(out, dict) or not out:
            raise ExprTypeError(f"@{per}_summary '{f.__name__}' must return a non-empty dict of "
                                "name → " + ("reduction" if per == "page" else "vector"), loc)
        fields = tuple(_field_value(v, n, f, loc) for n, v in out.items())
        return SummaryDef(ir.Summary(name or f.__name__, fields, loc, per=per))
    return build(fn) if fn is not None else build


def page_summary(fn: Callable | None = None, *, name: str | None = None):
    """Declare what the cache keeps per page and KV head: a dict of reductions of the page's keys
    over its tokens (``tw.min(k, axis=0)``, ``tw.mean(...)``, ``tw.absmax(...)``, ``k[:, chans]``,
    ``k @ P``)."""
    return _summary("page", fn, name)


def token_summary(fn: Callable | None = None, *, name: str | None = None):
    """Declare what the cache keeps per token and KV head, computed once on append: a dict of
    vectors over each key ``k`` — a projection ``k @ P`` (Loki), a channel subset ``k[chans]``
    (Double Sparsity's label cache), any elementwise map. A per-token score reads them with
    ``summary=``::

        @tw.token_summary
        def low_rank(k):
            return dict(kp=k @ P)                 # P: [head_dim, r] or [kv_heads, head_dim, r]

        @tw.score(per="token", summary=low_rank)
        def approx(q, tok):
            return tw.dot(q @ P, tok.kp)
    """
    return _summary("token", fn, name)


class _SummaryView:
    """The second argument of a score over a summary: its attributes are the summary's fields."""

    def __init__(self, summary: ir.Summary):
        self._summary = summary

    def __getattr__(self, name: str) -> Value:
        if name not in self._summary.field_names():
            raise UnknownSummaryError(
                f"unknown summary field '{name}'; summary '{self._summary.name}' has: "
                f"{', '.join(self._summary.field_names())}", user_location(),
                hint=f"use one of the fields the @tw.{self._summary.per}_summary function "
                "returns")
        fld = self._summary.fields[self._summary.field_names().index(name)]
        width, chans = _width(fld.expr)
        # a field over a channel subset (k[:, chans]) keeps its width, so q can meet it there
        return dataclasses.replace(leaf("summary", 1, "score", field=name), width=width,
                                   chans=chans)


def _width(e: ir.Expr) -> tuple[int | None, object]:
    """Channel count of a summary field (None: head_dim) and its channels, if one list."""
    if e.op == "project":
        return e.attr("matrix").out_width, None
    for node in e.walk():
        if node.op == "take":
            chans = node.attr("channels")
            return (len(chans[0]) if isinstance(chans[0], tuple) else len(chans)), chans
        if node.op == "project":
            return node.attr("matrix").out_width, None
    return None, None


def score(per: str = "page", summary: SummaryDef | None = None, name: str | None = None):
    """Declare a score: ``per="page"`` over a page summary, ``per="token"`` over the key (or a
    ``@tw.token_summary``).

    The function gets ``(q, page)``, ``(q, k)`` or ``(q, tok)`` tracers and returns one scalar
    (reduce over head_dim with ``tw.sum``, ``tw.max``, ``tw.mean``, ``tw.dot``)."""
    loc = user_location()
    if per not in ("page", "token"):
        raise StructureError(f"score per={per!r}: use per='page' or per='token'", loc)
    if summary is not None and not isinstance(summary, SummaryDef):
        raise StructureError("summary= takes a @tw.page_summary or @tw.token_summary function",
                             loc)
    if per == "page" and (summary is None or summary.ir.per != "page"):
        raise StructureError("a per-page score needs summary=<a @tw.page_summary function>", loc)
    if per == "token" and summary is not None and summary.ir.per != "token":
        raise StructureError("a per-token score reads the key itself (or a @tw.token_summary); "
                             "drop summary=", loc,
                             hint="use per='page' to score pages by their summary")

    def build(f: Callable) -> ScoreDef:
        floc = user_location()
        if not callable(f) or len(inspect.signature(f).parameters) != 2:
            raise StructureError(f"score '{getattr(f, '__name__', f)}' must take two "
                                 "arguments: (q, page) or (q, k)", floc)
        second = _SummaryView(summary.ir) if summary is not None else leaf("k", 1, "score")
        with scope("score"):
            out = trace(f, (leaf("q", 1, "score"), second), "score")
        if not isinstance(out, Value) or out.rank != 0 or out.kind != "float":
            raise ExprTypeError(f"score '{f.__name__}' must return one scalar per {per}; reduce "
                                "over head_dim with tw.sum(...) (or tw.max, tw.mean, tw.dot)",
                                getattr(getattr(out, "expr", None), "loc", None) or floc)
        return ScoreDef(ir.Score(name or f.__name__, per, out.expr,
                                 summary.ir if summary else None, floc))
    return build


def check_score(s, where: str) -> None:
    if not isinstance(s, ScoreDef):
        what = "a function" if callable(s) else f"a {type(s).__name__}"
        raise StructureError(f"tw.{where}: expected a @tw.score function, got {what}",
                             user_location(), hint="decorate the function with @tw.score(...)")
