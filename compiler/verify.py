"""The IR verifier: structural checks always, shape checks when a ``Shape`` is known.

Runs after the frontend and between compiler passes; every error names the DSL line that
made the offending node, and the stage that ran the check (``stage=``).
"""

from __future__ import annotations

from ..errors import BudgetError, ChannelIndexError, ExprTypeError, StructureError
from . import ir


def verify(p: ir.PipelineIR, shape: ir.Shape | None = None, stage: str = "frontend") -> None:
    """Raise a ``PipelineError`` if ``p`` is malformed (for ``shape``, when given)."""
    where = f" (verifier after stage '{stage}')" if stage != "frontend" else ""
    if p.page_size < 1 or p.page_size & (p.page_size - 1):
        raise StructureError(f"page_size {p.page_size} is not a power of two{where}", p.loc)
    if p.select is not None:
        _verify_select(p.select, where)
    for pr in p.prune:
        _verify_prune(pr, where)
    if shape is not None:
        _verify_shape(p, shape, where)


def _verify_select(s: ir.Select, where: str) -> None:
    if s.group not in ir.GROUP_MODES:
        raise StructureError(f"unknown group mode {s.group!r}{where}", s.loc)
    if s.rule == "top_k":
        _verify_budget(s.budget, s.loc, where)
    elif s.rule == "none":
        return
    elif s.rule != "threshold":
        raise StructureError(f"unknown selection rule {s.rule!r}{where}", s.loc)
    sc = s.score
    if sc is None:
        raise StructureError(f"a '{s.rule}' selector needs a score{where}", s.loc)
    if sc.per == "page" and sc.summary is None:
        raise StructureError(f"per-page score '{sc.name}' has no summary{where}", sc.loc)
    names = sc.summary.field_names() if sc.summary else ()
    for node in sc.expr.walk():
        if node.op not in ir.ALL_OPS:
            raise ExprTypeError(f"unknown op {node.op!r}{where}", node.loc)
        if node.op == "summary" and node.attr("field") not in names:
            raise StructureError(f"score '{sc.name}' reads unknown summary field "
                                 f"{node.attr('field')!r}{where}", node.loc)
        if node.op in ("k", "page_k") and sc.per == "page" and node.op == "k":
            raise StructureError(f"per-page score '{sc.name}' reads a key{where}", node.loc)


def _verify_prune(p: ir.Prune, where: str) -> None:
    if p.group not in ir.GROUP_MODES:
        raise StructureError(f"unknown group mode {p.group!r}{where}", p.loc)
    if p.rule == "top_p":
        if p.p is None or not 0 < p.p <= 1:
            raise BudgetError(f"top_p p={p.p!r} must lie in (0, 1]{where}", p.loc)
    elif p.rule == "top_k":
        _verify_budget(p.budget, p.loc, where)
    elif p.rule != "threshold":
        raise StructureError(f"unknown prune rule {p.rule!r}{where}", p.loc)
    e = p.estimator
    if e.kind not in ("exact", "quantized"):
        raise StructureError(f"unsupported estimator kind {e.kind!r}{where}", e.loc)
    problem = e.kind == "quantized" and ir.code_problem(e.bits, e.granularity, e.group_pages,
                                                        e.smooth)
    if problem:
        raise StructureError(f"quantized keys: {problem}{where}", e.loc)


def _verify_budget(b: ir.Budget | None, loc, where: str) -> None:
    if b is None or b.value <= 0 or (b.kind == "fraction" and b.value > 1):
        raise BudgetError(f"budget {b!r} out of range{where}", getattr(b, "loc", None) or loc)


def _verify_shape(p: ir.PipelineIR, shape: ir.Shape, where: str) -> None:
    if shape.q_heads % shape.kv_heads:
        raise StructureError(f"q_heads={shape.q_heads} is not a multiple of "
                             f"kv_heads={shape.kv_heads}{where}", p.loc)
    if shape.page_size != p.page_size:
        raise StructureError(f"pipeline '{p.name}' is built for page_size={p.page_size}, the "
                             f"cache has page_size={shape.page_size}{where}", p.loc,
                             hint=f"pass page_size={shape.page_size} to tw.Pipeline(...)")
    exprs = [f.expr for s in p.summaries() for f in s.fields]
    exprs += [p.select.score.expr] if p.select and p.select.score else []
    for e in exprs:
        for node in e.walk():
            if node.op == "take":
                check_channels(node, shape.head_dim, shape.kv_heads, where)


def check_channels(node: ir.Expr, head_dim: int, kv_heads: int, where: str = "") -> None:
    chans = node.attr("channels")
    rows = chans if isinstance(chans[0], tuple) else (chans,)
    if isinstance(chans[0], tuple) and len(rows) != kv_heads:
        raise ChannelIndexError(f"per-head channel table has {len(rows)} rows but the cache has "
                                f"{kv_heads} KV heads{where}", node.loc,
                                hint="calibrate the channels for this model's KV heads")
    bad = max(max(r) for r in rows)
    if bad >= head_dim:
        raise ChannelIndexError(f"channel index {bad} ≥ head_dim {head_dim}{where}", node.loc,
                                hint=f"channels must lie in [0, {head_dim})")
