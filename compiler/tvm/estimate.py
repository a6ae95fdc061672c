"""The estimate stage: ``est_w [B, Hq, C] = softmax(scale · q·K̃)`` over each row's candidates,
with ``K̃`` exact keys or INT2/4/8 codes (token or page granularity).

When a GQA group's heads share one candidate list (``StageCtx.uniform_after``) a row is a
(request, KV head) and every key code it unpacks serves all ``G`` query heads; otherwise a row is
one query head. Token granularity uses ``q·K̃ = scale·Σ q_c·code_c + zero·Σ q_c``: the codes
are read as bytes and multiplied with the query split into ``8/bits`` planes (channel
``j·per + i`` of byte ``j``), so the inner loop is contiguous and vectorizes.
"""

from __future__ import annotations

from ..ir import Estimator
from .build import KernelSource
from .context import StageCtx, f32, softcap_text
from .dialect import NEG_INF, Src, ceil_div


def est_rows(ctx: StageCtx, stage: int) -> tuple[int, int, int]:
    """(rows per request, query heads per row, heads whose queries are computed)."""
    if ctx.p.prune[stage].group == "kv":
        return ctx.HKV, ctx.G, 1
    if ctx.uniform_after(stage) and ctx.G > 1:
        return ctx.HKV, ctx.G, ctx.G
    return ctx.HQ, 1, 1


def key_params(ctx: StageCtx, e: Estimator) -> list[tuple[str, tuple, str]]:
    if e.kind == "exact":
        return [("kp", ("CAP", ctx.HKV, ctx.PS, ctx.D), ctx.dtype)]
    nb = ceil_div(ctx.D * e.bits, 8)
    side = ("CAP", ctx.HKV, ctx.PS) if e.granularity == "token" else ("CAP", ctx.HKV, ctx.D)
    return [("codes", ("CAP", ctx.HKV, ctx.PS, nb), "uint8"), ("ksc", side, "float32"),
            ("kzr", side, "float32")]


def gen_estimate(ctx: StageCtx, stage: int) -> KernelSource:
    e = ctx.p.prune[stage].estimator
    s = Src(ctx.dialect)
    rows, gh, gq = est_rows(ctx, stage)
    params = [("q", ("B", ctx.HQ, ctx.D), ctx.dtype), ("pt", ("B", "NP"), "int32"),
              ("cidx", ("B", ctx.HQ, "C"), "int32"), ("ccnt", ("B", ctx.HQ), "int32")]
    params += key_params(ctx, e) + [("w", ("B", ctx.HQ, "C"), "float32")]
    with s.func(f"estimate{stage}", params, ("B", "NP", "C", "CAP")):
        with s.rows("r", f"B * {rows}"):
            s(f"b = r // {rows}", f"hr = r % {rows}")
            s(f"h0 = hr * {gh}", f"hkv = h0 // {ctx.G}", "n = ccnt[b, h0]")
            _load_queries(ctx, s, e, gh, gq)
            with s.block("for i in range(n):"):
                s("t = cidx[b, h0, i]", f"phys = pt[b, t // {ctx.PS}]", f"slot = t % {ctx.PS}")
                with s.block(f"for g in range({gq}):"):
                    logit = _dot(ctx, s, e)
                    s(f"w[b, h0 + g, i] = {softcap_text(ctx, f'{logit} * {f32(ctx.softmax_scale())}')}")
            _softmax(ctx, s, gq)
            for g in range(gq, gh):  # group "kv": every head of the group gets the estimate
                with s.block("for i in range(C):"):
                    s(f"w[b, h0 + {g}, i] = w[b, h0, i]")
    return KernelSource("estimate", f"estimate{stage}", s.text())


def _load_queries(ctx: StageCtx, s: Src, e: Estimator, gh: int, gq: int) -> None:
    """``qv [gq, D]`` (the mean query when ``gq < gh``), and for token codes the query planes
    ``qp [gq, per, nbytes]`` and ``qs [gq]`` = Σ q."""
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
    if e.kind == "quantized" and e.granularity == "token":
        per, nb = 8 // e.bits, ceil_div(d * e.bits, 8)
        s.local("qp", (gq, per, nb))
        s.local("qs", gq)
        with s.block(f"for g, i, j in T.grid({gq}, {per}, {nb}):"):
            s(f"qp[g, i, j] = T.if_then_else(j * {per} + i < {d}, qv[g, T.min(j * {per} + i, "
              f"{d - 1})], T.float32(0))")
        with s.block(f"for g in range({gq}):"):
            s("qs[g] = T.float32(0)")
            with s.block(f"for c in range({d}):"):
                s("qs[g] = qs[g] + qv[g, c]")


def _dot(ctx: StageCtx, s: Src, e: Estimator) -> str:
    """Statements computing ``q_g · K̃[t]``; returns its text."""
    d, vw = ctx.D, ctx.vec
    acc = s.local(s.fresh("acc"), vw)
    with s.block(f"for v in {s.d.vec(vw)}:"):
        s(f"{acc}[v] = T.float32(0)")
    if e.kind == "quantized" and e.granularity == "token":
        per, nb, mask = 8 // e.bits, ceil_div(d * e.bits, 8), (1 << e.bits) - 1
        n, vw2 = _split(nb, vw)
        with s.block(f"for jo, i in T.grid({n}, {per}):"):
            with s.block(f"for v in {s.d.vec(vw2)}:"):
                j = f"(jo * {vw2} + v)"  # inline: a let inside a vectorized loop miscompiles
                code = (f'T.Cast("float32", T.bitwise_and(T.shift_right(codes[phys, hkv, slot, {j}]'
                        f', T.Cast("uint8", i * {e.bits})), T.uint8({mask})))')
                s(f"{acc}[v] = {acc}[v] + qp[g, i, {j}] * {code}")
        total = _hsum(s, acc, vw2)
        return f"(ksc[phys, hkv, slot] * {total} + kzr[phys, hkv, slot] * qs[g])"
    n, vw2 = _split(d, vw)
    with s.block(f"for co in range({n}):"):
        with s.block(f"for v in {s.d.vec(vw2)}:"):
            c = f"(co * {vw2} + v)"  # inline: a let inside a vectorized loop miscompiles
            if e.kind == "exact":
                k = f'T.Cast("float32", kp[phys, hkv, slot, {c}])'
            else:
                per, mask = 8 // e.bits, (1 << e.bits) - 1
                code = (f'T.Cast("float32", T.bitwise_and(T.shift_right(codes[phys, hkv, slot, '
                        f'{c} // {per}], T.Cast("uint8", {c} % {per} * {e.bits})), T.uint8({mask})))')
                k = f"({code} * ksc[phys, hkv, {c}] + kzr[phys, hkv, {c}])"
            s(f"{acc}[v] = {acc}[v] + qv[g, {c}] * {k}")
    return _hsum(s, acc, vw2)


def _split(n: int, vw: int) -> tuple[int, int]:
    """(outer trips, vector width) covering ``n`` exactly: the largest power of two ≤ vw that
    divides ``n``."""
    w = 1
    while w * 2 <= vw and n % (w * 2) == 0:
        w *= 2
    return n // w, w


def _hsum(s: Src, acc: str, vw: int) -> str:
    out = s.local(s.fresh("sum"), 1)
    s(f"{out}[0] = {acc}[0]")
    for i in range(1, vw):
        s(f"{out}[0] = {out}[0] + {acc}[{i}]")
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
