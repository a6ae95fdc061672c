"""The estimate's integer tile path on llvm (``estimate_query="int8"``): the query planes rounded
to int8, each tile's logits as integer dot products of the key codes with them (``vpdpbusd``,
AVX-512 VNNI: 4 byte products per 32-bit lane in one instruction).

The float tile path (``estimate_tile.write_tile``) is bound by the FMA peak: per code it masks,
converts and multiplies once per query head (86–99% of the fp32 matmul peak at 32/8 heads ×
d128 on a 2-core AMD EPYC). Here a 32-bit word of codes takes ``8/bits`` masks (one per code
position within its bytes) and one ``vpdpbusd`` per position and head, with no conversion.
Measured there (``benchmarks/cpu_bench.py``'s data, 32/8 × d128, INT4): token codes' estimate
1.75x faster; page codes' ~1.3x, as each page rebuilds and re-rounds its planes.

The query enters as ``qp [g, i, j]``, its *planes* (channel ``j·per + i``, ``per = 8/bits``:
the channels of byte ``j`` of a token's codes at position ``i``), which are ``q·scale`` for
per-channel codes (rebuilt once a side page, ``estimate._side_planes``) or ``q`` (times the
smoothing factors) for token codes (once a row, ``quantize_planes``). Each head's planes are
rounded with a power-of-two step: for a largest magnitude in ``[2^E, 2^(E+1))``,

    a = 2^(E-6),   qi = clamp(round(qp / a), ±127)   (half to even; 0 below 2^-120)

so scaling is exact and the rounding is the reference's bit for bit (TVM's llvm code divides
with fast-math, so ``127 / max`` would differ by an ulp and move rounding ties). A tile's logit
is ``a · Σ qi·code`` plus the float path's offset terms (``Σ q·lo`` per side page; ``scale·… +
zero·Σ q`` per token); candidates off the tile path (``estimate._dot``) take the planes
``a·qi`` (``dequantized_planes``), the same rounded query. The reference is
``runtime.evaluation.reference.int8_query_logits``: each logit moves by at most ``a·Σ code``
from the float estimate's (``a ≤ max|qp|/64``). It is a schedule choice, so the tuner's gate
(kept mass ≥ p under the float estimate, output error) decides where it may serve.
"""

from __future__ import annotations

from ..ir import Estimator
from .context import StageCtx, f32, softcap_text
from .dialect import Src
from .estimate_tile import lanes_sum, tile_lanes

INTRINSIC = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256"}
QMAX = 127
STEP_BITS = 6  # the step is 2^(E - 6) for a largest magnitude in [2^E, 2^(E+1)): 64..128 steps
MIN_EXP = STEP_BITS + 1  # biased exponents below this (max |q| < 2^-120) round the query to 0


def int8_query(ctx: StageCtx, e: Estimator) -> bool:
    """Does the estimate of ``e`` take the integer tile path? (``estimate_query="int8"``, an
    llvm target with AVX-512 VNNI, and a tile path for the codes.)"""
    return (ctx.sched.get("estimate_query") == "int8" and ctx.dialect.vnni
            and tile_lanes(ctx, e) in INTRINSIC)


