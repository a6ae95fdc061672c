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
from collections.abc import Sequence

from ..compiler import ir
from ..errors import StructureError
from .location import user_location
from .rules import (
    _check_group,
    _short,
    attention,
    exact_keys,
    fraction,
    nothing,
    quantized_keys,
    sink,
    threshold,
    tokens,
    top_k,
    top_p,
    window,
)
from .score import ScoreDef, SummaryDef, page_summary, score, token_summary

__all__ = ["Pipeline", "ScoreDef", "SummaryDef", "attention", "exact_keys", "fraction",
           "nothing", "page_summary", "quantized_keys", "score", "sink", "threshold",
           "token_summary", "tokens", "top_k", "top_p", "window"]


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
            raise StructureError(f"select= takes tw.top_k(score, ...), tw.threshold(score, ...) "
                                 f"or tw.top_p(score, p), got {_what(select)}", loc)
        prunes = _prunes(prune, loc)
        _check_parts(keep, attend, name, loc)
        problem = ir.page_size_problem(page_size)
        if problem:
            raise StructureError(problem, loc)
        if select is None and not prunes and (keep or ir.Keep()) != ir.Keep():
            raise StructureError(
                "keep= without select= or prune= would attend every token anyway (no select "
                "means every token is a candidate)", loc,
                hint="select=tw.nothing() attends only the kept tokens (StreamingLLM); or drop "
                     "keep=")
        sel = select and _with_group(select, group or _DEFAULT_GROUP["select"])
        prunes = tuple(dataclasses.replace(p, group=p.group or group or _DEFAULT_GROUP["prune"])
                       for p in prunes)
        attend = attend or ir.Attend()
        if not isinstance(attend, ir.Attend):
            raise StructureError(f"attend= takes tw.attention(...), got {_what(attend)}", loc)
        if attend.mean_value and not (sel and sel.score and sel.score.per == "token"):
            raise StructureError("attention(mean_value=True) needs one selector with a per-token "
                                 "score: its softmax weighs what the attended tokens hold",
                                 attend.loc or loc,
                                 hint="select=tw.top_k(per_token_score, budget), as SparQ does")
        self.ir = ir.PipelineIR(name or _default_name(sel, prunes), page_size, sel, prunes,
                                keep or ir.Keep(), attend, loc)

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


def _with_group(s: ir.Select, group: str) -> ir.Select:
    """``s`` (and each part of a combination) with the pipeline's group where it set none."""
    if s.parts:
        return dataclasses.replace(s, parts=tuple(_with_group(p, group) for p in s.parts))
    return dataclasses.replace(s, group=s.group or group)


def _prunes(prune, loc) -> tuple[ir.Prune, ...]:
    """``prune=`` as a tuple of pruners: one, a sequence of them, or None."""
    if prune is None:
        return ()
    if isinstance(prune, ir.Prune):
        return (prune,)
    if isinstance(prune, ir.Select):
        raise StructureError(
            "prune= got a selector (a tw.top_k/tw.threshold/tw.top_p with a score); a pruner "
            "ranks the candidates' estimated weights", loc,
            hint="pass it as select=, or drop the score: tw.top_k(budget=..., estimate=...)")
    items = tuple(prune) if isinstance(prune, list | tuple) else (prune,)
    for p in items:
        if not isinstance(p, ir.Prune):
            raise StructureError(f"prune= takes tw.top_p(...), or tw.top_k/tw.threshold "
                                 f"without a score (or a list of them), got {_what(p)}", loc)
    return items


def _check_parts(keep, attend, name, loc) -> None:
    if keep is not None and not isinstance(keep, ir.Keep):
        raise StructureError(f"keep= takes tw.sink(n), tw.window(n) or both joined with |, got "
                             f"{_what(keep)}", loc)
    if attend is not None and not isinstance(attend, ir.Attend):
        raise StructureError(f"attend= takes tw.attention(...), got {_what(attend)}", loc)
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise StructureError(f"name={name!r} must be a non-empty string", loc)


def _what(x) -> str:
    if isinstance(x, ir.Prune | ir.Select):
        return f"a {type(x).__name__.lower()} rule"
    return _short(x) if isinstance(x, int | float | str) else f"a {type(x).__name__}"


def _sel_name(s: ir.Select) -> str:
    if s.parts:
        return ("|" if s.rule == "union" else "&").join(_sel_name(p) for p in s.parts)
    return s.score.name if s.score else "keep_only"


def _default_name(sel: ir.Select | None, prunes: tuple[ir.Prune, ...]) -> str:
    parts = [_sel_name(sel) if sel else "dense"] + [p.rule for p in prunes]
    return "+".join(parts)
