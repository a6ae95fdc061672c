"""The pipeline DSL: page summaries, scores, budget rules, pruners, and ``Pipeline``.

Example — Quest followed by Twilight's top-p, written with the DSL alone::

    import twilight as tw

    @tw.page_summary
    def minmax(k):                       # k: the keys of one page, tokens × head_dim
        return dict(kmin=tw.min(k, axis=0), kmax=tw.max(k, axis=0))

    @tw.score(per="page", summary=minmax)
    def quest(q, page):                  # an upper bound of q·k over the page
        return tw.sum(tw.maximum(q * page.kmin, q * page.kmax))

    pipeline = tw.Pipeline(
        select=tw.top_k(quest, budget=tw.tokens(1024)),
        prune=tw.top_p(0.9, estimate=tw.quantized_keys(bits=4)),
        keep=tw.sink(4) | tw.window(16),
    )
    print(pipeline.key()[:12])
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence

from ..compiler import ir
from ..errors import BudgetError, ExprTypeError, StructureError, UnknownSummaryError
from .location import user_location
from .trace import Value, leaf


# ---- page summaries ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SummaryDef:
    ir: ir.Summary


def page_summary(fn: Callable | None = None, *, name: str | None = None):
    """Declare what the cache keeps per page and KV head: a dict of reductions of the page's keys
    over its tokens (``tw.min(k, axis=0)``, ``tw.mean(...)``, ``tw.absmax(...)``, ``k[:, chans]``)."""
    def build(f: Callable) -> SummaryDef:
        loc = user_location()
        out = f(leaf("page_k", 2, "summary"))
        if not isinstance(out, dict) or not out:
            raise ExprTypeError(f"@page_summary '{f.__name__}' must return a non-empty dict of "
                                "name → reduction", loc)
        fields = []
        for fname, v in out.items():
            if not isinstance(v, Value) or v.rank != 1:
                raise ExprTypeError(f"summary field '{fname}' must be a per-channel vector that "
                                    "reduces the page's tokens, e.g. tw.min(k, axis=0)",
                                    getattr(getattr(v, "expr", None), "loc", None) or loc)
            fields.append(ir.SummaryField(str(fname), v.expr, v.expr.loc))
        return SummaryDef(ir.Summary(name or f.__name__, tuple(fields), loc))
    return build(fn) if fn is not None else build


class _PageView:
    """The second argument of a per-page score: its attributes are the summary's fields."""

    def __init__(self, summary: ir.Summary):
        self._summary = summary

    def __getattr__(self, name: str) -> Value:
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in self._summary.field_names():
            raise UnknownSummaryError(
                f"unknown summary field '{name}'; summary '{self._summary.name}' has: "
                f"{', '.join(self._summary.field_names())}", user_location(),
                hint="use one of the fields the @tw.page_summary function returns")
        fld = self._summary.fields[self._summary.field_names().index(name)]
        # a field over a channel subset (k[:, chans]) keeps its width, so q[chans] can meet it
        return dataclasses.replace(leaf("summary", 1, "score", field=name),
                                   width=_width(fld.expr))


def _width(e: ir.Expr) -> int | None:
    """Channel count of a vector expression: its channel selection's, or None (head_dim)."""
    for node in e.walk():
        if node.op == "take":
            chans = node.attr("channels")
            return len(chans[0]) if isinstance(chans[0], tuple) else len(chans)
    return None


# ---- scores ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScoreDef:
    ir: ir.Score


def score(per: str = "page", summary: SummaryDef | None = None, name: str | None = None):
    """Declare a score: ``per="page"`` over a page summary, ``per="token"`` over the key.

    The function gets ``(q, page)`` or ``(q, k)`` tracers and returns one scalar
    (reduce over head_dim with ``tw.sum``, ``tw.max``, ``tw.mean``, ``tw.dot``)."""
    loc = user_location()
    if per not in ("page", "token"):
        raise StructureError(f"score per={per!r}: use per='page' or per='token'", loc)
    if per == "page" and not isinstance(summary, SummaryDef):
        raise StructureError("a per-page score needs summary=<a @tw.page_summary function>", loc)
    if per == "token" and summary is not None:
        raise StructureError("a per-token score reads the key itself; drop summary=", loc,
                             hint="use per='page' to score pages by their summary")

    def build(f: Callable) -> ScoreDef:
        floc = user_location()
        if len(inspect.signature(f).parameters) != 2:
            raise StructureError(f"score '{f.__name__}' must take two arguments: (q, page) or "
                                 "(q, k)", floc)
        second = _PageView(summary.ir) if per == "page" else leaf("k", 1, "score")
        out = f(leaf("q", 1, "score"), second)
        if not isinstance(out, Value) or out.rank != 0:
            raise ExprTypeError(f"score '{f.__name__}' must return one scalar per {per}; reduce "
                                "over head_dim with tw.sum(...) (or tw.max, tw.mean, tw.dot)",
                                getattr(getattr(out, "expr", None), "loc", None) or floc)
        return ScoreDef(ir.Score(name or f.__name__, per, out.expr,
                                 summary.ir if summary else None, floc))
    return build


