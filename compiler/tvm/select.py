"""The select stage's score kernel: every page or token scored with the user's traced expression
(ranking and candidate lists: ``rank.py``).

``score`` (``score1``, ... for the further parts of a combined selector) writes ``scores float32
[B, HS, N]``: ``HS`` is the query heads (group ``none``/``union``) or the KV heads (``mean``/``max``
merge the group's scores, ``kv`` scores the mean query); invalid units and NaN scores hold
``-inf``. Rows run in parallel; every shape but head counts, head_dim and page size is symbolic.
A per-token score reads the keys, the codes of its ``estimate=`` format, or a token summary;
query-side parts of the expression (``top_channels``, ``q @ P``, reductions of q) are computed
once per row before the loop over units (``expr.hoist``).
"""

from __future__ import annotations

from .build import KernelSource
from .context import StageCtx, f32
from .dialect import NEG_INF, Src
from .estimate import key_params
from .expr import Lowering, channel_tables, hoist, matrices

RADIX_BITS = 8


def score_rows(ctx: StageCtx, part: int = 0) -> tuple[int, int]:
    """(rows per request ``HS``, query heads scored per row ``GQ``) of scored selector
    ``part``'s group."""
    g = ctx.p.selectors()[part].group
    if g in ("none", "union"):
        return ctx.HQ, 1
    return ctx.HKV, (ctx.G if g in ("mean", "max") else 1)


def kernel_suffix(part: int) -> str:
    """Kernel names of scored selector ``part``: ``score``/``rank``, then ``score1``, ..."""
    return str(part) if part else ""


def score_inputs(ctx: StageCtx, part: int) -> list[tuple[str, tuple, str]]:
    """What scored selector ``part``'s score kernel reads besides q, pt, lens, in order: page
    summaries; or a token summary; or the keys (or the estimator's codes)."""
    sel = ctx.p.selectors()[part]
    sc = sel.score
    if sc.summary is not None:
        widths = ctx.summary_widths(sc.summary)
        shape = ("CAP", ctx.HKV) if sc.per == "page" else ("CAP", ctx.HKV, ctx.PS)
        return [(_sbuf(f), (*shape, widths[f]), ctx.dtype) for f in widths]
    if sel.estimator is None:
        return [("kp", ("CAP", ctx.HKV, ctx.PS, ctx.D), ctx.dtype)]
    return key_params(ctx, sel.estimator)


def _key_leaf(ctx: StageCtx, e, c: str) -> str:
    """float32 key ``kp[phys, hkv, slot, c]``, or its dequantized code (``keycodes``'s
    arithmetic: ``code·scale + zero`` per token, ``code·((hi - lo)/levels) + lo`` per channel)."""
    if e is None:
        return f'T.Cast("float32", kp[phys, hkv, slot, {c}])'
    per, mask = 8 // e.bits, (1 << e.bits) - 1
    code = (f'T.Cast("float32", T.bitwise_and(T.shift_right(codes[phys, hkv, slot, {c} // '
            f'{per}], T.Cast("uint8", ({c} % {per}) * {e.bits})), T.uint8({mask})))')
    if e.granularity == "token":
        val = f"({code} * ksc[phys, hkv, slot] + kzr[phys, hkv, slot])"
        return f"({val} * smooth[hkv, {c}])" if e.smooth else val
    side = "phys" if e.granularity == "page" else "lead"
    lo, hi = (f'T.Cast("float32", {n}[{side}, hkv, {c}])' for n in ("klo", "khi"))
    return f"({code} * (({hi} - {lo}) / {f32((1 << e.bits) - 1)}) + {lo})"


