"""The estimate stage: ``est_w [B, Hq, C] = softmax(scale · q·K̃)`` over each row's candidates,
with ``K̃`` exact keys or INT2/4/8 min-max codes (``compiler.keycodes``: token, token smoothed, page
or group granularity).

When a GQA group's heads share one candidate list (``StageCtx.uniform_after``) a row is a
(request, KV head) and every key code it unpacks serves all ``G`` query heads; otherwise a row is
one query head.

Every quantized format shares one inner loop: the codes are read as bytes and multiplied with
query *planes* ``qp [g, i, j]`` (channel ``j·per + i`` of byte ``j``, ``per = 8/bits``), so the
loop is contiguous and vectorizes.

* token: ``q·K̃ = scale·Σ_c q_c·code_c + zero·Σ_c q_c``; the planes hold the query (times the
  smoothing factors ``s [Hkv, D]`` for smoothed codes: ``q·(s∘k̃) = (q∘s)·k̃``), built once a row;
* page / group: ``q·K̃ = Σ_c (q_c·scale_c)·code_c + Σ_c q_c·lo_c`` with the per-channel
  ``scale = (hi - lo) / (2**bits - 1)`` and ``lo`` of the candidate's *side page* (its physical
  page, or its group's first page ``pt[b, page // G · G]``); the planes then hold ``q∘scale``.
  The row's candidates go in runs that share a side page (a page or group of consecutive
  positions: candidate lists ascend), the planes and ``Σ q·lo`` are rebuilt once a run and the
  run's loop is the token path's. ``lo``/``hi`` (cache dtype) are read as words of ``per``
  values, so that they reach plane order by contiguous vector loads and shifts, not a gather.

On llvm the ``G`` heads of a row are unrolled inside the vectorized byte loop (each code vector
is unpacked once for all of them); measured at 1×4k tokens, Hq=32/Hkv=8/D=128, INT4, fp16, the
page and group estimates run within ~1.1x of the token one (they were ~5x slower when they
dequantized channel by channel).
"""

from __future__ import annotations

from ..ir import Estimator
from .build import KernelSource
from .context import StageCtx, f32, softcap_text
from .dialect import NEG_INF, Src, ceil_div
from .estimate_int8 import (
    dequantized_planes,
    int8_buffers,
    int8_query,
    quantize_planes,
    round_planes,
    write_tile_int8,
)
from .estimate_tile import (
    code_words,
    is_tile,
    lanes_sum,
    load_tile,
    natural_planes,
    tile_buffers,
    tile_lanes,
    write_softmax,
    write_tile,
)


def est_rows(ctx: StageCtx, stage: int) -> tuple[int, int, int]:
    """(rows per request, query heads per row, heads whose queries are computed)."""
    if ctx.p.prune[stage].group == "kv":
        return ctx.HKV, ctx.G, 1
    if ctx.uniform_after(stage) and ctx.G > 1:
        return ctx.HKV, ctx.G, ctx.G
    return ctx.HQ, 1, 1


def key_params(ctx: StageCtx, e: Estimator) -> list[tuple[str, tuple, str]]:
    """The key arguments of an estimate kernel: ``KeyCodes.tensors()`` of ``KeyCodeSpec.of(e)``
    (or the K pages for exact keys), in that order."""
    if e.kind == "exact":
        return [("kp", ("CAP", ctx.HKV, ctx.PS, ctx.D), ctx.dtype)]
    nb = ceil_div(ctx.D * e.bits, 8)
    out = [("codes", ("CAP", ctx.HKV, ctx.PS, nb), "uint8")]
    if e.granularity == "token":
        out += [("ksc", ("CAP", ctx.HKV, ctx.PS), "float32"),
                ("kzr", ("CAP", ctx.HKV, ctx.PS), "float32")]
        if e.smooth:
            out.append(("smooth", (ctx.HKV, ctx.D), "float32"))
        return out
    return out + [("klo", ("CAP", ctx.HKV, ctx.D), ctx.dtype),
                  ("khi", ("CAP", ctx.HKV, ctx.D), ctx.dtype)]


def per_channel(e: Estimator) -> bool:
    return e.kind == "quantized" and e.granularity in ("page", "group")


