"""The prune stage: decide which candidates each row keeps from its estimated weights, then
write the kept lists (the keep rules' tokens always stay).

Top-p strategies (``schedules.common.TOP_P``), one row per (request, head or KV head):

* ``sort``   — LSD radix sort of the weights (stable, descending: ties keep index order) and the
  float64 cumulative sum in sorted order: the reference's own arithmetic, so the same set;
* ``radix``  — radix select of the cut on the weights' float32 bits (``radix_bits`` a pass,
  float64 mass per bucket), then the ties at the cut in index order: a fixed pass count;
* ``bisect`` — bisection on a threshold in ``[0, max w]``: keep ``w ≥ lo`` while the mass there is
  ≥ p; stop when the bracket holds at most ``bisect_mass`` of the row's mass (the default), is
  below ``eps`` wide, or after ``iters`` steps (:func:`bisect_cond`). Never less than p; at most
  the minimal set plus weights within the bracket.

``top_k`` ranks the positive weights (radix select, as the selector's top-k), ``threshold`` keeps
``w ≥ value``. GQA: ``none``/``union`` decide per query head (``union`` ORs a group's decisions
in the list kernel); ``mean``/``max``/``kv`` decide once per KV head on the merged weights.
"""

from __future__ import annotations

from .build import KernelSource
from .context import StageCtx, f32, keep_text
from .dialect import Src
from .lists import write_kept
from .select import order_key, write_top_k
from .top_p_vec import bisect_cond, bisect_vec


def decision_rows(ctx: StageCtx, stage: int) -> tuple[int, int]:
    """(decision rows per request, query heads per row)."""
    if ctx.p.prune[stage].group in ("mean", "max", "kv"):
        return ctx.HKV, ctx.G
    return ctx.HQ, 1


def gen_decide(ctx: StageCtx, stage: int) -> KernelSource:
    pr = ctx.p.prune[stage]
    s = Src(ctx.dialect)
    rows, gh = decision_rows(ctx, stage)
    strategy = ctx.sched.get("top_p_strategy", "bisect") if pr.rule == "top_p" else pr.rule
    params = [("w", ("B", ctx.HQ, "C"), "float32"), ("ccnt", ("B", ctx.HQ), "int32"),
              ("kcount", ("B",), "int32"), ("dec", ("B", ctx.HQ, "C"), "uint8")]
    if strategy == "sort":
        params += [(n, ("B", rows, "C"), dt) for n, dt in
                   (("ka", "uint32"), ("ia", "int32"), ("kb", "uint32"), ("ib", "int32"))]
    with s.func(f"decide{stage}", params, ("B", "C")):
        with s.rows("r", f"B * {rows}"):
            s(f"b = r // {rows}", f"hr = r % {rows}", f"h0 = hr * {gh}", "n = ccnt[b, h0]")
            wt = _merged(ctx, s, pr.group, gh)

            def out(i, v):
                with s.block(f"for g in range({gh}):"):
                    s(f"dec[b, h0 + g, {i}] = T.uint8({v})")
            if strategy == "bisect" and not s.d.cuda and not (pr.rule == "top_p" and pr.p >= 1):
                bisect_vec(ctx, s, pr.p, wt, gh)  # writes every decision itself
            else:
                _decide_scalar(ctx, s, pr, strategy, wt, out)
    return s.source("prune", f"decide{stage}")


def _decide_scalar(ctx: StageCtx, s: Src, pr, strategy: str, wt, out) -> None:
    with s.block("for i in range(C):"):
        out("i", 0)
    if pr.rule == "top_p" and pr.p >= 1:
        with s.block("for i in range(n):"):
            out("i", f"T.Cast(\"int32\", {wt('i')} > T.float32(0))")
    elif strategy == "top_k":
        write_top_k(s, "n", lambda i: order_key(wt(i)),
                    lambda i: f"{wt(i)} > T.float32(0)", "kcount[b]", out)
    elif strategy == "threshold":
        with s.block("for i in range(n):"):
            out("i", f"T.Cast(\"int32\", {wt('i')} >= {f32(pr.threshold)})")
    else:
        {"sort": _sort, "radix": radix_top_p, "bisect": _bisect}[strategy](ctx, s, pr.p, wt, out)


def _merged(ctx: StageCtx, s: Src, group: str, gh: int):
    """``wt(i)``: the text of a row's weight ``i`` after the group merge."""
    if group == "mean":
        return lambda i: "((" + " + ".join(f"w[b, h0 + {g}, {i}]" for g in range(gh)) + \
            f") / {f32(gh)})"
    if group != "max":
        return lambda i: f"w[b, h0, {i}]"

    def mx(i):
        return "T.max(" * (gh - 1) + f"w[b, h0, {i}]" + "".join(
            f", w[b, h0 + {g}, {i}])" for g in range(1, gh))
    s.local("norm", 1)
    s("norm[0] = T.float32(0)")
    with s.block("for i in range(n):"):
        s(f"norm[0] = norm[0] + {mx('i')}")
    return lambda i: f"({mx(i)} / T.max(norm[0], T.float32(1e-30)))"