def gen_score(ctx: StageCtx, part: int = 0, covered: bool = False) -> KernelSource:
    """Scored selector ``part``'s scores. ``covered`` (the fused module, a ``top_k`` rule): the
    kernel also takes the budget ``kunits int32 [B]`` and leaves the scores of a request whose
    budget covers all its units unwritten — ``rank`` keeps every valid unit there whatever they
    score — as ``score_covered``, a kernel of the fused module only."""
    sel = ctx.p.selectors()[part]
    sc = sel.score
    s = Src(ctx.dialect)
    hs, gq = score_rows(ctx, part)
    page = sc.per == "page"
    tables, mats = channel_tables([sc.expr]), matrices([sc.expr])
    widths = {"q": ctx.D, "k": ctx.D}
    if sc.summary is not None:
        widths |= ctx.summary_widths(sc.summary)
    params = [("q", ("B", ctx.HQ, ctx.D), ctx.dtype), ("pt", ("B", "NP"), "int32"),
              ("lens", ("B",), "int32"), *score_inputs(ctx, part)]
    params += [(f"tbl{i}", (ctx.HKV, _tw(t)), "int32") for i, t in enumerate(tables)]
    params += [(f"mat{i}", (ctx.HKV, m.in_width, m.out_width), "float32")
               for i, m in enumerate(mats)]
    params += [("out", ("B", hs, "N"), "float32")]
    if covered:
        params.append(("kunits", ("B",), "int32"))
    split = not s.d.cuda  # llvm: rows split over the units (``nsplit``'s length: the splits)
    if split:
        params.append(("nsplit", ("NS",), "int32"))
    ns = "NS" if split else "1"

    leaf = _leaves(ctx, sel)
    name = "score" + kernel_suffix(part) + ("_covered" if covered else "")
    # llvm, one score per query head: a row is a KV head scoring its G query heads, so that
    # each page summary (or key) is read once for the group, not once per query head
    each = split and sel.group in ("none", "union") and ctx.G > 1
    if each:
        hs, gq = ctx.HKV, ctx.G
    with s.func(name, params, ("B", "NP", "CAP", "N") + (("NS",) if split else ())):
        with s.rows("r", f"B * {hs} * {ns}"):
            s(f"b = r // ({hs} * {ns})", f"h = r % ({hs} * {ns}) // {ns}", f"spl = r % {ns}")
            s(f"hkv = h // {ctx.G}" if hs == ctx.HQ else "hkv = h")
            _load_query(ctx, s, gq, hs)
            low = Lowering(s, leaf, widths, tables, ctx.vec, mats=mats)
            hoist(low, [sc.expr], "g", gq)
            s.local("best", 1)
            s.local("sv", 1)
            units = f"(lens[b] + {ctx.PS - 1}) // {ctx.PS}" if page else "lens[b]"
            s(f"chunk = (N + {ns} - 1) // {ns}", "nlo = T.min(spl * chunk, N)",
              "nhi = T.min(nlo + chunk, N)")
            if covered:  # every unit is kept: an empty range (no bindings: see fused.gen_gather)
                s(f"nlo = T.if_then_else(kunits[b] >= {units}, nhi, nlo)")
            with s.block("for n in range(nlo, nhi):"):
                with s.block(f"if n < {units}:"):
                    s("phys = pt[b, n]" if page else f"phys = pt[b, n // {ctx.PS}]")
                    if split and page and sc.summary is not None:
                        _prefetch_summaries(ctx, s, sc.summary, units)
                    if not page:
                        s(f"slot = n % {ctx.PS}")
                    if sel.estimator is not None and sel.estimator.granularity == "group":
                        g = sel.estimator.group_pages
                        s(f"lead = pt[b, n // {ctx.PS} // {g} * {g}]")
                    merge = sel.group
                    s(f"best[0] = {'T.float32(0)' if merge == 'mean' else NEG_INF}")
                    with s.block(f"for g in range({gq}):"):
                        low._memo.clear()  # a fresh body: no value computed above is in scope
                        s(f"sv[0] = {low.value(sc.expr)}")
                        s(f"sv[0] = T.if_then_else(T.isnan(sv[0]), {NEG_INF}, sv[0])")
                        if each:
                            s(f"out[b, h * {ctx.G} + g, n] = sv[0]")
                        elif merge == "mean":
                            s(f"best[0] = best[0] + sv[0] / {f32(gq)}")
                        else:
                            s("best[0] = T.max(best[0], sv[0])")
                    if not each:
                        s("out[b, h, n] = best[0]")
                with s.block("else:"):
                    if each:
                        with s.block(f"for g in range({gq}):"):
                            s(f"out[b, h * {ctx.G} + g, n] = {NEG_INF}")
                    else:
                        s(f"out[b, h, n] = {NEG_INF}")
    return s.source("select", name)


PREFETCH_PAGES = 8  # how far ahead the score fetches a page's summaries


def _prefetch_summaries(ctx: StageCtx, s: Src, summary, units: str) -> None:
    """Fetch the summaries of the page ``PREFETCH_PAGES`` ahead in the row's walk: pages lie
    where the cache put them (and a page's summaries of one KV head ``Hkv`` rows apart), which
    the hardware prefetchers do not follow: the score stalled on these loads (Quest at 32/8
    heads × d128, fp16, 4×32k: 7.3 ms, 2.7 ms with 8 pages ahead, 2.8 with 4 or 16). A prefetch
    never faults; the page is clamped to the row's."""
    s(f"pn = pt[b, T.min(n + {PREFETCH_PAGES}, {units} - 1)]")
    for f, width in ctx.summary_widths(summary).items():
        s.prefetch_row(f"{_sbuf(f)}[pn, hkv, {{}}]", width * ctx.esize, ctx.esize)


def _leaves(ctx: StageCtx, sel):
    """``leaf(node, channel)``: the text of a score leaf inside the loop over units ``n``."""
    page = sel.score.per == "page"

    def leaf(e, c):
        if e.op == "q":
            return f"qv[g, {c}]"
        if e.op == "k":
            return _key_leaf(ctx, sel.estimator, c)
        if e.op == "position":
            return f'T.Cast("float32", n * {ctx.PS})' if page else 'T.Cast("float32", n)'
        if e.op == "query_position":
            return 'T.Cast("float32", lens[b] - 1)'
        if e.op == "head_dim":
            return f32(ctx.D)
        at = "phys, hkv" if page else "phys, hkv, slot"
        return f'T.Cast("float32", {_sbuf("summary." + e.attr("field"))}[{at}, {c}])'
    return leaf


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