def gen_estimate(ctx: StageCtx, stage: int) -> KernelSource:
    e = ctx.p.prune[stage].estimator
    s = Src(ctx.dialect)
    rows, gh, gq = est_rows(ctx, stage)
    params = [("q", ("B", ctx.HQ, ctx.D), ctx.dtype), ("pt", ("B", "NP"), "int32"),
              ("cidx", ("B", ctx.HQ, "C"), "int32"), ("ccnt", ("B", ctx.HQ), "int32")]
    params += key_params(ctx, e) + [("w", ("B", ctx.HQ, "C"), "float32")]
    if ctx.dialect.cuda:
        with s.func(f"estimate{stage}", params, ("B", "NP", "C", "CAP")):
            _row_kernel(ctx, s, e, rows, gh, gq)
        return s.source("estimate", f"estimate{stage}")
    # llvm: rows split over the context (``nsplit``'s length is the plan's split count), the
    # logits of whole tiles at once, then the softmax as a phase of its own
    params.append(("nsplit", ("NS",), "int32"))
    tl = tile_lanes(ctx, e)
    with s.func(f"estimate{stage}", params, ("B", "NP", "C", "CAP", "NS")):
        if per_channel(e):
            _word_views(ctx, s, e)
        if tl:
            code_words(ctx, s, e)
        with s.rows("r", f"B * {rows} * NS"):
            s(f"b = r // ({rows} * NS)", f"hr = r % ({rows} * NS) // NS", "spl = r % NS")
            s(f"h0 = hr * {gh}", f"hkv = h0 // {ctx.G}", "n = ccnt[b, h0]")
            # a split's share of the row, in whole pages (page runs stay whole)
            s(f"chunk = ((n + NS - 1) // NS + {ctx.PS - 1}) // {ctx.PS} * {ctx.PS}",
              "lo = T.min(spl * chunk, n)", "hi = T.min(lo + chunk, n)")
            _load_queries(ctx, s, e, gh, gq)
            if int8_query(ctx, e):
                tile_buffers(ctx, s, e, gq, tl, floats=False)
                int8_buffers(s, e, gq, tl, ceil_div(ctx.D * e.bits, 8))
                if not per_channel(e):  # token codes: one query a row
                    quantize_planes(ctx, s, e, gq, ceil_div(ctx.D * e.bits, 8))
            elif tl:
                tile_buffers(ctx, s, e, gq, tl)
            if per_channel(e):
                if tl and not int8_query(ctx, e):
                    s.local("qn", (gq, ctx.D))
                    s.local("scn", ctx.D)
                _per_channel_loop(ctx, s, e, gq, tl)
            elif tl:
                _tiles_or_tokens(ctx, s, e, gq, tl, "lo", "hi")
            else:
                with s.block("for i in range(lo, hi):"):
                    _logits(ctx, s, e, gq)
        write_softmax(ctx, s, rows, gh, gq)
    return s.source("estimate", f"estimate{stage}")


def _row_kernel(ctx: StageCtx, s: Src, e: Estimator, rows: int, gh: int, gq: int) -> None:
    """cuda: one thread a row, its candidates one by one, then its softmax."""
    if per_channel(e):
        _word_views(ctx, s, e)
    with s.rows("r", f"B * {rows}"):
        s(f"b = r // {rows}", f"hr = r % {rows}")
        s(f"h0 = hr * {gh}", f"hkv = h0 // {ctx.G}", "n = ccnt[b, h0]", "lo = 0", "hi = n")
        _load_queries(ctx, s, e, gh, gq)
        if per_channel(e):
            _per_channel_loop(ctx, s, e, gq, 0)
        else:
            with s.block("for i in range(n):"):
                _logits(ctx, s, e, gq)
        _softmax(ctx, s, gq)
        for g in range(gq, gh):  # group "kv": every head of the group gets the estimate
            with s.block("for i in range(C):"):
                s(f"w[b, h0 + {g}, i] = w[b, h0, i]")


def _logits(ctx: StageCtx, s: Src, e: Estimator, gq: int) -> None:
    """``w[b, h0 + g, i]`` ← the logits of candidate ``i`` (before the softmax)."""
    s("t = cidx[b, h0, i]", f"phys = pt[b, t // {ctx.PS}]", f"slot = t % {ctx.PS}")
    for g, logit in enumerate(_dot(ctx, s, e, gq)):
        s(f"w[b, h0 + {g}, i] = {softcap_text(ctx, f'{logit} * {f32(ctx.softmax_scale())}')}")


def _tiles_or_tokens(ctx: StageCtx, s: Src, e: Estimator, gq: int, tl: int, start: str,
                     end: str, planes=None) -> None:
    """Candidates ``start .. end - 1``: whole tiles by the tile path, the others one by one.
    ``planes()`` writes the per-token path's planes, the first time it is needed."""
    s.local("cur", 2, "int32")
    s(f"cur[0] = {start}", "cur[1] = 0")
    with s.block(f"while cur[0] < {end}:"):
        s("i = cur[0]")
        with s.block(f"if {is_tile(tl, end)}:"):
            if int8_query(ctx, e):
                write_tile_int8(ctx, s, e, gq, tl, load_tile(ctx, s, e, tl))
            else:
                write_tile(ctx, s, e, gq, tl, "qn" if per_channel(e) else "qvs")
            s(f"cur[0] = i + {tl}")
        with s.block("else:"):
            if planes is not None:
                with s.block("if cur[1] == 0:"):
                    planes()
                    s("cur[1] = 1")
            _logits(ctx, s, e, gq)
            s("cur[0] = i + 1")


