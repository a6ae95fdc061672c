"""The select stage: score every page or token with the user's traced expression, rank the scores
per row (top-k by radix select, or a threshold), and write the candidate lists (pages expanded to
their valid tokens, the keep rules' tokens joined, ascending).

Kernels (rows run in parallel; every shape but head counts, head_dim and page size is symbolic):

* ``score``  — ``scores float32 [B, HS, N]``: ``HS`` is the query heads (group ``none``/``union``)
  or the KV heads (``mean``/``max`` merge the group's scores, ``kv`` scores the mean query);
* ``rank``   — ``sel uint8 [B, HS, N]``: the ``k`` best valid units (ties: lower index first),
  ``k`` per request given by the host, or the units scoring ≥ the threshold;
* ``candidates`` — ``cand_idx int32 [B, Hq, C]`` (-1 padded), ``cand_cnt int32 [B, Hq]``.
"""

from __future__ import annotations

from .build import KernelSource
from .context import StageCtx, f32, keep_text
from .dialect import NEG_INF, Src
from .expr import Lowering, channel_tables

RADIX_BITS = 8


def score_rows(ctx: StageCtx) -> tuple[int, int]:
    """(rows per request ``HS``, query heads scored per row ``GQ``) for the selector's group."""
    g = ctx.p.select.group
    if g in ("none", "union"):
        return ctx.HQ, 1
    return ctx.HKV, (ctx.G if g in ("mean", "max") else 1)


def gen_score(ctx: StageCtx) -> KernelSource:
    sc = ctx.p.select.score
    s = Src(ctx.dialect)
    hs, gq = score_rows(ctx)
    page = sc.per == "page"
    tables = channel_tables([sc.expr])
    widths = {"q": ctx.D, "k": ctx.D, **ctx.summary_widths()}
    fields = [f for f in widths if f.startswith("summary.")] if page else []
    params = [("q", ("B", ctx.HQ, ctx.D), ctx.dtype), ("pt", ("B", "NP"), "int32"),
              ("lens", ("B",), "int32")]
    if page:
        params += [(_sbuf(f), ("CAP", ctx.HKV, widths[f]), ctx.dtype) for f in fields]
    else:
        params += [("kp", ("CAP", ctx.HKV, ctx.PS, ctx.D), ctx.dtype)]
    params += [(f"tbl{i}", (ctx.HKV, _tw(t)), "int32") for i, t in enumerate(tables)]
    params += [("out", ("B", hs, "N"), "float32")]

    def leaf(e, c):
        if e.op == "q":
            return f"qv[g, {c}]"
        if e.op == "k":
            return f'T.Cast("float32", kp[phys, hkv, slot, {c}])'
        return f'T.Cast("float32", {_sbuf("summary." + e.attr("field"))}[phys, hkv, {c}])'

    with s.func("score", params, ("B", "NP", "CAP", "N")):
        with s.rows("r", f"B * {hs}"):
            s(f"b = r // {hs}", f"h = r % {hs}")
            s(f"hkv = h // {ctx.G}" if hs == ctx.HQ else "hkv = h")
            _load_query(ctx, s, gq, hs)
            s.local("best", 1)
            s.local("sv", 1)
            units = f"(lens[b] + {ctx.PS - 1}) // {ctx.PS}" if page else "lens[b]"
            with s.block("for n in range(N):"):
                with s.block(f"if n < {units}:"):
                    s("phys = pt[b, n]" if page else f"phys = pt[b, n // {ctx.PS}]")
                    if not page:
                        s(f"slot = n % {ctx.PS}")
                    merge = ctx.p.select.group
                    s(f"best[0] = {'T.float32(0)' if merge == 'mean' else NEG_INF}")
                    with s.block(f"for g in range({gq}):"):
                        low = Lowering(s, leaf, widths, tables, ctx.vec)
                        val = low.value(sc.expr)
                        s(f"sv[0] = {val}")
                        s(f"sv[0] = T.if_then_else(T.isnan(sv[0]), {NEG_INF}, sv[0])")
                        if merge == "mean":
                            s(f"best[0] = best[0] + sv[0] / {f32(gq)}")
                        else:
                            s("best[0] = T.max(best[0], sv[0])")
                    s("out[b, h, n] = best[0]")
                with s.block("else:"):
                    s(f"out[b, h, n] = {NEG_INF}")
    return KernelSource("select", "score", s.text())