def int8_buffers(s: Src, e: Estimator, gq: int, tl: int, nb: int) -> None:
    """Per-row locals: the int8 planes, their scale per head, the integer accumulators."""
    s.local("qi8", (gq, 8 // e.bits, nb), "int8")
    s.local("qa", gq)
    s.local("iacc", (gq, tl), "int32")
    s.local("qam", 2)


def _width(nb: int) -> int:
    vw = 1
    while vw * 2 <= 16 and nb % (vw * 2) == 0:
        vw *= 2
    return vw


def quantize_planes(ctx: StageCtx, s: Src, e: Estimator, gq: int, nb: int) -> None:
    """Token codes (one query a row): ``qi8``/``qa`` from the planes ``qp``, then ``qp`` ←
    ``qa·qi8`` for the candidates off the tile path."""
    per, vw = 8 // e.bits, _width(nb)
    with s.block(f"for g in range({gq}):"):
        amx = s.local(s.fresh("amx"), vw)
        with s.block(f"for v in {s.d.vec(vw)}:"):
            s(f"{amx}[v] = T.float32(0)")
        with s.block(f"for pi, jo in T.grid({per}, {nb // vw}):"):
            with s.block(f"for v in {s.d.vec(vw)}:"):
                s(f"{amx}[v] = T.max({amx}[v], T.fabs(qp[g, pi, jo * {vw} + v]))")
        round_planes(s, e, "g", nb, lanes_sum(f"{amx}[T.Ramp(0, 1, {vw})]", vw, "max"))
    dequantized_planes(s, e, gq, nb)


def round_planes(s: Src, e: Estimator, g: str, nb: int, amax: str) -> None:
    """Head ``g``'s planes ``qp`` rounded: ``qa[g]`` and ``qi8[g]`` from their largest
    magnitude ``amax`` (text), with a power-of-two step (see the module doc)."""
    per, vw = 8 // e.bits, _width(nb)
    s(f"qam[0] = {amax}")
    s.local("qeb", 1, "int32")  # amax's biased exponent: amax = m·2^(qeb - 127), m in [1, 2)
    s('qeb[0] = T.bitwise_and(T.shift_right(T.reinterpret("int32", qam[0]), 23), 255)')
    tiny = f"qeb[0] < {MIN_EXP}"
    s(f'qa[{g}] = T.if_then_else({tiny}, T.float32(0), T.reinterpret("float32", '
      f"T.shift_left(qeb[0] - {STEP_BITS}, 23)))",
      f'qam[1] = T.if_then_else({tiny}, T.float32(0), T.reinterpret("float32", '
      f"T.shift_left({254 + STEP_BITS} - qeb[0], 23)))")
    with s.block(f"for pi, jo in T.grid({per}, {nb // vw}):"):
        with s.block(f"for v in {s.d.vec(vw)}:"):
            j = f"jo * {vw} + v"
            # T.round: half to even, vectorized (T.nearbyint calls libm a lane at a time)
            x = f"T.round(qp[{g}, pi, {j}] * qam[1])"
            s(f'qi8[{g}, pi, {j}] = T.Cast("int8", T.min(T.max({x}, {f32(-QMAX)}), {f32(QMAX)}))')


def dequantized_planes(s: Src, e: Estimator, gq: int, nb: int) -> None:
    """``qp`` ← ``qa·qi8``: the rounded query for the per-token path (``estimate._dot``)."""
    per, vw = 8 // e.bits, _width(nb)
    with s.block(f"for g, pi, jo in T.grid({gq}, {per}, {nb // vw}):"):
        with s.block(f"for v in {s.d.vec(vw)}:"):
            j = f"jo * {vw} + v"
            s(f'qp[g, pi, {j}] = T.Cast("float32", qi8[g, pi, {j}]) * qa[g]')


def write_tile_int8(ctx: StageCtx, s: Src, e: Estimator, gq: int, tl: int, words: str) -> None:
    """Logits of the tile at candidate ``i`` from its transposed code words ``words [nw, tl]``
    (``estimate_tile._load_words``) and the int8 planes."""
    nw, per = ctx.D * e.bits // 32, 8 // e.bits
    mask = ((1 << e.bits) - 1) * 0x01010101
    lanes = f"T.Ramp(0, 1, {tl})"
    ity, bty = f"int32x{tl}", f"int8x{4 * tl}"  # LLVM's vpdpbusd takes <4·tl x i8> operands
    with s.block(f"for g, t in T.grid({gq}, {tl}):"):
        s("iacc[g, t] = 0")
    with s.block(f"for wd in range({nw}):"):
        for k in range(per):
            shifted = (f"T.shift_right({words}[wd, {lanes}], T.Broadcast(T.uint32({k * e.bits}), "
                       f"{tl}))" if k else f"{words}[wd, {lanes}]")
            codes = (f'T.reinterpret("{bty}", T.bitwise_and({shifted}, '
                     f"T.Broadcast(T.uint32({mask}), {tl})))")
            for g in range(gq):
                qw = (f'T.reinterpret("{bty}", T.Broadcast(T.reinterpret("int32", '
                      f"qi8[{g}, {k}, T.Ramp(wd * 4, 1, 4)]), {tl}))")
                s(f'iacc[{g}, {lanes}] = T.call_llvm_pure_intrin("{ity}", "{INTRINSIC[tl]}", '
                  f"iacc[{g}, {lanes}], {codes}, {qw})")
    scale = f32(ctx.softmax_scale())
    with s.block(f"for t in T.vectorized({tl}):"):
        for g in range(gq):
            dot = f'(T.Cast("float32", iacc[{g}, t]) * qa[{g}])'
            if e.granularity == "token":
                logit = f"(ksc[tph, hkv, ts + t] * {dot} + kzr[tph, hkv, ts + t] * qs[{g}])"
            else:
                logit = f"({dot} + qs[{g}])"
            s(f"w[b, h0 + {g}, i + t] = {softcap_text(ctx, f'{logit} * {scale}')}")