def _per_channel_loop(ctx: StageCtx, s: Src, e: Estimator, gq: int, tl: int) -> None:
    """The candidates in runs that share a side page: ``run[0]..run[1]`` hold the tokens of one
    page (group); the query planes are rebuilt once a run, and the run's own loop is the token
    path's (its planes are loop-invariant there, so the compiler keeps them in registers), or
    whole tiles by the tile path (``estimate_tile``)."""
    unit = ctx.PS * e.group_pages
    s.local("run", 2, "int32")
    s("run[0] = lo")
    with s.block("while run[0] < hi:"):
        s("t0 = cidx[b, h0, run[0]]", f"u = t0 // {unit}", f"sp = pt[b, u * {e.group_pages}]",
          "run[1] = run[0] + 1")
        whole = (f"t0 % {unit} == 0 and run[0] + {unit} <= hi and "
                 f"cidx[b, h0, T.min(run[0] + {unit - 1}, hi - 1)] == t0 + {unit - 1}")
        with s.block(f"if {whole}:"):  # the whole page (group): no need to walk it
            s(f"run[1] = run[0] + {unit}")
        # the clamped index keeps the (not short-circuited) load in bounds at the list's end
        with s.block(f"while run[1] < hi and cidx[b, h0, T.min(run[1], hi - 1)] // {unit} == u:"):
            s("run[1] = run[1] + 1")
        if int8_query(ctx, e):  # the other tokens take the rounded planes, dequantized
            _side_planes(ctx, s, e, gq, quantize=True)
            _tiles_or_tokens(ctx, s, e, gq, tl, "run[0]", "run[1]",
                             lambda: dequantized_planes(s, e, gq, ceil_div(ctx.D * e.bits, 8)))
        elif tl:
            natural_planes(ctx, s, e, gq)
            _tiles_or_tokens(ctx, s, e, gq, tl, "run[0]", "run[1]",
                             lambda: _side_planes(ctx, s, e, gq))
        else:
            _side_planes(ctx, s, e, gq)
            with s.block("for i in range(run[0], run[1]):"):
                _logits(ctx, s, e, gq)
        s("run[0] = run[1]")


def _load_queries(ctx: StageCtx, s: Src, e: Estimator, gh: int, gq: int) -> None:
    """``qv [gq, D]`` (the mean query when ``gq < gh``; times the smoothing factors for smoothed
    codes), and for quantized keys the planes ``qp [gq, per, nbytes]`` and ``qs [gq]``: for token
    codes the query's planes and ``Σ q``, filled here; for per-channel codes (filled per side
    page by ``_side_planes``) ``q∘scale`` and ``Σ q·lo``."""
    d = ctx.D
    s.local("qv", (gq, d))
    with s.block(f"for g, c in T.grid({gq}, {d}):"):
        if gq == gh:
            s('qv[g, c] = T.Cast("float32", q[b, h0 + g, c])')
        else:
            s("qv[g, c] = T.float32(0)")
            with s.block(f"for gg in range({gh}):"):
                s('qv[g, c] = qv[g, c] + T.Cast("float32", q[b, h0 + gg, c])')
            s(f"qv[g, c] = qv[g, c] / {f32(gh)}")
        if e.kind == "quantized" and e.smooth:
            s("qv[g, c] = qv[g, c] * smooth[hkv, c]")
    if e.kind != "quantized":
        return
    per, nb = 8 // e.bits, ceil_div(d * e.bits, 8)
    s.local("qp", (gq, per, nb))
    s.local("qs", gq)
    planes = "qp" if e.granularity == "token" else s.local("qvp", (gq, per, nb))
    with s.block(f"for g, pi, j in T.grid({gq}, {per}, {nb}):"):
        s(f"{planes}[g, pi, j] = T.if_then_else(j * {per} + pi < {d}, qv[g, T.min(j * {per} + "
          f"pi, {d - 1})], T.float32(0))")
    if e.granularity != "token":
        s.local("lop", (per, nb))
        s.local("scp", (per, nb))
        return
    with s.block(f"for g in range({gq}):"):
        s("qs[g] = T.float32(0)")
        with s.block(f"for c in range({d}):"):
            s("qs[g] = qs[g] + qv[g, c]")