# ---- budgets and estimators ----------------------------------------------------------------------
def tokens(n: int) -> ir.Budget:
    """A budget of ``n`` tokens (a per-page rule keeps ceil(n / page_size) pages)."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise BudgetError(f"tw.tokens({n!r}): a budget must be a positive whole number of tokens",
                          user_location())
    return ir.Budget("tokens", float(n), user_location())


def fraction(f: float) -> ir.Budget:
    """A budget of ``ceil(f · context)`` tokens, per request."""
    if not (isinstance(f, int | float) and 0 < f <= 1):
        raise BudgetError(f"tw.fraction({f!r}): the fraction must lie in (0, 1]", user_location())
    return ir.Budget("fraction", float(f), user_location())


def exact_keys() -> ir.Estimator:
    """Estimate with the full-precision keys (the fidelity reference; costs a full key read)."""
    return ir.Estimator("exact", 16, "token", user_location())


def quantized_keys(bits: int = 4, granularity: str = "token", *, pages: int | None = None,
                   smooth: bool | float = False) -> ir.Estimator:
    """Estimate with low-bit (2/4/8) min-max key codes kept in the paged cache.

    ``granularity``:

    * ``"token"`` — per token over head_dim, as published; ``smooth=True`` first divides keys
      by per-channel factors, each channel's absolute maximum on the cache's first append, so
      that a few outlier channels do not set every token's range; ``smooth=α`` in (0, 1] uses
      ``absmax^α`` (α < 1 flattens the channels less);
    * ``"page"`` — per channel within a page, zero point and scale from the page's key min/max
      (Quest's summary, shared with it): survives outlier key channels;
    * ``"group"`` — per channel within a group of ``pages`` consecutive pages (default 4):
      the page variant's robustness with ``pages``x less side data.
    """
    loc = user_location()
    g = (4 if granularity == "group" else 1) if pages is None else pages
    alpha = 1.0 if smooth is True else 0.0 if smooth is False else smooth
    problem = ir.code_problem(bits, granularity, g, alpha)
    if problem:
        raise StructureError(f"quantized_keys: {problem}", loc)
    return ir.Estimator("quantized", bits, granularity, loc, group_pages=g,
                        smooth=float(alpha))


# ---- budget rules --------------------------------------------------------------------------------
def _check_group(group: str | None):
    if group is not None and group not in ir.GROUP_MODES:
        raise StructureError(f"group={group!r}: use one of {', '.join(ir.GROUP_MODES)}",
                             user_location())


def top_k(score: ScoreDef | None = None, budget: ir.Budget | int | None = None, *,
          estimate: ir.Estimator | None = None, group: str | None = None):
    """Keep the ``budget`` highest-scoring tokens (pages: ceil(budget/page_size) pages).

    With a score it is a selector; without one it is a pruner ranking estimated weights."""
    budget = tokens(budget) if isinstance(budget, int) else budget
    if not isinstance(budget, ir.Budget):
        raise BudgetError("top_k needs budget=tw.tokens(N) or tw.fraction(F)", user_location())
    _check_group(group)
    if score is not None:
        _check_score(score)
        return ir.Select(score.ir, "top_k", budget=budget, group=group, loc=user_location())
    return ir.Prune("top_k", _estimator(estimate), budget=budget, group=group,
                    loc=user_location())


def threshold(score: ScoreDef | None = None, value: float = 0.0, *,
              estimate: ir.Estimator | None = None, group: str | None = None):
    """Keep what scores ≥ ``value`` (a selector), or whose estimated weight is ≥ ``value``
    (a pruner, when no score is given)."""
    if not (isinstance(value, int | float) and math.isfinite(value)):
        raise BudgetError(f"threshold value {value!r} must be a finite number", user_location())
    _check_group(group)
    if score is not None:
        _check_score(score)
        return ir.Select(score.ir, "threshold", threshold=float(value), group=group,
                         loc=user_location())
    return ir.Prune("threshold", _estimator(estimate), threshold=float(value), group=group,
                    loc=user_location())


def top_p(p: float = 0.9, *, estimate: ir.Estimator | None = None,
          group: str | None = None) -> ir.Prune:
    """Keep the fewest candidates whose estimated attention mass is ≥ ``p`` (Twilight).

    ``p`` is relative to the mass inside the candidate set; ``estimate`` defaults to INT4 keys."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
        raise BudgetError(f"top_p(p={p!r}): p must lie in (0, 1]", user_location(),
                          hint="typical values are 0.85–0.95")
    _check_group(group)
    return ir.Prune("top_p", _estimator(estimate), p=float(p), group=group, loc=user_location())


def _estimator(e: ir.Estimator | None) -> ir.Estimator:
    if e is None:
        return ir.Estimator("quantized", 4, "token", user_location())
    if not isinstance(e, ir.Estimator):
        raise StructureError(f"estimate={e!r}: use tw.quantized_keys(...) or tw.exact_keys()",
                             user_location())
    return e


def _check_score(s) -> None:
    if not isinstance(s, ScoreDef):
        raise StructureError(f"expected a @tw.score function, got {type(s).__name__}",
                             user_location(), hint="decorate the function with @tw.score(...)")


def nothing() -> ir.Select:
    """A selector that selects no candidates: only the keep rules' tokens are attended
    (StreamingLLM is ``Pipeline(select=tw.nothing(), keep=tw.sink(4) | tw.window(1020))``)."""
    return ir.Select(None, "none", group="none", loc=user_location())


def sink(n: int) -> ir.Keep:
    """Always keep the first ``n`` tokens (attention sinks)."""
    return ir.Keep(sink=_count("sink", n), loc=user_location())


def window(n: int) -> ir.Keep:
    """Always keep the last ``n`` tokens."""
    return ir.Keep(window=_count("window", n), loc=user_location())


def _count(what: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise BudgetError(f"tw.{what}({n!r}) needs a whole number ≥ 0", user_location())
    return n


def attention(scale: float | None = None, softcap: float | None = None) -> ir.Attend:
    """Exact attention over the kept tokens. ``scale`` defaults to 1/sqrt(head_dim);
    ``softcap`` caps logits as ``softcap · tanh(logit / softcap)``."""
    for nm, v in (("scale", scale), ("softcap", softcap)):
        if v is not None and not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise BudgetError(f"attention({nm}={v!r}) must be a positive finite number",
                              user_location())
    return ir.Attend(None if scale is None else float(scale),
                     None if softcap is None else float(softcap), user_location())


# ---- the pipeline --------------------------------------------------------------------------------
_DEFAULT_GROUP = {"select": "max", "prune": "union"}


class Pipeline:
    """select → prune → attend, lowered to one immutable ``PipelineIR`` at construction."""

    def __init__(self, select: ir.Select | None = None,
                 prune: ir.Prune | Sequence[ir.Prune] | None = None,
                 attend: ir.Attend | None = None, keep: ir.Keep | None = None, *,
                 page_size: int = 16, group: str | None = None, name: str | None = None):
        loc = user_location()
        _check_group(group)
        if select is not None and not isinstance(select, ir.Select):
            raise StructureError(f"select= takes tw.top_k(score, ...) or tw.threshold(score, ...),"
                                 f" got {_what(select)}", loc)
        prunes = () if prune is None else (prune,) if isinstance(prune, ir.Prune) else tuple(prune)
        for p in prunes:
            if not isinstance(p, ir.Prune):
                raise StructureError(f"prune= takes tw.top_p(...), or tw.top_k/tw.threshold "
                                     f"without a score, got {_what(p)}", loc)
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1 \
                or page_size & (page_size - 1):
            raise StructureError(f"page_size={page_size!r} must be a power of two", loc)
        sel = select and dataclasses.replace(select, group=select.group or group
                                             or _DEFAULT_GROUP["select"])
        prunes = tuple(dataclasses.replace(p, group=p.group or group or _DEFAULT_GROUP["prune"])
                       for p in prunes)
        self.ir = ir.PipelineIR(name or _default_name(sel, prunes), page_size, sel, prunes,
                                keep or ir.Keep(), attend or ir.Attend(), loc)

    @classmethod
    def from_ir(cls, p: ir.PipelineIR) -> Pipeline:
        """A ``Pipeline`` around an existing IR (e.g. one a pass rewrote)."""
        obj = cls.__new__(cls)
        obj.ir = p
        return obj

    def key(self) -> str:
        return self.ir.key()

    @property
    def name(self) -> str:
        return self.ir.name

    def __repr__(self) -> str:
        return f"Pipeline({self.ir.name!r}, key={self.key()[:12]})"


def _what(x) -> str:
    return type(x).__name__ if not isinstance(x, ir.Prune | ir.Select) else \
        f"a {type(x).__name__.lower()} rule"


def _default_name(sel: ir.Select | None, prunes: tuple[ir.Prune, ...]) -> str:
    parts = [(sel.score.name if sel.score else "keep_only") if sel else "dense"] + [p.rule for p in prunes]
    return "+".join(parts)