def _target(s: Src, p: float, wt) -> None:
    s.local("tot", 1, "float64")
    s("tot[0] = T.float64(0)")
    with s.block("for i in range(n):"):
        s(f'tot[0] = tot[0] + T.Cast("float64", {wt("i")})')
    s(f"goal = tot[0] * T.float64({p!r})")


def _bisect(ctx: StageCtx, s: Src, p: float, wt, out) -> None:
    _target(s, p, wt)
    s.local("lo", 1)
    s.local("hi", 1)
    s.local("mass", 1, "float64")
    s.local("mlo", 1, "float64")
    s.local("mhi", 1, "float64")
    s.local("it", 1, "int32")
    s("lo[0] = T.float32(0)", "hi[0] = T.float32(0)", "mlo[0] = tot[0]")
    with s.block("for i in range(n):"):
        s(f"hi[0] = T.max(hi[0], {wt('i')})")

    def mass_at(t):
        s("mass[0] = T.float64(0)")
        with s.block("for i in range(n):"):
            with s.block(f"if {wt('i')} >= {t}:"):
                s(f'mass[0] = mass[0] + T.Cast("float64", {wt("i")})')
    mass_at("hi[0]")
    s("mhi[0] = mass[0]")
    with s.block("if mass[0] >= goal:"):
        s("lo[0] = hi[0]", "mlo[0] = mass[0]")
    s("it[0] = 0")
    with s.block(f"while {bisect_cond(ctx, 'tot[0]')}:"):
        s("mid = (lo[0] + hi[0]) * T.float32(0.5)")
        mass_at("mid")
        with s.block("if mass[0] >= goal:"):
            s("lo[0] = mid", "mlo[0] = mass[0]")
        with s.block("else:"):
            s("hi[0] = mid", "mhi[0] = mass[0]")
        s("it[0] = it[0] + 1")
    with s.block("for i in range(n):"):
        out("i", f'T.Cast("int32", {wt("i")} >= lo[0] and {wt("i")} > T.float32(0))')


def radix_top_p(ctx: StageCtx, s: Src, p: float, wt, out) -> None:
    """Keep the minimal set of the ``n`` weights ``wt(i)`` holding mass ``p`` (radix select of the
    cut on the weights' float32 bits, then the ties at the cut in index order)."""
    bits = int(ctx.sched.get("radix_bits", 8))
    _target(s, p, wt)
    nb = 1 << bits
    s.local("hm", nb, "float64")
    s.local("above", 1, "float64")
    s.local("prefix", 1, "uint32")
    s.local("found", 1, "int32")
    s.local("low", 1, "int32")
    s("above[0] = T.float64(0)", "prefix[0] = T.uint32(0)")
    key = lambda i: f'T.reinterpret("uint32", {wt(i)})'  # noqa: E731 - weights are ≥ 0
    hi_bit = 32
    while hi_bit > 0:
        width = min(bits, hi_bit)
        shift, himask = hi_bit - width, (0xFFFFFFFF << hi_bit) & 0xFFFFFFFF
        with s.block(f"for j in range({nb}):"):
            s("hm[j] = T.float64(0)")
        with s.block("for i in range(n):"):
            with s.block(f"if {wt('i')} > T.float32(0) and "
                         f"T.bitwise_and({key('i')}, T.uint32({himask})) == prefix[0]:"):
                s(f'bk = T.Cast("int32", T.bitwise_and(T.shift_right({key("i")}, '
                  f'T.uint32({shift})), T.uint32({(1 << width) - 1})))')
                s(f'hm[bk] = hm[bk] + T.Cast("float64", {wt("i")})')
        s("found[0] = 0", "low[0] = -1")
        with s.block(f"for jj in range({1 << width}):"):
            s(f"j = {(1 << width) - 1} - jj")
            with s.block("if found[0] == 0 and hm[j] > T.float64(0):"):
                s("low[0] = j")
                with s.block("if above[0] + hm[j] >= goal:"):
                    s(f'prefix[0] = T.bitwise_or(prefix[0], T.shift_left(T.Cast("uint32", j), '
                      f'T.uint32({shift})))', "found[0] = 1")
                with s.block("else:"):
                    s("above[0] = above[0] + hm[j]")
        with s.block("if found[0] == 0 and low[0] >= 0:"):  # float64 rounding: take the last
            s("above[0] = above[0] - hm[low[0]]")
            s(f'prefix[0] = T.bitwise_or(prefix[0], T.shift_left(T.Cast("uint32", low[0]), '
              f'T.uint32({shift})))')
        hi_bit -= width
    s('cut = T.reinterpret("float32", prefix[0])')
    with s.block("for i in range(n):"):
        with s.block(f"if {wt('i')} > cut:"):
            out("i", 1)
        with s.block(f"elif {wt('i')} == cut and cut > T.float32(0):"):
            with s.block("if above[0] < goal:"):
                out("i", 1)
            s('above[0] = above[0] + T.Cast("float64", cut)')