def _sbuf(field: str) -> str:
    return "s_" + field.split(".", 1)[1]


def _tw(t: tuple) -> int:
    return len(t[0]) if isinstance(t[0], tuple) else len(t)


def _load_query(ctx: StageCtx, s: Src, gq: int, hs: int) -> None:
    """``qv [gq, D]`` float32: the row's query heads, or the group's mean query (group kv)."""
    s.local("qv", (gq, ctx.D))
    d, vec = ctx.D, s.d.vec(ctx.D)
    if hs == ctx.HQ:
        with s.block(f"for c in {vec}:"):
            s('qv[0, c] = T.Cast("float32", q[b, h, c])')
    elif gq == ctx.G:
        with s.block(f"for g, c in T.grid({gq}, {d}):"):
            s(f'qv[g, c] = T.Cast("float32", q[b, h * {ctx.G} + g, c])')
    else:  # group "kv": one score per KV head from the group's mean query
        with s.block(f"for c in {vec}:"):
            s("qv[0, c] = T.float32(0)")
        with s.block(f"for g, c in T.grid({ctx.G}, {d}):"):
            s(f'qv[0, c] = qv[0, c] + T.Cast("float32", q[b, h * {ctx.G} + g, c])')
        with s.block(f"for c in {vec}:"):
            s(f"qv[0, c] = qv[0, c] / {f32(ctx.G)}")


# ---- ranking --------------------------------------------------------------------------------
def order_key(x: str) -> str:
    """An order-preserving uint32 key of a float32 (larger float ↔ larger key)."""
    bits = f'T.reinterpret("uint32", {x})'
    return (f"T.if_then_else(T.shift_right({bits}, T.uint32(31)) == T.uint32(1), "
            f"T.bitwise_xor({bits}, T.uint32(4294967295)), "
            f"T.bitwise_or({bits}, T.uint32(2147483648)))")


def write_top_k(s: Src, n: str, key, ok, k: str, out) -> None:
    """Statements that keep the ``k`` largest keys among the eligible elements ``i < n``
    (ties: lower index first): radix select on the keys, ``RADIX_BITS`` a pass, then one pass
    writing ``out(i, decision_text)``. ``key(i)``/``ok(i)`` give an element's key and
    eligibility as text."""
    nb = 1 << RADIX_BITS
    s.local("nok", 1, "int32")
    s.local("prefix", 1, "uint32")
    s.local("rem", 1, "int32")
    s.local("hist", nb, "int32")
    s.local("found", 1, "int32")
    s("nok[0] = 0")
    with s.block(f"for i in range({n}):"):
        with s.block(f"if {ok('i')}:"):
            s("nok[0] = nok[0] + 1")
    s("prefix[0] = T.uint32(0)")
    s(f"rem[0] = {k}")
    with s.block("if rem[0] < nok[0]:"):
        for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
            hi = (0xFFFFFFFF << (shift + RADIX_BITS)) & 0xFFFFFFFF
            with s.block(f"for j in range({nb}):"):
                s("hist[j] = 0")
            with s.block(f"for i in range({n}):"):
                with s.block(f"if {ok('i')}:"):
                    s(f"kk = {key('i')}")
                    with s.block(f"if T.bitwise_and(kk, T.uint32({hi})) == prefix[0]:"):
                        s(f'bk = T.Cast("int32", T.bitwise_and(T.shift_right(kk, '
                          f'T.uint32({shift})), T.uint32({nb - 1})))')
                        s("hist[bk] = hist[bk] + 1")
            s("found[0] = 0")
            with s.block(f"for j in range({nb}):"):
                with s.block("if found[0] == 0:"):
                    with s.block(f"if hist[{nb - 1} - j] >= rem[0]:"):
                        s(f'prefix[0] = T.bitwise_or(prefix[0], T.shift_left(T.Cast("uint32", '
                          f'{nb - 1} - j), T.uint32({shift})))')
                        s("found[0] = 1")
                    with s.block("else:"):
                        s(f"rem[0] = rem[0] - hist[{nb - 1} - j]")
    s("nok[0] = 0")  # reused: how many ties at the cut are taken
    with s.block(f"for i in range({n}):"):
        s(f"kk = {key('i')}")
        with s.block(f"if {ok('i')} and (kk > prefix[0] or rem[0] >= nok[0] + 1 and "
                     "kk == prefix[0]):"):
            out("i", "1")
            with s.block("if kk == prefix[0]:"):
                s("nok[0] = nok[0] + 1")
        with s.block("else:"):
            out("i", "0")


