"""The select stage's decisions: rank each scored selector's scores, then write the candidate
lists (pages expanded to their valid tokens, the parts of a combined selector OR-ed or AND-ed,
the keep rules' tokens joined, ascending).

* ``rank`` (``rank1``, ... per part) — ``sel uint8 [B, HS, N]``: the ``k`` best valid units
  (ties: lower index first, ``k`` per request given by the host), the units scoring ≥ the
  threshold, or the fewest units holding mass ``p`` of the scores' softmax (radix select on the
  weights' bits, as the pruner's ``radix`` strategy);
* ``candidates`` — ``cand_idx int32 [B, Hq, C]`` (-1 padded), ``cand_cnt int32 [B, Hq]``.
"""

from __future__ import annotations

from .build import KernelSource
from .context import StageCtx, f32, keep_text
from .dialect import NEG_INF, Src
from .lists import write_candidates
from .select import kernel_suffix, order_key, score_rows, write_top_k
from .top_p import radix_top_p


def gen_rank(ctx: StageCtx, part: int = 0) -> KernelSource:
    """``sel`` of scored selector ``part``'s rule over its scores."""
    sel = ctx.p.selectors()[part]
    s = Src(ctx.dialect)
    hs, _ = score_rows(ctx, part)
    units = f"(lens[b] + {ctx.PS - 1}) // {ctx.PS}" if sel.score.per == "page" else "lens[b]"
    params = [("scores", ("B", hs, "N"), "float32"), ("lens", ("B",), "int32"),
              ("kunits", ("B",), "int32"), ("sel", ("B", hs, "N"), "uint8")]
    name = "rank" + kernel_suffix(part)
    with s.func(name, params, ("B", "N")):
        with s.rows("r", f"B * {hs}"):
            s(f"b = r // {hs}", f"h = r % {hs}", f"nu = T.min({units}, N)")

            def out(i, v):
                s(f"sel[b, h, {i}] = T.uint8({v})")
            if sel.rule == "top_k":
                write_top_k(s, "N", lambda i: order_key(f"scores[b, h, {i}]"),
                            lambda i: f"{i} < nu", "kunits[b]", out)
            elif sel.rule == "top_p":
                _top_p(ctx, s, sel.p, out)
            else:
                with s.block("for i in range(N):"):
                    s(f"sel[b, h, i] = T.Cast(\"uint8\", i < nu and scores[b, h, i] >= "
                      f"{f32(sel.threshold)})")
    return s.source("select", name)


def _top_p(ctx: StageCtx, s: Src, p: float, out) -> None:
    """The fewest units holding mass ``p`` of ``softmax(scores)`` over the ``nu`` valid ones."""
    s.local("mx", 1)
    s.local("den", 1)
    s(f"mx[0] = {NEG_INF}", "den[0] = T.float32(0)")
    with s.block("for i in range(nu):"):
        s("mx[0] = T.max(mx[0], scores[b, h, i])")
    with s.block(f"if mx[0] > {NEG_INF}:"):
        with s.block("for i in range(nu):"):
            s("den[0] = den[0] + T.exp(scores[b, h, i] - mx[0])")
    with s.block("for i in range(N):"):
        out("i", 0)
    s("n = nu")

    def wt(i: str) -> str:  # 0 for a row of -inf: nothing is kept
        return (f"T.if_then_else(mx[0] > {NEG_INF}, T.exp(scores[b, h, {i}] - mx[0]) / den[0], "
                "T.float32(0))")
    if p >= 1:  # every unit of positive weight (the reference's p >= 1 rule)
        with s.block("for i in range(n):"):
            out("i", f'T.Cast("int32", {wt("i")} > T.float32(0))')
    else:
        radix_top_p(ctx, s, p, wt, out)


def gen_candidates(ctx: StageCtx) -> KernelSource:
    """Candidate lists: chosen units expanded to tokens (a combination's parts OR-ed or AND-ed
    token by token), plus the keep rules, ascending."""
    sel = ctx.p.select
    s = Src(ctx.dialect)
    parts = ctx.p.selectors()
    scored = bool(parts)
    params = [("lens", ("B",), "int32")]
    for i in range(len(parts)):
        params.append((f"sel{i}", ("B", score_rows(ctx, i)[0], f"N{i}"), "uint8"))
    params += [("idx", ("B", ctx.HQ, "C"), "int32"), ("cnt", ("B", ctx.HQ), "int32")]
    sym = ("B", *(f"N{i}" for i in range(len(parts))), "C")
    join = " + " if sel is not None and sel.rule != "intersect" else " * "
    with s.func("candidates", params, sym):
        if not s.d.cuda and (sel is None or parts in ((sel,), ())):  # one selector: lists.py
            page = scored and sel.score.per == "page"
            write_candidates(ctx, s, not scored or sel.group != "none", ctx.PS if page else 1,
                             _chosen(ctx, 0, "n") if scored else str(int(sel is None)))
            return s.source("select", "candidates")
        with s.rows("r", f"B * {ctx.HQ}"):
            s(f"b = r // {ctx.HQ}", f"h = r % {ctx.HQ}", f"hkv = h // {ctx.G}")
            s.local("m", 1, "int32")
            s("m[0] = 0", "L = lens[b]")
            with s.block("for t in range(L):"):
                if scored:
                    chosen = join.join(f"({_chosen(ctx, i)})" for i in range(len(parts)))
                    s(f"ch = {chosen}")
                else:
                    s(f"ch = {int(sel is None)}")
                with s.block(f"if ch > 0 or {keep_text(ctx, 't', 'L')}:"):
                    with s.block("if m[0] < C:"):
                        s("idx[b, h, m[0]] = t")
                    s("m[0] = m[0] + 1")
            s("cnt[b, h] = T.min(m[0], C)")
            with s.block("for i in range(C):"):
                with s.block("if i >= m[0]:"):
                    s("idx[b, h, i] = -1")
    return s.source("select", "candidates")


def _chosen(ctx: StageCtx, part: int, unit: str | None = None) -> str:
    """Text (0 or 1, int32): is token ``t`` chosen by scored selector ``part`` for query head
    ``h`` (the group rule decides whose ``sel`` row; a page's flag covers its tokens) — or,
    with ``unit``, is that unit (page or token) chosen."""
    sel = ctx.p.selectors()[part]
    unit = unit or (f"t // {ctx.PS}" if sel.score.per == "page" else "t")
    if sel.group == "none":
        return f'T.Cast("int32", sel{part}[b, h, {unit}])'
    if sel.group == "union":
        terms = " + ".join(f'T.Cast("int32", sel{part}[b, hkv * {ctx.G} + {i}, {unit}])'
                           for i in range(ctx.G))
        return f"T.min({terms}, 1)"
    return f'T.Cast("int32", sel{part}[b, hkv, {unit}])'