def _sort(ctx: StageCtx, s: Src, p: float, wt, out) -> None:
    """Stable LSD radix sort (8 bits, 4 passes) on inverted keys = descending weights."""
    s.local("hist", 256, "int32")
    s.local("run", 1, "int32")
    with s.block("for i in range(n):"):
        s(f'ka[b, hr, i] = T.bitwise_xor(T.reinterpret("uint32", {wt("i")}), '
          'T.uint32(4294967295))', "ia[b, hr, i] = i")
    src, dst = ("ka", "ia"), ("kb", "ib")
    for shift in (0, 8, 16, 24):
        digit = f'T.Cast("int32", T.bitwise_and(T.shift_right({src[0]}[b, hr, i], ' \
                f'T.uint32({shift})), T.uint32(255)))'
        with s.block("for j in range(256):"):
            s("hist[j] = 0")
        with s.block("for i in range(n):"):
            s(f"d = {digit}", "hist[d] = hist[d] + 1")
        s("run[0] = 0")
        with s.block("for j in range(256):"):
            s("c = hist[j]", "hist[j] = run[0]", "run[0] = run[0] + c")
        with s.block("for i in range(n):"):
            s(f"d = {digit}", f"{dst[0]}[b, hr, hist[d]] = {src[0]}[b, hr, i]",
              f"{dst[1]}[b, hr, hist[d]] = {src[1]}[b, hr, i]", "hist[d] = hist[d] + 1")
        src, dst = dst, src
    s.local("cum", 1, "float64")
    s("cum[0] = T.float64(0)")
    with s.block("for j in range(n):"):
        s(f'cum[0] = cum[0] + T.Cast("float64", {wt(f"{src[1]}[b, hr, j]")})')
    s(f"goal = cum[0] * T.float64({p!r})", "cum[0] = T.float64(0)")
    with s.block("for j in range(n):"):
        s(f"i = {src[1]}[b, hr, j]", f'wj = T.Cast("float64", {wt("i")})', "cum[0] = cum[0] + wj")
        with s.block("if cum[0] - wj < goal and wj > T.float64(0):"):
            out("i", 1)


def gen_kept(ctx: StageCtx, stage: int) -> KernelSource:
    """Kept lists from the decisions (``union`` ORs the group's), plus the keep rules."""
    pr = ctx.p.prune[stage]
    s = Src(ctx.dialect)
    params = [("lens", ("B",), "int32"), ("cidx", ("B", ctx.HQ, "C"), "int32"),
              ("ccnt", ("B", ctx.HQ), "int32"), ("dec", ("B", ctx.HQ, "C"), "uint8"),
              ("kidx", ("B", ctx.HQ, "K"), "int32"), ("kcnt", ("B", ctx.HQ), "int32")]
    if pr.group == "union":
        terms = " + ".join(f'T.Cast("int32", dec[b, hkv * {ctx.G} + {g}, i])'
                           for g in range(ctx.G))
        kept = f"{terms} > 0"
    else:
        kept = "dec[b, h, i] > T.uint8(0)"
    with s.func(f"kept{stage}", params, ("B", "C", "K")):
        if not s.d.cuda:
            s(f'decw = T.decl_buffer((B * {ctx.HQ} * C // 8,), "uint64", data=dec.data)')
            write_kept(ctx, s, pr.group != "none", kept)
            return s.source("prune", f"kept{stage}")
        with s.rows("r", f"B * {ctx.HQ}"):
            s(f"b = r // {ctx.HQ}", f"h = r % {ctx.HQ}", f"hkv = h // {ctx.G}", "L = lens[b]")
            s.local("m", 1, "int32")
            s("m[0] = 0")
            with s.block("for i in range(ccnt[b, h]):"):
                s("t = cidx[b, h, i]")
                with s.block(f"if {kept} or {keep_text(ctx, 't', 'L')}:"):
                    with s.block("if m[0] < K:"):
                        s("kidx[b, h, m[0]] = t")
                    s("m[0] = m[0] + 1")
            s("kcnt[b, h] = T.min(m[0], K)")
            with s.block("for i in range(K):"):
                with s.block("if i >= m[0]:"):
                    s("kidx[b, h, i] = -1")
    return s.source("prune", f"kept{stage}")
