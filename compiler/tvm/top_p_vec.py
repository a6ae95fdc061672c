"""Top-p by bisection on llvm, in vectorized passes (``top_p._bisect`` is the scalar original).

The search is ``_bisect``'s — the same brackets, so the same kept set up to float64 rounding at
the cut — with each "mass at or above ``t``" a pass of ``VW`` lanes. A pass first sums in float32
(one compare and one masked add a vector). A float32 sum of ``n`` positive terms in ``VW`` lanes
(the tail's in lane 0) and a shuffle tree is within ``(n / VW + VW + log2 VW) · 2⁻²⁴ · total``
of the exact mass: when it clears the goal by more than that, the decision is certain; otherwise
the pass is redone in float64 (the original's arithmetic). Far from the cut — most of a
search — the float32 pass decides.
"""

from __future__ import annotations

from .context import StageCtx, f32
from .dialect import Src
from .estimate_tile import lanes_sum

VW = 64  # lanes a pass handles at once: 4 vectors of float32 (8 of float64), so that the
# running sums are 4 independent chains (one chain was bound by the add latency)
MAX_BISECT = 100  # safety bound of the eps and mass loops (float32 brackets halve to nothing
# long before)


def bisect_cond(ctx: StageCtx, total: str) -> str:
    """The ``while`` condition of a bisection over the locals ``lo``, ``hi``, ``it`` (and, for
    the ``mass`` stop, ``mlo``/``mhi``: the mass at or above each end; ``total``: the row's).

    * ``mass`` — go on while the bracket ``[lo, hi)`` holds more than ``bisect_mass`` of the
      row's mass: every extra token kept lies there, so the kept mass is within ``p`` and
      ``p + bisect_mass`` of the row's at any context. A bracket with no float32 between its
      ends (ties at the cut) stops too;
    * ``eps`` — go on while the bracket is at least ``bisect_eps`` wide (Twilight's absolute
      rule: the extra mass it allows grows with the number of weights near the cut);
    * ``iters`` — a fixed count of steps (resolution ``max w / 2^iters``)."""
    stop = ctx.sched.get("bisect_stop", "mass")
    if stop == "iters":
        return f"it[0] < {int(ctx.sched.get('bisect_iters', 24))}"
    if stop == "eps":
        return f"hi[0] - lo[0] >= {f32(ctx.sched.get('bisect_eps', 1e-5))} and it[0] < {MAX_BISECT}"
    mid = "(lo[0] + hi[0]) * T.float32(0.5)"
    return (f"mlo[0] - mhi[0] > {total} * T.float64({float(ctx.sched.get('bisect_mass', 1e-3))!r})"
            f" and it[0] < {MAX_BISECT} and {mid} > lo[0] and {mid} < hi[0]")


def vloop(s: Src, n: str, body) -> None:
    """``body(i)`` for ``i`` in ``0 .. n-1``: ``VW`` lanes at a time, then a scalar tail."""
    with s.block(f"for io in range({n} // {VW}):"):
        with s.block(f"for v in T.vectorized({VW}):"):
            body(f"(io * {VW} + v)")
    with s.block(f"for i in range({n} // {VW} * {VW}, {n}):"):
        body("i")


def _lane(i: str) -> str:
    """The accumulator lane of element ``i`` (the scalar tail uses lane 0)."""
    return "v" if i != "i" else "0"


def _mass_pass(s: Src, wt, t: str, buf: str, dtype: str) -> str:
    """A pass summing ``w ≥ t`` into lanes ``buf``; returns the text of the total."""
    with s.block(f"for v in T.vectorized({VW}):"):
        s(f'{buf}[v] = T.{dtype}(0)')

    def add(i):
        x = wt(i)
        val = x if dtype == "float32" else f'T.Cast("float64", {x})'
        s(f"{buf}[{_lane(i)}] = {buf}[{_lane(i)}] + T.Select({x} >= {t}, {val}, "
          f"T.{dtype}(0))")  # Select: TVM's vectorizer scalarizes if_then_else
    vloop(s, "n", add)
    return lanes_sum(f"{buf}[T.Ramp(0, 1, {VW})]", VW)


def bisect_vec(ctx: StageCtx, s: Src, p: float, wt, gh: int) -> None:
    """Decisions ``dec[b, h0 + g, :]`` of one row (all ``C`` of them) by vectorized bisection."""
    tot, hv = s.local("totv", VW, "float64"), s.local("hiv", VW)
    with s.block(f"for v in T.vectorized({VW}):"):
        s(f"{tot}[v] = T.float64(0)", f"{hv}[v] = T.float32(0)")

    def first(i):
        x, ln = wt(i), _lane(i)
        s(f'{tot}[{ln}] = {tot}[{ln}] + T.Cast("float64", {x})',
          f"{hv}[{ln}] = T.max({hv}[{ln}], {x})")
    vloop(s, "n", first)
    for name, dt in (("lo", "float32"), ("hi", "float32"), ("tt", "float64"), ("m", "float64"),
                     ("mlo", "float64"), ("mhi", "float64"), ("ge", "int32"), ("it", "int32")):
        s.local(name, 1, dt)
    s(f"tt[0] = {lanes_sum(f'{tot}[T.Ramp(0, 1, {VW})]', VW)}")
    s(f"goal = tt[0] * T.float64({p!r})",
      f"band = T.Cast(\"float64\", n // {VW} + {VW + 8}) * T.float64(5.9604644775390625e-08) * "
      "tt[0]")
    s("lo[0] = T.float32(0)", f"hi[0] = {lanes_sum(f'{hv}[T.Ramp(0, 1, {VW})]', VW, 'max')}",
      "mlo[0] = tt[0]")
    m32, m64 = s.local("m32v", VW), s.local("m64v", VW, "float64")

    def decide(t: str) -> None:  # ge[0] = mass(w ≥ t) ≥ goal; m[0] that mass (to the band)
        s(f'm[0] = T.Cast("float64", {_mass_pass(s, wt, t, m32, "float32")})')
        with s.block("if m[0] >= goal + band:"):
            s("ge[0] = 1")
        with s.block("elif m[0] < goal - band:"):
            s("ge[0] = 0")
        with s.block("else:"):  # too close to call in float32
            s(f"m[0] = {_mass_pass(s, wt, t, m64, 'float64')}")
            s('ge[0] = T.Cast("int32", m[0] >= goal)')
    decide("hi[0]")
    s("mhi[0] = m[0]")
    with s.block("if ge[0] == 1:"):
        s("lo[0] = hi[0]", "mlo[0] = m[0]")
    s("it[0] = 0")
    with s.block(f"while {bisect_cond(ctx, 'tt[0]')}:"):
        s("mid = (lo[0] + hi[0]) * T.float32(0.5)")
        decide("mid")
        with s.block("if ge[0] == 1:"):
            s("lo[0] = mid", "mlo[0] = m[0]")
        with s.block("else:"):
            s("hi[0] = mid", "mhi[0] = m[0]")
        s("it[0] = it[0] + 1")

    def keep(i):
        x = wt(i)
        for g in range(gh):
            s(f'dec[b, h0 + {g}, {i}] = T.Cast("uint8", {x} >= lo[0] and {x} > T.float32(0))')
    vloop(s, "n", keep)
    with s.block("for i in range(n, C):"):
        for g in range(gh):
            s(f"dec[b, h0 + {g}, i] = T.uint8(0)")
