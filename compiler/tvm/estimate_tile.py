"""The estimate's fast path on llvm: whole tiles of consecutive candidates, and the softmax.

A *tile* is ``TL`` consecutive candidates ``t0 .. t0 + TL - 1`` of one page, ``t0`` a multiple of
``TL`` (``TL = min(page_size, 16)``): what a page selector's candidate lists are made of. Its
logits are one vector of ``TL`` lanes (tokens) per query head: the codes are read as 32-bit
words (``32 / bits`` channels each, channel ``word · 32/bits + k`` at bit ``k · bits``) across
the tile's tokens, and each word's channels go into the ``G`` accumulators with the query
planes ``qn [g, D]`` in natural channel order (``q∘scale`` for per-channel codes, ``q`` — times
the smoothing factors — for token codes). The words come from contiguous 64-byte loads and a
shuffle transpose (``transpose_plan``), not a gather. No horizontal sum is left per token, which
is what bounded the per-token path (``estimate._dot``). Measured on one core at SmolLM2's layout
(9/3 heads, D 64, INT4 page codes, 8000 candidates), the estimate went from ~850 µs (per token,
libm ``exp``) to ~240 µs, logits and softmax; its inner loop then issues about one FMA per two
vector instructions (the rest unpack the codes), so ~50% of the FMA peak is its ceiling at G=3.

Candidates that do not form a tile (a partial last page, keep-rule tokens, token-level
selectors) take the per-token path. The softmax is a phase of its own (vectorized, with
``context.fast_exp``), after every split of a row has written its logits.
"""

from __future__ import annotations

from ..ir import Estimator
from .context import StageCtx, f32, fast_exp, softcap_text
from .dialect import NEG_INF, Src

MAX_LANES = 16
ACC = 2  # independent accumulators per head in a tile


def tile_lanes(ctx: StageCtx, e: Estimator) -> int:
    """Tokens a tile holds, or 0 when the tile path does not apply (cuda, exact keys, codes that
    are not whole 32-bit words, pages of fewer than 8 tokens)."""
    if ctx.dialect.cuda or e.kind != "quantized" or (ctx.D * e.bits) % 32:
        return 0
    tl = min(ctx.PS, MAX_LANES)
    return tl if tl >= 8 else 0


def code_words(ctx: StageCtx, s: Src, e: Estimator) -> None:
    """``cw``/``cwf``: the packed codes viewed as 32-bit words (the tile path's loads)."""
    nw = ctx.D * e.bits // 32
    s(f'cw = T.decl_buffer((CAP, {ctx.HKV}, {ctx.PS}, {nw}), "uint32", data=codes.data)')
    s(f'cwf = T.decl_buffer((CAP * {ctx.HKV * ctx.PS * nw},), "uint32", data=codes.data)')


def natural_planes(ctx: StageCtx, s: Src, e: Estimator, gq: int) -> None:
    """Per-channel codes: ``qn [g, c] = q·scale`` and ``qs [g] = Σ q·lo`` for side page ``sp``
    (``qv`` holds the queries); the page's scale first, once for the ``gq`` heads."""
    d, vw = ctx.D, _lanes(ctx.D)
    lo = 'T.Cast("float32", klo[sp, hkv, {c}])'
    hi = 'T.Cast("float32", khi[sp, hkv, {c}])'
    with s.block(f"for c in {s.d.vec(d)}:"):  # times 1/levels: within an ulp of the division,
        # which costs ~10x more a vector (the estimate is an estimate: not bit-exact anyway)
        s(f"scn[c] = ({hi.format(c='c')} - {lo.format(c='c')}) * {f32(1 / ((1 << e.bits) - 1))}")
    acc = s.local(s.fresh("lacc"), vw)
    with s.block(f"for g in range({gq}):"):
        with s.block(f"for c in {s.d.vec(d)}:"):
            s("qn[g, c] = qvs[g, c] * scn[c]")  # the tile path's planes (``tile_buffers``)
        with s.block(f"for v in {s.d.vec(vw)}:"):
            s(f"{acc}[v] = T.float32(0)")
        with s.block(f"for co in range({d // vw}):"):
            with s.block(f"for v in {s.d.vec(vw)}:"):
                c = f"(co * {vw} + v)"
                s(f"{acc}[v] = {acc}[v] + qv[g, {c}] * {lo.format(c=c)}")
        s(f"qs[g] = {lanes_sum(f'{acc}[T.Ramp(0, 1, {vw})]', vw)}")