def _packed_side(ctx: StageCtx, e: Estimator) -> int:
    """Bits of the word that holds the ``per = 8/bits`` channels of one code byte in ``lo``/``hi``
    (``per`` values of the cache dtype, channel ``j·per + i`` at bit ``i·ebits`` of word ``j``),
    or 0 when no such word exists (over 64 bits, or ``D`` not a multiple of ``per``)."""
    per = 8 // e.bits
    w = per * 8 * ctx.esize
    return w if w <= 64 and ctx.D % per == 0 else 0


def _word_views(ctx: StageCtx, s: Src, e: Estimator) -> None:
    """``klo``/``khi`` reinterpreted as one word per code byte (see ``_packed_side``), so the
    side page's values reach plane order by contiguous vector loads and shifts, not a gather."""
    w, per = _packed_side(ctx, e), 8 // e.bits
    if w and per > 1:
        for name in ("klo", "khi"):
            s(f'{name}_w = T.decl_buffer((CAP, {ctx.HKV}, {ctx.D // per}), "uint{w}", '
              f"data={name}.data)")


def _side_value(ctx: StageCtx, e: Estimator, name: str, j: str) -> str:
    """float32 ``name[sp, hkv, j·per + pi]`` (``pi`` the plane), through the word view."""
    w, per, eb = _packed_side(ctx, e), 8 // e.bits, 8 * ctx.esize
    if per == 1:
        return f'T.Cast("float32", {name}[sp, hkv, {j}])'
    word = f'T.shift_right({name}_w[sp, hkv, {j}], T.Cast("uint{w}", pi * {eb}))'
    bits = f'T.Cast("uint{eb}", {word})'
    if ctx.dtype == "float32":
        return f'T.reinterpret("float32", {bits})'
    if ctx.dtype == "bfloat16":  # a bfloat16 is the top half of the float32 it widens to
        return f'T.reinterpret("float32", T.shift_left(T.Cast("uint32", {bits}), T.uint32(16)))'
    return f'T.Cast("float32", T.reinterpret("float16", {bits}))'


def _side_planes(ctx: StageCtx, s: Src, e: Estimator, gq: int, quantize: bool = False) -> None:
    """Per-channel codes: ``qp = q∘scale`` (as planes) and ``qs = Σ q·lo`` for side page ``sp``.

    The page's ``lo`` and ``scale`` first go to plane order (``lop``/``scp``, ``D`` values), so
    the ``gq·D`` products run contiguous and vectorized over bytes. ``quantize``: each head's
    planes then rounded to int8 (``estimate_int8``), their largest magnitude found in the
    same pass."""
    d, per, nb = ctx.D, 8 // e.bits, ceil_div(ctx.D * e.bits, 8)
    # times the float32 1/levels, as ``natural_planes`` and the int8 reference do (a division
    # is not exact anyway: TVM's llvm code divides with fast-math)
    step = f32(1 / ((1 << e.bits) - 1))
    n, vw = _split(nb, ctx.vec)
    if _packed_side(ctx, e):
        with s.block(f"for pi, jo in T.grid({per}, {n}):"):
            with s.block(f"for v in {s.d.vec(vw)}:"):
                j = f"(jo * {vw} + v)"
                lo, hi = _side_value(ctx, e, "klo", j), _side_value(ctx, e, "khi", j)
                s(f"lop[pi, {j}] = {lo}", f"scp[pi, {j}] = ({hi} - {lo}) * {step}")
    else:  # a gather, channel by channel
        c = f"T.min(j * {per} + pi, {d - 1})"
        with s.block(f"for pi, j in T.grid({per}, {nb}):"):
            s(f'lop[pi, j] = T.if_then_else(j * {per} + pi < {d}, T.Cast("float32", '
              f"klo[sp, hkv, {c}]), T.float32(0))")
            s(f'scp[pi, j] = T.if_then_else(j * {per} + pi < {d}, (T.Cast("float32", '
              f"khi[sp, hkv, {c}]) - lop[pi, j]) * {step}, T.float32(0))")
    with s.block(f"for gi in range({gq}):"):
        acc = s.local(s.fresh("lacc"), vw)
        amx = s.local(s.fresh("amx"), vw) if quantize else None
        with s.block(f"for v in {s.d.vec(vw)}:"):
            s(f"{acc}[v] = T.float32(0)")
            if amx:
                s(f"{amx}[v] = T.float32(0)")
        with s.block(f"for pi, jo in T.grid({per}, {n}):"):
            with s.block(f"for v in {s.d.vec(vw)}:"):
                j = f"(jo * {vw} + v)"
                s(f"qp[gi, pi, {j}] = qvp[gi, pi, {j}] * scp[pi, {j}]",
                  f"{acc}[v] = {acc}[v] + qvp[gi, pi, {j}] * lop[pi, {j}]")
                if amx:
                    s(f"{amx}[v] = T.max({amx}[v], T.fabs(qp[gi, pi, {j}]))")
        s(f"qs[gi] = {_hsum(s, acc, vw)}")
        if amx:
            round_planes(s, e, "gi", nb, f"{lanes_sum(f'{amx}[T.Ramp(0, 1, {vw})]', vw, 'max')}")


