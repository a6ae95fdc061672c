"""The IR verifier: structural checks always, shape checks when a ``Shape`` is known.

Runs after the frontend and between compiler passes; every error names the DSL line that
made the offending node, and the stage that ran the check (``stage=``).
"""

from __future__ import annotations

import math

from ..errors import BudgetError, ChannelIndexError, ExprTypeError, StructureError
from . import ir


def verify(p: ir.PipelineIR, shape: ir.Shape | None = None, stage: str = "frontend") -> None:
    """Raise a ``PipelineError`` if ``p`` is malformed (for ``shape``, when given)."""
    where = f" (verifier after stage '{stage}')" if stage != "frontend" else ""
    problem = ir.page_size_problem(p.page_size)
    if problem:
        raise StructureError(f"{problem}{where}", p.loc)
    _verify_keep(p.keep, where)
    for name in ("scale", "softcap"):
        v = getattr(p.attend, name)
        if v is not None and not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise BudgetError(f"attention {name}={v!r} must be a positive finite number{where}",
                              p.attend.loc)
    if p.select is not None:
        _verify_select(p.select, where)
    for pr in p.prune:
        _verify_prune(pr, where)
    _verify_attend(p, where)
    if shape is not None:
        _verify_shape(p, shape, where)


def _verify_select(s: ir.Select, where: str) -> None:
    if s.group not in ir.GROUP_MODES:
        raise StructureError(f"unknown group mode {s.group!r}{where}", s.loc)
    if s.rule in ("union", "intersect"):
        if len(s.parts) < 2:
            raise StructureError(f"a selector {s.rule} needs two or more parts{where}", s.loc)
        for part in s.parts:
            _verify_select(part, where)
        return
    if s.rule == "top_k":
        _verify_budget(s.budget, s.loc, where)
    elif s.rule == "top_p":
        if s.p is None or not 0 < s.p <= 1:
            raise BudgetError(f"top_p p={s.p!r} must lie in (0, 1]{where}", s.loc)
    elif s.rule == "none":
        return
    elif s.rule != "threshold":
        raise StructureError(f"unknown selection rule {s.rule!r}{where}", s.loc)
    sc = s.score
    if sc is None:
        raise StructureError(f"a '{s.rule}' selector needs a score{where}", s.loc)
    if sc.per == "page" and (sc.summary is None or sc.summary.per != "page"):
        raise StructureError(f"per-page score '{sc.name}' has no page summary{where}", sc.loc)
    if s.estimator is not None:
        _verify_estimator(s.estimator, where)
        if sc.per != "token" or sc.summary is not None:
            raise StructureError(f"selector '{sc.name}' reads key codes but its score does not "
                                 f"read the key{where}", s.loc)
    names = sc.summary.field_names() if sc.summary else ()
    for node in sc.expr.walk():
        if node.op not in ir.ALL_OPS:
            raise ExprTypeError(f"unknown op {node.op!r}{where}", node.loc)
        if node.op == "summary" and node.attr("field") not in names:
            raise StructureError(f"score '{sc.name}' reads unknown summary field "
                                 f"{node.attr('field')!r}{where}", node.loc)
        if node.op == "k" and (sc.per == "page" or sc.summary is not None):
            raise StructureError(f"score '{sc.name}' reads a key but scores a "
                                 f"{'page' if sc.per == 'page' else 'token summary'}{where}",
                                 node.loc)
        if node.op in ("page_k",):
            raise StructureError(f"score '{sc.name}' reads a page's keys{where}", node.loc)
    for f in (sc.summary.fields if sc.summary else ()):
        for node in f.expr.walk():
            if node.op in ("position", "query_position", "q", "top_channels"):
                raise StructureError(f"summary field '{f.name}' reads {node.op}: a summary "
                                     f"is a function of the keys only{where}", node.loc)


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
    _verify_estimator(p.estimator, where)


def _verify_estimator(e: ir.Estimator, where: str) -> None:
    if e.kind not in ("exact", "quantized"):
        raise StructureError(f"unsupported estimator kind {e.kind!r}{where}", e.loc)
    problem = e.kind == "quantized" and ir.code_problem(e.bits, e.granularity, e.group_pages,
                                                        e.smooth)
    if problem:
        raise StructureError(f"quantized keys: {problem}{where}", e.loc)