def transpose_plan(nw: int, tl: int) -> list[list[tuple[int, int, int, list[int]]]] | None:
    """Shuffles that turn a tile's ``nw`` row-major vectors of ``tl`` words (token-major: word
    ``f`` of the tile is token ``f // nw``, word ``f % nw``) into ``nw`` vectors of one word for
    the ``tl`` tokens: ``log2(nw)`` stages, each pairing vectors that differ in one index bit
    and splitting their lanes on that bit of the word (two-source permutes, ``vpermi2d`` on
    AVX-512). ``[stage][(dst, a, b, lanes)]``; None when ``nw`` is not a power of two."""
    if nw & (nw - 1):
        return None
    vecs = [[(f // nw, f % nw) for f in range(v * tl, (v + 1) * tl)] for v in range(nw)]
    stages, k = [], 0
    while 1 << k < nw:
        new, ops = [None] * nw, []
        for a in range(nw):
            if a >> k & 1:
                continue
            b = a | 1 << k
            pool = vecs[a] + vecs[b]
            for bit, dst in ((0, a), (1, b)):
                sel = [i for i, (_, w) in enumerate(pool) if w >> k & 1 == bit]
                if 1 << (k + 1) >= nw:  # the last stage puts the lanes in token order
                    sel.sort(key=lambda i: pool[i][0])
                new[dst] = [pool[i] for i in sel]
                ops.append((dst, a, b, sel))
        vecs, k = new, k + 1
        stages.append(ops)
    assert all(v == [(t, w) for t in range(tl)] for w, v in enumerate(vecs)), "transpose plan"
    return stages


def _load_words(ctx: StageCtx, s: Src, nw: int, tl: int) -> str:
    """The tile's words as ``nw`` vectors of one word across its ``tl`` tokens: contiguous
    loads and a shuffle transpose (or, for ``nw`` not a power of two, one lane at a time);
    returns the ``[nw, tl]`` buffer that holds them."""
    plan = transpose_plan(nw, tl)
    if plan is None:
        with s.block(f"for wd, t in T.grid({nw}, {tl}):"):
            s("tw0[wd, t] = cw[tph, hkv, ts + t, wd]")
        return "tw0"
    lanes = f"T.Ramp(0, 1, {tl})"
    base = f"((tph * {ctx.HKV} + hkv) * {ctx.PS} + ts) * {nw}"
    for v in range(nw):
        s(f"tw0[{v}, {lanes}] = cwf[T.Ramp({base} + {v * tl}, 1, {tl})]")
    for k, ops in enumerate(plan):
        src, dst = f"tw{k % 2}", f"tw{(k + 1) % 2}"
        for d, a, b, sel in ops:
            s(f"{dst}[{d}, {lanes}] = T.Shuffle([{src}[{a}, {lanes}], {src}[{b}, {lanes}]], "
              f"{sel})")
    return f"tw{len(plan) % 2}"


def load_tile(ctx: StageCtx, s: Src, e: Estimator, tl: int) -> str:
    """The codes of the tile starting at candidate ``i`` (its page ``tph``, slot ``ts``) as
    ``[nw, tl]`` words, one vector a word across the tile's tokens; the tile ahead prefetched."""
    nw = ctx.D * e.bits // 32
    s("tt0 = cidx[b, h0, i]", f"tph = pt[b, tt0 // {ctx.PS}]", f"ts = tt0 % {ctx.PS}")
    _prefetch(ctx, s, e, tl, nw)
    return _load_words(ctx, s, nw, tl)


def write_tile(ctx: StageCtx, s: Src, e: Estimator, gq: int, tl: int, planes: str) -> None:
    """Logits of the tile starting at candidate ``i`` (its ``tl`` tokens are consecutive), with
    the query planes ``planes [gq, D]`` in natural channel order."""
    nw, cpw, mask = ctx.D * e.bits // 32, 32 // e.bits, (1 << e.bits) - 1
    words = load_tile(ctx, s, e, tl)
    with s.block(f"for g, j, t in T.grid({gq}, {ACC}, {tl}):"):
        s("tacc[g, j, t] = T.float32(0)")
    with s.block(f"for wd in range({nw}):"):
        # ACC accumulators a head (channels alternate): chains of dependent FMAs ACC times
        # shorter, so their latency hides behind the unpacking
        with s.block(f"for kk in T.unroll({cpw // ACC}):"):
            with s.block(f"for t in T.vectorized({tl}):"):
                for j in range(ACC):
                    k = f"(kk * {ACC} + {j})"
                    # the code in place, code·2^(bits·k): exact in float32 (a few significant
                    # bits), and the planes carry 2^-(bits·k) (``tile_buffers``), so each
                    # product is the shifted code's, bit for bit — one unpacking op fewer
                    shifted = f"T.shift_left(T.uint32({mask}), T.Cast(\"uint32\", {k} * {e.bits}))"
                    code = f'T.Cast("float32", T.bitwise_and({words}[wd, t], {shifted}))'
                    for g in range(gq):
                        s(f"tacc[{g}, {j}, t] = tacc[{g}, {j}, t] + "
                          f"{planes}[{g}, wd * {cpw} + {k}] * {code}")
    scale = f32(ctx.softmax_scale())
    with s.block(f"for t in T.vectorized({tl}):"):
        for g in range(gq):
            acc = " + ".join(f"tacc[{g}, {j}, t]" for j in range(ACC))
            if e.granularity == "token":
                logit = (f"(ksc[tph, hkv, ts + t] * ({acc}) + kzr[tph, hkv, ts + t] * "
                         f"qs[{g}])")
            else:
                logit = f"({acc} + qs[{g}])"
            s(f"w[b, h0 + {g}, i + t] = {softcap_text(ctx, f'{logit} * {scale}')}")


PREFETCH_TILES = 2  # how far ahead the next tile's codes are fetched (a tile: ~0.1-0.2 µs)


def _prefetch(ctx: StageCtx, s: Src, e: Estimator, tl: int, nw: int) -> None:
    """Prefetch the codes (and page min/max) of the tile ``PREFETCH_TILES`` ahead: pages are
    ``Hkv`` tiles apart in memory and a row walks them in list order, which the hardware
    prefetchers do not follow (the tile loads missed the cache: ~40% of the estimate at
    32/8 heads × d128). A prefetch never faults; its address is computed in bounds all the
    same."""
    s(f"pj = T.min(i + {PREFETCH_TILES * tl}, hi - 1)", "ptok = cidx[b, h0, pj]",
      f"pph = pt[b, ptok // {ctx.PS}]")
    base = f"((pph * {ctx.HKV} + hkv) * {ctx.PS} + ptok % {ctx.PS}) * {nw}"
    s.prefetch_row(f"cwf[{base} + {{}}]", tl * nw * 4, 4)
    if e.granularity == "page":  # the next page's min/max (the planes' inputs)
        for name in ("klo", "khi"):
            s.prefetch_row(f"{name}[pph, hkv, {{}}]", ctx.D * ctx.esize, ctx.esize)


def tile_buffers(ctx: StageCtx, s: Src, e: Estimator, gq: int, tl: int,
                 floats: bool = True) -> None:
    """The tile path's locals (per row): accumulators, the transposed words, and ``qvs``, the
    queries ``qv`` (filled already) times ``2^-(bits·k)`` on the channels at bit ``k·bits`` of
    their word (``write_tile`` masks a code in place, without shifting it down)."""
    nw, cpw = ctx.D * e.bits // 32, 32 // e.bits
    s.local("tw0", (nw, tl), "uint32")
    s.local("tw1", (nw, tl), "uint32")
    if not floats:  # the integer path (``estimate_int8``) has its own
        return
    s.local("tacc", (gq, ACC, tl))
    s.local("qvs", (gq, ctx.D))
    with s.block(f"for g, c in T.grid({gq}, {ctx.D}):"):  # an exact power of two: 2^-(bits·k)
        s(f'qvs[g, c] = qv[g, c] * T.reinterpret("float32", T.shift_left(T.Cast("int32", 127 - '
          f'{e.bits} * (c % {cpw})), 23))')


def is_tile(tl: int, end: str) -> str:
    """Text: do candidates ``i .. i + tl - 1`` (< ``end``) form a tile?"""
    last = f"T.min(i + {tl - 1}, {end} - 1)"  # clamped: the load is not short-circuited
    return (f"i + {tl} <= {end} and cidx[b, h0, i] % {tl} == 0 and "
            f"cidx[b, h0, {last}] == cidx[b, h0, i] + {tl - 1}")


def write_softmax(ctx: StageCtx, s: Src, rows: int, gh: int, gq: int) -> None:
    """The softmax phase: each (request, row, head) normalizes its logits in place (max, then
    ``exp`` and the sum in ``MAX_LANES`` lanes), zeros past its candidates, and copies the
    result to the group's other heads when one estimate serves them (group ``kv``)."""
    vw = MAX_LANES
    with s.rows("r", f"B * {rows * gq}"):
        s(f"b = r // {rows * gq}", f"hr = r % {rows * gq} // {gq}", f"g = r % {gq}",
          f"h = hr * {gh} + g", "n = ccnt[b, hr * " + str(gh) + "]")
        mx, den = s.local("mxv", vw), s.local("dnv", vw)
        with s.block(f"for v in T.vectorized({vw}):"):
            s(f"{mx}[v] = {NEG_INF}", f"{den}[v] = T.float32(0)")
        with s.block(f"for io in range(n // {vw}):"):
            with s.block(f"for v in T.vectorized({vw}):"):
                s(f"{mx}[v] = T.max({mx}[v], w[b, h, io * {vw} + v])")
        with s.block(f"for i in range(n // {vw} * {vw}, n):"):
            s(f"{mx}[0] = T.max({mx}[0], w[b, h, i])")
        s.local("mxs", 1)
        s(f"mxs[0] = {lanes_sum(f'{mx}[T.Ramp(0, 1, {vw})]', vw, 'max')}")
        e = fast_exp(f"(w[b, h, io * {vw} + v] - mxs[0])")
        with s.block(f"for io in range(n // {vw}):"):
            with s.block(f"for v in T.vectorized({vw}):"):
                s(f"w[b, h, io * {vw} + v] = {e}")
                s(f"{den}[v] = {den}[v] + w[b, h, io * {vw} + v]")
        with s.block(f"for i in range(n // {vw} * {vw}, n):"):
            s(f"w[b, h, i] = {fast_exp('(w[b, h, i] - mxs[0])')}", f"{den}[0] = {den}[0] + w[b, h, i]")
        s.local("inv", 1)  # one division a row (the old kernel divided every weight: ≤ 1 ulp)
        s(f"inv[0] = T.float32(1) / ({lanes_sum(f'{den}[T.Ramp(0, 1, {vw})]', vw)})")
        with s.block(f"for io in range(n // {vw}):"):
            with s.block(f"for v in T.vectorized({vw}):"):
                s(f"w[b, h, io * {vw} + v] = w[b, h, io * {vw} + v] * inv[0]")
        with s.block(f"for i in range(n // {vw} * {vw}, n):"):
            s("w[b, h, i] = w[b, h, i] * inv[0]")
        with s.block("for i in range(n, C):"):
            s("w[b, h, i] = T.float32(0)")
        for g in range(gq, gh):  # group "kv": every head of the group gets the estimate
            with s.block("for i in range(C):"):
                s(f"w[b, hr * {gh} + {g}, i] = w[b, h, i]")


def lanes_sum(vec: str, n: int, op: str = "sum") -> str:
    """Text: the ``n`` lanes of the vector expression ``vec`` reduced in registers, halving
    with shuffles (a local buffer reduced through memory cost ~5x more on llvm)."""
    comb = (lambda a, b: f"T.max({a}, {b})") if op == "max" else (lambda a, b: f"({a} + {b})")
    while n > 1:
        n //= 2
        lo, hi = list(range(n)), list(range(n, 2 * n))
        vec = comb(f"T.Shuffle([{vec}], {lo})", f"T.Shuffle([{vec}], {hi})")
    return vec


def _lanes(n: int) -> int:
    w = 1
    while w * 2 <= MAX_LANES and n % (w * 2) == 0:
        w *= 2
    return w
