"""Budgets, key estimators, selection and pruning rules, keep rules and attention options.

A rule with a score is a selector (``tw.top_k(score, budget)``, ``tw.threshold(score, t)``,
``tw.top_p(score, p)``); without one it is a pruner over estimated attention weights.
Budgets and selectors combine: ``|`` is the larger set, ``&`` the smaller::

    tw.top_k(quest, tw.tokens(1024) | tw.fraction(0.1))    # max(1024, ceil(0.1 · context))
    tw.top_k(quest, tw.tokens(256)) | tw.threshold(quest, 4.0)   # either rule keeps a page
    tw.sink(4) | tw.window(64)                              # keep rules: both (also with +)
"""

from __future__ import annotations

import math

from ..compiler import ir
from ..errors import BudgetError, StructureError
from .location import user_location
from .score import ScoreDef, check_score


def tokens(n: int) -> ir.Budget:
    """A budget of ``n`` tokens (a per-page rule keeps ceil(n / page_size) pages)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= ir.MAX_TOKENS:
        raise BudgetError(f"tw.tokens({_short(n)}): a budget must be a whole number of tokens "
                          f"from 1 to {ir.MAX_TOKENS} (token counts are int32)", user_location())
    return ir.Budget("tokens", float(n), user_location())


def fraction(f: float) -> ir.Budget:
    """A budget of ``ceil(f · context)`` tokens, per request."""
    if isinstance(f, bool) or not (isinstance(f, int | float) and 0 < f <= 1):
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

    A selector takes one too (``tw.top_k(score, budget, estimate=...)``): its per-token score's
    ``k`` then reads these codes instead of the keys.
    """
    loc = user_location()
    g = (4 if granularity == "group" else 1) if pages is None else pages
    alpha = 1.0 if smooth is True else 0.0 if smooth is False else smooth
    problem = ir.code_problem(bits, granularity, g, alpha)
    if problem:
        raise StructureError(f"quantized_keys: {problem}", loc)
    return ir.Estimator("quantized", bits, granularity, loc, group_pages=g,
                        smooth=float(alpha))


# ---- rules ---------------------------------------------------------------------------------------
def _check_group(group: str | None):
    if group is not None and group not in ir.GROUP_MODES:
        raise StructureError(f"group={group!r}: use one of {', '.join(ir.GROUP_MODES)}",
                             user_location())


def _as_budget(budget, what: str) -> ir.Budget:
    if isinstance(budget, int) and not isinstance(budget, bool):
        return tokens(budget)
    if not isinstance(budget, ir.Budget):
        got = "nothing" if budget is None else f"a {type(budget).__name__}"
        raise BudgetError(f"{what} needs budget=tw.tokens(N), tw.fraction(F) or a combination "
                          f"(tw.tokens(N) | tw.fraction(F)), got {got}", user_location())
    return budget


def _selector_estimate(score: ScoreDef, estimate) -> ir.Estimator | None:
    """The keys a selector's per-token score reads (None: the keys themselves)."""
    if estimate is None:
        return None
    e = _estimator(estimate)
    if score.ir.per != "token" or score.ir.summary is not None:
        raise StructureError(f"estimate= on selector '{score.ir.name}': only a per-token score "
                             "over the key (k) reads key codes; this one reads a summary",
                             user_location(), hint="drop estimate=, or score per token over k")
    return None if e.kind == "exact" else e


def top_k(score: ScoreDef | None = None, budget: ir.Budget | int | None = None, *,
          estimate: ir.Estimator | None = None, group: str | None = None):
    """Keep the ``budget`` highest-scoring tokens (pages: ceil(budget/page_size) pages).

    With a score it is a selector (``estimate=`` then picks the keys its ``k`` reads); without
    one it is a pruner ranking estimated weights."""
    _check_group(group)
    if score is not None:
        check_score(score, "top_k")
        budget = _as_budget(budget, f"tw.top_k({score.ir.name}, ...)")
        return ir.Select(score.ir, "top_k", budget=budget, group=group, loc=user_location(),
                         estimator=_selector_estimate(score, estimate))
    budget = _as_budget(budget, "tw.top_k(budget=...)")
    return ir.Prune("top_k", _estimator(estimate), budget=budget, group=group,
                    loc=user_location())