def gen_rank(ctx: StageCtx) -> KernelSource:
    """``sel`` of the selector's rule over the scores."""
    sel = ctx.p.select
    s = Src(ctx.dialect)
    hs, _ = score_rows(ctx)
    units = f"(lens[b] + {ctx.PS - 1}) // {ctx.PS}" if sel.score.per == "page" else "lens[b]"
    params = [("scores", ("B", hs, "N"), "float32"), ("lens", ("B",), "int32"),
              ("kunits", ("B",), "int32"), ("sel", ("B", hs, "N"), "uint8")]
    with s.func("rank", params, ("B", "N")):
        with s.rows("r", f"B * {hs}"):
            s(f"b = r // {hs}", f"h = r % {hs}", f"nu = T.min({units}, N)")

            def out(i, v):
                s(f"sel[b, h, {i}] = T.uint8({v})")
            if sel.rule == "top_k":
                write_top_k(s, "N", lambda i: order_key(f"scores[b, h, {i}]"),
                            lambda i: f"{i} < nu", "kunits[b]", out)
            else:
                with s.block("for i in range(N):"):
                    s(f"sel[b, h, i] = T.Cast(\"uint8\", i < nu and scores[b, h, i] >= "
                      f"{f32(sel.threshold)})")
    return KernelSource("select", "rank", s.text())


def gen_candidates(ctx: StageCtx) -> KernelSource:
    """Candidate lists: chosen units expanded to tokens, plus the keep rules, ascending."""
    sel = ctx.p.select
    s = Src(ctx.dialect)
    scored = sel is not None and sel.score is not None
    hs = score_rows(ctx)[0] if scored else 0
    page = scored and sel.score.per == "page"
    unit = ctx.PS if page else 1
    params = [("lens", ("B",), "int32")]
    params += [("sel", ("B", hs, "N"), "uint8")] if scored else []
    params += [("idx", ("B", ctx.HQ, "C"), "int32"), ("cnt", ("B", ctx.HQ), "int32")]
    with s.func("candidates", params, ("B", "N", "C")):
        with s.rows("r", f"B * {ctx.HQ}"):
            s(f"b = r // {ctx.HQ}", f"h = r % {ctx.HQ}", f"hkv = h // {ctx.G}")
            s.local("m", 1, "int32")
            s.local("ch", 1, "int32")
            s("m[0] = 0", "L = lens[b]")
            with s.block(f"for n in range((L + {unit - 1}) // {unit}):"):
                s(f"ch[0] = {_chosen(ctx, hs) if scored else int(sel is None)}")
                with s.block(f"for o in range({unit}):"):
                    s(f"t = n * {unit} + o")
                    with s.block(f"if t < L and (ch[0] == 1 or {keep_text(ctx, 't', 'L')}):"):
                        with s.block("if m[0] < C:"):
                            s("idx[b, h, m[0]] = t")
                        s("m[0] = m[0] + 1")
            s("cnt[b, h] = T.min(m[0], C)")
            with s.block("for i in range(C):"):
                with s.block("if i >= m[0]:"):
                    s("idx[b, h, i] = -1")
    return KernelSource("select", "candidates", s.text())


def _chosen(ctx: StageCtx, hs: int) -> str:
    """Text: is unit ``n`` chosen for query head ``h`` (the group rule decides whose ``sel``)."""
    g = ctx.p.select.group
    if g == "none":
        return 'T.Cast("int32", sel[b, h, n])'
    if g == "union":
        terms = " + ".join(f'T.Cast("int32", sel[b, hkv * {ctx.G} + {i}, n])'
                           for i in range(ctx.G))
        return f"T.min({terms}, 1)"
    return 'T.Cast("int32", sel[b, hkv, n])'