def _verify_attend(p: ir.PipelineIR, where: str) -> None:
    """``mean_value`` needs one scored per-token selector: its softmax gives SparQ's ``α``."""
    if not p.attend.mean_value:
        return
    s = p.select
    if s is None or s.score is None or s.score.per != "token":
        raise StructureError(f"attention(mean_value=True) needs one selector with a per-token "
                             f"score (its softmax weighs the attended tokens){where}",
                             p.attend.loc,
                             hint="select=tw.top_k(per_token_score, budget), as SparQ does")


def _verify_budget(b: ir.Budget | None, loc, where: str) -> None:
    if b is not None and b.kind in ("max", "min") and len(b.parts) >= 2:
        for part in b.parts:
            _verify_budget(part, loc, where)
        return
    ok = b is not None and (
        (b.kind == "tokens" and 1 <= b.value <= ir.MAX_TOKENS and b.value == int(b.value))
        or (b.kind == "fraction" and 0 < b.value <= 1))
    if not ok:
        raise BudgetError(f"budget {b!r} out of range: tokens in [1, {ir.MAX_TOKENS}] or a "
                          f"fraction in (0, 1]{where}", getattr(b, "loc", None) or loc)


def _verify_keep(k: ir.Keep, where: str) -> None:
    for name, n in (("sink", k.sink), ("window", k.window)):
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= ir.MAX_TOKENS:
            raise BudgetError(f"keep rule {name}={n!r} must be a whole number of tokens in "
                              f"[0, {ir.MAX_TOKENS}]{where}", k.loc)


def _verify_shape(p: ir.PipelineIR, shape: ir.Shape, where: str) -> None:
    if shape.q_heads % shape.kv_heads:
        raise StructureError(f"q_heads={shape.q_heads} is not a multiple of "
                             f"kv_heads={shape.kv_heads}{where}", p.loc)
    if shape.page_size != p.page_size:
        raise StructureError(f"pipeline '{p.name}' is built for page_size={p.page_size}, the "
                             f"cache has page_size={shape.page_size}{where}", p.loc,
                             hint=f"pass page_size={shape.page_size} to tw.Pipeline(...)")
    exprs = [f.expr for s in p.summaries() + p.token_summaries() for f in s.fields]
    exprs += [s.score.expr for s in p.selectors()]
    for e in exprs:
        for node in e.walk():
            if node.op == "take":
                check_channels(node, shape.head_dim, shape.kv_heads, where)
            elif node.op == "top_channels" and node.attr("r") > shape.head_dim:
                raise ChannelIndexError(f"tw.top_channels(..., r={node.attr('r')}) > head_dim "
                                        f"{shape.head_dim}{where}", node.loc)
            elif node.op == "project":
                _check_matrix(node, shape, where)


def _check_matrix(node: ir.Expr, shape: ir.Shape, where: str) -> None:
    m = node.attr("matrix")
    rows = _width_of(node.inputs[0], shape.head_dim)
    if m.in_width != rows or (m.per_head and m.shape[0] != shape.kv_heads):
        want = f"[{rows}, R] or [{shape.kv_heads}, {rows}, R]"
        raise ExprTypeError(f"projection matrix of shape {list(m.shape)} for a vector of {rows} "
                            f"channels and {shape.kv_heads} KV heads: expected {want}{where}",
                            node.loc, hint="fit P on this model's keys (e.g. "
                            "tw.builtins.calibrate_projection)")


def _width_of(e: ir.Expr, head_dim: int) -> int:
    """Channels of a vector expression (its last take, gather or projection decides)."""
    if e.op == "take":
        ch = e.attr("channels")
        return len(ch[0]) if isinstance(ch[0], tuple) else len(ch)
    if e.op == "gather":
        return e.inputs[1].attr("r")
    if e.op == "project":
        return e.attr("matrix").out_width
    if e.op.startswith("reduce_") and e.attr("axis") == "channel":
        return 0
    widths = [_width_of(x, head_dim) for x in e.inputs]
    vec = [w for w in widths if w]
    return vec[0] if vec else (head_dim if e.op in ("q", "k", "page_k") else 0)


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