def threshold(score: ScoreDef | None = None, value: float = 0.0, *,
              estimate: ir.Estimator | None = None, group: str | None = None):
    """Keep what scores ≥ ``value`` (a selector), or whose estimated weight is ≥ ``value``
    (a pruner, when no score is given)."""
    if isinstance(value, bool) or not (isinstance(value, int | float) and math.isfinite(value)):
        raise BudgetError(f"threshold value {_short(value)} must be a finite number",
                          user_location())
    _check_group(group)
    if score is not None:
        check_score(score, "threshold")
        return ir.Select(score.ir, "threshold", threshold=float(value), group=group,
                         loc=user_location(), estimator=_selector_estimate(score, estimate))
    return ir.Prune("threshold", _estimator(estimate), threshold=float(value), group=group,
                    loc=user_location())


def top_p(score=None, p: float | None = None, *, estimate: ir.Estimator | None = None,
          group: str | None = None):
    """Keep the fewest candidates whose attention mass is ≥ ``p``.

    ``tw.top_p(p, estimate=...)`` is Twilight's pruner: ``p`` of the estimated mass inside the
    candidate set (``estimate`` defaults to INT4 keys). ``tw.top_p(score, p)`` is a selector:
    the fewest tokens (pages) holding ``p`` of ``softmax(score)`` over the whole context, the
    score read as a logit."""
    _check_group(group)
    if isinstance(score, ScoreDef):
        p = 0.9 if p is None else p
        _check_p(p)
        return ir.Select(score.ir, "top_p", group=group, loc=user_location(), p=float(p),
                         estimator=_selector_estimate(score, estimate))
    if score is not None and (p is not None or callable(score)):
        check_score(score, "top_p")
    p = (0.9 if score is None else score) if p is None else p
    _check_p(p)
    return ir.Prune("top_p", _estimator(estimate), p=float(p), group=group, loc=user_location())


def _check_p(p) -> None:
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
        raise BudgetError(f"top_p(p={_short(p)}): p must lie in (0, 1]", user_location(),
                          hint="typical values are 0.85–0.95; a selector is "
                          "tw.top_p(score, p)")


def _short(x) -> str:
    """A value for an error message: its repr if short, else its type."""
    text = repr(x)
    return text if len(text) <= 40 else f"<a {type(x).__name__}>"


def _estimator(e: ir.Estimator | None) -> ir.Estimator:
    if e is None:
        return ir.Estimator("quantized", 4, "token", user_location())
    if not isinstance(e, ir.Estimator):
        raise StructureError(f"estimate={_short(e)}: use tw.quantized_keys(...) or "
                             "tw.exact_keys()", user_location())
    return e


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
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= ir.MAX_TOKENS:
        raise BudgetError(f"tw.{what}({_short(n)}) needs a whole number of tokens from 0 to "
                          f"{ir.MAX_TOKENS} (token counts are int32)", user_location())
    return n


def attention(scale: float | None = None, softcap: float | None = None, *,
              mean_value: bool = False) -> ir.Attend:
    """Exact attention over the kept tokens. ``scale`` defaults to 1/sqrt(head_dim);
    ``softcap`` caps logits as ``softcap · tanh(logit / softcap)``.

    ``mean_value=True`` is SparQ's reallocation: ``y = α·attn + (1 - α)·mean(V)``, with ``α``
    the mass of the attended tokens under ``softmax(score)`` of the selector (a per-token
    ``top_k`` score, read as a logit) over the whole context, and ``mean(V)`` the mean value of
    the context (the cache keeps a running sum of V)."""
    for nm, v in (("scale", scale), ("softcap", softcap)):
        if v is not None and (isinstance(v, bool) or not (isinstance(v, int | float)
                                                          and math.isfinite(v) and v > 0)):
            raise BudgetError(f"attention({nm}={_short(v)}) must be a positive finite number",
                              user_location())
    if not isinstance(mean_value, bool):
        raise StructureError(f"attention(mean_value={_short(mean_value)}): True or False",
                             user_location())
    return ir.Attend(None if scale is None else float(scale),
                     None if softcap is None else float(softcap), user_location(),
                     mean_value=mean_value)