def _dot(ctx: StageCtx, s: Src, e: Estimator, gq: int) -> list[str]:
    """Statements computing ``q_g · K̃[t]`` for the row's ``gq`` heads; returns their texts.

    The heads are unrolled inside the vectorized loop, so each code (key) vector is loaded and
    unpacked once for all of them."""
    d = ctx.D
    if e.kind == "quantized":
        per, nb, mask = 8 // e.bits, ceil_div(d * e.bits, 8), (1 << e.bits) - 1
        n, vw = _split(nb, ctx.vec)
        outer = f"for jo, pi in T.grid({n}, {per}):"
        j = f"(jo * {vw} + v)"  # inline: a let inside a vectorized loop miscompiles
        val = (f'T.Cast("float32", T.bitwise_and(T.shift_right(codes[phys, hkv, slot, {j}], '
               f'T.Cast("uint8", pi * {e.bits})), T.uint8({mask})))')
        qrow = f"qp[{{g}}, pi, {j}]"
    else:
        n, vw = _split(d, ctx.vec)
        outer = f"for jo in range({n}):"
        c = f"(jo * {vw} + v)"
        val = f'T.Cast("float32", kp[phys, hkv, slot, {c}])'
        qrow = f"qv[{{g}}, {c}]"
    acc = s.local(s.fresh("acc"), (gq, vw))
    with s.block(f"for g, v in T.grid({gq}, {vw}):"):
        s(f"{acc}[g, v] = T.float32(0)")
    with s.block(outer):
        with s.block(f"for v in {s.d.vec(vw)}:"):
            for g in range(gq):
                s(f"{acc}[{g}, v] = {acc}[{g}, v] + {qrow.format(g=g)} * {val}")
    totals = [_hsum(s, acc, vw, g) for g in range(gq)]
    if e.kind != "quantized":
        return totals
    if e.granularity == "token":
        return [f"(ksc[phys, hkv, slot] * {t} + kzr[phys, hkv, slot] * qs[{g}])"
                for g, t in enumerate(totals)]
    return [f"({t} + qs[{g}])" for g, t in enumerate(totals)]


def _split(n: int, vw: int) -> tuple[int, int]:
    """(outer trips, vector width) covering ``n`` exactly: the largest power of two ≤ vw that
    divides ``n``."""
    w = 1
    while w * 2 <= vw and n % (w * 2) == 0:
        w *= 2
    return n // w, w


def _hsum(s: Src, acc: str, vw: int, row: int | None = None) -> str:
    """The sum of ``acc[row, 0:vw]`` (or ``acc[0:vw]``), left to right. (A pairwise tree in
    place measured slower on llvm: it keeps ``acc`` in memory.)"""
    at = (lambda i: f"{acc}[{row}, {i}]") if row is not None else (lambda i: f"{acc}[{i}]")
    out = s.local(s.fresh("sum"), 1)
    s(f"{out}[0] = {at(0)}")
    for i in range(1, vw):
        s(f"{out}[0] = {out}[0] + {at(i)}")
    return f"{out}[0]"


def _softmax(ctx: StageCtx, s: Src, gq: int) -> None:
    """Normalize the row's logits in place; zeros past the candidates."""
    s.local("mx", 1)
    s.local("den", 1)
    with s.block(f"for g in range({gq}):"):
        s(f"mx[0] = {NEG_INF}", "den[0] = T.float32(0)")
        with s.block("for i in range(n):"):
            s("mx[0] = T.max(mx[0], w[b, h0 + g, i])")
        with s.block("for i in range(n):"):
            s("w[b, h0 + g, i] = T.exp(w[b, h0 + g, i] - mx[0])")
            s("den[0] = den[0] + w[b, h0 + g, i]")
        with s.block("for i in range(C):"):
            with s.block("if i < n:"):
                s("w[b, h0 + g, i] = w[b, h0 + g, i] / den[0]")
            with s.block("else:"):
                s("w[b, h0 + g, i] = T.float32(0)")
