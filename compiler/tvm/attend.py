"""The attend stage: exact attention over ragged kept lists in the paged cache, split-KV.

A row is (request, head, split): ``split`` takes an equal share of the row's kept list (a whole
number of pages' worth of positions), so a batch of few heads still fills every core. When the
heads of a GQA group share one list (``StageCtx.uniform_after``), a row carries the whole group
and loads each K/V row once for its ``G`` queries. Tokens go in blocks of ``attend_block_n``: the
block's logits first, then one online-softmax rescale per block rather than per token; on llvm,
with the block as wide as a vector, a block's logits come out of one shuffle tree per head
(``reduce_plan``) rather than a horizontal sum per token, and the V rows and the next block's K
rows are prefetched (kept rows are scattered over pages). At SmolLM2's layout, fp16, 16 × 2048
tokens dense: 5.3 ms before, 2.1 ms after (with rows converted a vector at a time,
``_load_row``). With ``identity`` lists (a dense pipeline's fused step: what a loaded pipeline
falls back to) it walks the pages instead of the list, a block's page looked up once: 1.93 →
1.74 ms there. With one split the kernel writes the output directly; otherwise it writes
``(acc, max, sum)`` partials and ``combine`` merges them. With ``attention(mean_value=True)``
a last kernel, ``reallocate``, mixes in the mean value (SparQ), reading the selector's scores
from the same step.

cuda, ``cuda_attend_staging="smem"``: the block's threads first copy the queries of all its rows
into one ``__shared__`` tile together (consecutive threads read consecutive elements, so the load
is coalesced), then ``__syncthreads()``; each thread's dot products read its row from there
(padded by one 32-bit word a row, so the threads of a warp hit distinct banks) rather than from a
per-thread fp32 copy in local memory, and the softmax scale moves from the query to the logit.
The tile holds the query in its own dtype; the block shrinks (by halves) until it fits 48 KB.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

from .build import KernelSource
from .context import StageCtx, f32, fast_exp, softcap_text
from .dialect import NEG_INF, Src
from .estimate import _split
from .estimate_tile import lanes_sum
from .select import score_rows


def attend_rows(ctx: StageCtx) -> tuple[int, int]:
    """(rows per request before splitting, query heads per row)."""
    if ctx.uniform_after(len(ctx.p.prune)) and ctx.G > 1:
        return ctx.HKV, ctx.G
    return ctx.HQ, 1


def splits(ctx: StageCtx) -> int:
    """Splits of each attention row: ``split_kv`` when the schedule fixes it, else 0 — the
    plan's choice at run time (llvm; ``pipeline.splits_for``), given as a dim of ``pacc``."""
    n = int(ctx.sched.get("split_kv", 0))
    return max(1, n) if ctx.dialect.cuda else n


SHARED_BYTES = 48 * 1024  # static shared memory a block may declare without opting in


def staged(ctx: StageCtx) -> bool:
    """Does attention stage the block's queries in shared memory (cuda, ``"smem"``)?"""
    return ctx.dialect.cuda and ctx.sched.get("cuda_attend_staging", "none") == "smem"


def staged_threads(ctx: StageCtx) -> tuple[int, int]:
    """(threads a block, elements a row of the tile) for the shared query tile: ``cuda_threads``
    halved until ``threads × row`` fits ``SHARED_BYTES``."""
    _, gh = attend_rows(ctx)
    esz = ctx.esize
    row = gh * ctx.D + 16 // esz  # 16 B of padding: rows stay 16 B aligned (vector loads), and
    # a quarter-warp's 16 B loads of one column fall in distinct banks
    th = ctx.dialect.threads
    while th > 1 and th * row * esz > SHARED_BYTES:
        th //= 2
    return th, row


def _stage_q(ctx: StageCtx, th: int, row: int, nrows: str):
    """The block-wide prologue: copy the block's ``th`` query rows into ``qs``, then sync."""
    rows, gh = attend_rows(ctx)
    ns, w = splits(ctx), gh * ctx.D

    def prologue(s: Src) -> None:
        s.shared("qs", th * row, ctx.dtype)  # flat, so TVM cannot compact the padding away
        with s.block(f"for k in range({w}):"):
            s(f"e = k * {th} + r_i", f"qr = r_o * {th} + e // {w}")
            with s.block(f"if qr < {nrows}:"):
                s(f"qs[e // {w} * {row} + e % {w}] = q[qr // {rows * ns}, "
                  f"qr % {rows * ns} // {ns} * {gh} + e % {w} // {ctx.D}, e % {ctx.D}]")
        s('T.tvm_storage_sync("shared")')
    return prologue


def gen_attend(ctx: StageCtx) -> KernelSource:
    rows, gh = attend_rows(ctx)
    ns, bn, d = splits(ctx), int(ctx.sched.get("attend_block_n", 16)), ctx.D
    smem = staged(ctx)
    if smem:
        th, row = staged_threads(ctx)
        s = Src(dataclasses.replace(ctx.dialect, threads=th))
        prologue = _stage_q(ctx, th, row, f"B * {rows * ns}")
    else:
        s, prologue = Src(ctx.dialect), None
    params = [("q", ("B", ctx.HQ, d), ctx.dtype), ("pt", ("B", "NP"), "int32"),
              ("kidx", ("B", ctx.HQ, "K"), "int32"), ("kcnt", ("B", ctx.HQ), "int32"),
              ("kp", ("CAP", ctx.HKV, ctx.PS, d), ctx.dtype),
              ("vp", ("CAP", ctx.HKV, ctx.PS, d), ctx.dtype)]
    nst = str(ns) if ns else "NS"
    if ns == 1:
        params += [("out", ("B", ctx.HQ, d), ctx.dtype)]
    else:
        params += [("pacc", ("B", ctx.HQ, nst, d), "float32"),
                   ("pml", ("B", ctx.HQ, nst, 2), "float32")]
    _, vw = _split(d, ctx.vec)
    sym = ("B", "NP", "K", "CAP") + (("NS",) if not ns else ())
    with s.func("attend", params, sym):
        with s.rows("r", f"B * {rows} * {nst}", prologue):
            s(f"b = r // ({rows} * {nst})", f"hr = r % ({rows} * {nst}) // {nst}",
              f"sp = r % {nst}")
            s(f"h0 = hr * {gh}", f"hkv = h0 // {ctx.G}", "n = kcnt[b, h0]")
            # a split's share: a whole number of pages' worth of list positions (with
            # ``identity`` lists, whole pages)
            s(f"chunk = ((n + {nst} - 1) // {nst} + {ctx.PS - 1}) // {ctx.PS} * {ctx.PS}",
              "lo = T.min(sp * chunk, n)", "hi = T.min(lo + chunk, n)")
            if not smem:
                s.local("qv", (gh, d))
            s.local("acc", (gh, d))
            s.local("m", gh)
            s.local("l", gh)
            s.local("lg", (gh, bn))
            s.local("mb", 1)
            s.local("kr", d)
            s.local("dot", vw)
            with s.block(f"for g, c in T.grid({gh}, {d}):"):
                if not smem:
                    s(f'qv[g, c] = T.Cast("float32", q[b, h0 + g, c]) * '
                      f'{f32(ctx.softmax_scale())}')
                s("acc[g, c] = T.float32(0)")
            with s.block(f"for g in range({gh}):"):
                s(f"m[g] = {NEG_INF}", "l[g] = T.float32(0)")
            with s.block(f"for blk in range((hi - lo + {bn - 1}) // {bn}):"):
                _block(ctx, s, gh, bn, vw, smem)
            _finish(ctx, s, gh, ns)
    return s.source("attend", "attend")


def transposed(s: Src, bn: int, vw: int, smem: bool) -> bool:
    """Does a block's logits take ``_logits_transposed`` (llvm, a block as wide as a vector)?"""
    return not s.d.cuda and not smem and bn == vw and vw > 1 and vw & (vw - 1) == 0


def reduce_plan(n: int) -> list[tuple[int, list[int], list[int]]]:
    """The shuffles that sum ``n`` vectors of ``n`` lanes into one vector of their sums (lane
    ``j``: vector ``j``'s sum): ``log2 n`` levels; at segment ``s`` each new vector ``j < s`` is
    ``x + y`` of the concatenation of old vectors ``j`` and ``j + s``, ``x`` taking the first
    ``s`` lanes of each ``2s``-lane segment of both, ``y`` the last ``s``. ``n - 1`` adds and
    ``2 (n - 1)`` two-vector shuffles, where summing each vector alone costs ``n log2 n``."""
    out, seg = [], n // 2
    while seg >= 1:
        x, y = [], []
        for k in range(n // (2 * seg)):
            x += [2 * seg * k + i for i in range(seg)] + [n + 2 * seg * k + i for i in range(seg)]
            y += [2 * seg * k + seg + i for i in range(seg)] + [n + 2 * seg * k + seg + i
                                                                 for i in range(seg)]
        out.append((seg, x, y))
        seg //= 2
    return out


def _logits_transposed(ctx: StageCtx, s: Src, gh: int, bn: int, vw: int) -> None:
    """llvm, ``bn == vw``: each token's ``G`` dot products stay vectors (``dv[g, j]``, lanes
    partial over the head dim), then one shuffle tree per head turns the block's ``bn``
    vectors into its ``bn`` logits (``reduce_plan``) — no horizontal sum per token."""
    d = ctx.D
    s.local("dv", (gh, bn, vw))
    s.local("red", (bn, vw))
    with s.block(f"for j in range({bn}):"):
        with _kept_token(ctx, s, bn):
            _prefetch_rows(ctx, s, bn)
            _load_row(ctx, s, "kp")
            with s.block(f"for g in range({gh}):"):
                _dot_lanes(s, "dv[g, j, v]", f"qv[g, co * {vw} + v]", d, vw)
        with s.block("else:"):
            with s.block(f"for g, v in T.grid({gh}, {vw}):"):
                s("dv[g, j, v] = T.float32(0)")
    ramp = f"T.Ramp(0, 1, {vw})"
    with s.block(f"for g in range({gh}):"):
        src = "dv[g, {}, " + ramp + "]"
        for seg, x, y in reduce_plan(vw):
            for j in range(seg):
                a, b = src.format(j), src.format(j + seg)
                s(f"red[{j}, {ramp}] = T.Shuffle([{a}, {b}], {x}) + T.Shuffle([{a}, {b}], {y})")
            src = "red[{}, " + ramp + "]"
        with s.block(f"for j in T.vectorized({bn}):"):
            logit = softcap_text(ctx, "red[0, j]")
            s(f"lg[g, j] = T.Select(lo + blk * {bn} + j < hi, {logit}, {NEG_INF})")


def identity(ctx: StageCtx) -> bool:
    """Is the kept list every token in order, so that attention walks the pages instead of the
    list? In the fused module (which makes its own lists) of a pipeline with no selector and no
    pruner — a dense pipeline, what a loaded pipeline falls back to — on llvm. Not the stage
    path's ``attend``, which takes whatever lists it is given."""
    return ctx.dialect.private and not ctx.dialect.cuda and ctx.p.select is None \
        and not ctx.p.prune


def _in_page(ctx: StageCtx, bn: int) -> bool:
    """Does each block of ``bn`` tokens lie in one page (``identity`` lists, splits a whole
    number of pages, ``bn`` dividing the page)?"""
    return identity(ctx) and ctx.PS % bn == 0


def _block_start(ctx: StageCtx, s: Src, bn: int) -> None:
    """Before a block's token loops, with ``identity`` lists: its first token ``tb``; where the
    block lies in one page, that page (``physb``, from slot ``sb``) and the next block's
    (``physn`` from slot ``sn``), looked up once a block rather than once a token."""
    if not identity(ctx):
        return
    s(f"tb = lo + blk * {bn}")
    if _in_page(ctx, bn):
        s(f"physb = pt[b, tb // {ctx.PS}]", f"sb = tb % {ctx.PS}",
          f"tn = T.min(tb + {bn}, hi - 1)", f"physn = pt[b, tn // {ctx.PS}]",
          f"sn = tn % {ctx.PS} // {bn} * {bn}")


@contextmanager
def _kept_token(ctx: StageCtx, s: Src, bn: int):
    """Inside ``for j in range(bn)``: token ``j`` of the block, if the row's share holds it —
    its list position ``i``, token ``t``, page ``phys`` and slot — around the body."""
    s(f"i = lo + blk * {bn} + j")
    with s.block("if i < hi:"):
        if _in_page(ctx, bn):
            s("phys = physb", "slot = sb + j")
        else:
            s("t = i" if identity(ctx) else "t = kidx[b, h0, i]",
              f"phys = pt[b, t // {ctx.PS}]", f"slot = t % {ctx.PS}")
        yield


def _prefetch_rows(ctx: StageCtx, s: Src, bn: int) -> None:
    """Ask for what the block needs next while this token's K row is in flight: its V row (read
    after the block's softmax) and the K row a block ahead (kept rows are scattered over pages,
    and every block of a dense walk starts a new page: beyond the hardware prefetcher)."""
    row = ctx.D * ctx.esize
    s.prefetch_row("vp[phys, hkv, slot, {}]", row, ctx.esize)
    if _in_page(ctx, bn):
        s.prefetch_row("kp[physn, hkv, sn + j, {}]", row, ctx.esize)
        return
    nxt = f"T.min(i + {bn}, hi - 1)"  # the list position a block ahead
    s(f"tn = {nxt}" if identity(ctx) else f"tn = kidx[b, h0, {nxt}]")
    s.prefetch_row(f"kp[pt[b, tn // {ctx.PS}], hkv, tn % {ctx.PS}, {{}}]", row, ctx.esize)


def _load_row(ctx: StageCtx, s: Src, buf: str) -> None:
    """``kr[0:D]`` = a K or V row as float32, once for the row's ``G`` heads: on llvm a vector
    at a time (a whole row's fp16→fp32 conversion as one wide vector legalizes into lane
    shuffles on a CPU without native half arithmetic)."""
    row = f'{buf}[phys, hkv, slot, {{}}]'
    if s.d.cuda:
        with s.block(f"for c in {s.d.vec(ctx.D)}:"):
            s(f'kr[c] = T.Cast("float32", {row.format("c")})')
        return
    _, vw = _split(ctx.D, ctx.vec)
    with s.block(f"for co in range({ctx.D // vw}):"):
        with s.block(f"for v in T.vectorized({vw}):"):
            s(f'kr[co * {vw} + v] = T.Cast("float32", {row.format(f"co * {vw} + v")})')


def _dot_lanes(s: Src, dst: str, qread: str, d: int, vw: int) -> None:
    """``dst`` (text in lane ``v``) ← the head-dim dot product of the query ``qread`` (text in
    ``co``, ``v``) and the row ``kr``, left partial over ``vw`` lanes."""
    with s.block(f"for v in {s.d.vec(vw)}:"):
        s(f"{dst} = T.float32(0)")
    with s.block(f"for co in range({d // vw}):"):
        with s.block(f"for v in {s.d.vec(vw)}:"):
            s(f"{dst} = {dst} + {qread} * kr[co * {vw} + v]")


def _block(ctx: StageCtx, s: Src, gh: int, bn: int, vw: int, smem: bool = False) -> None:
    """One block of ``bn`` kept tokens: logits, then a rescale, then ``acc += p · V``."""
    _block_start(ctx, s, bn)
    if transposed(s, bn, vw, smem):
        _logits_transposed(ctx, s, gh, bn, vw)
    else:
        _logits(ctx, s, gh, bn, vw, smem)
    _rescale_and_values(ctx, s, gh, bn)


def _logits(ctx: StageCtx, s: Src, gh: int, bn: int, vw: int, smem: bool) -> None:
    """The block's logits ``lg[g, j]``, a dot product (and its sum over lanes) per token."""
    d = ctx.D
    if smem:  # the raw query from the shared tile; the scale goes on the logit
        row = staged_threads(ctx)[1]
        qread = f'T.Cast("float32", qs[r_i * {row} + g * {d} + co * {vw} + v])'
        scale = f" * {f32(ctx.softmax_scale())}"
    else:
        qread, scale = f"qv[g, co * {vw} + v]", ""
    with s.block(f"for j in range({bn}):"):
        with _kept_token(ctx, s, bn):
            _load_row(ctx, s, "kp")
            with s.block(f"for g in range({gh}):"):
                _dot_lanes(s, "dot[v]", qread, d, vw)
                if smem:
                    logit = f"({tree_sum(s, 'dot', vw)}){scale}"
                elif s.d.cuda or vw & (vw - 1):
                    logit = tree_sum(s, "dot", vw)
                else:  # in registers, halving by shuffles
                    logit = lanes_sum(f"dot[T.Ramp(0, 1, {vw})]", vw)
                s(f"lg[g, j] = {softcap_text(ctx, logit)}")
        with s.block("else:"):
            with s.block(f"for g in range({gh}):"):
                s(f"lg[g, j] = {NEG_INF}")


def _rescale_and_values(ctx: StageCtx, s: Src, gh: int, bn: int) -> None:
    """The online-softmax rescale by the block's logits, then ``acc += p · V``."""
    d = ctx.D
    with s.block(f"for g in range({gh}):"):
        if s.d.cuda or bn & (bn - 1):
            s("mb[0] = m[g]")
            with s.block(f"for j in range({bn}):"):
                s("mb[0] = T.max(mb[0], lg[g, j])")
            s("corr = T.exp(m[g] - mb[0])", "l[g] = l[g] * corr", "m[g] = mb[0]")
            with s.block(f"for c in {s.d.vec(d)}:"):
                s("acc[g, c] = acc[g, c] * corr")
            with s.block(f"for j in range({bn}):"):
                s("lg[g, j] = T.exp(lg[g, j] - mb[0])", "l[g] = l[g] + lg[g, j]")
        else:  # llvm: the block's exps as one vector (libm's exp is a call per element)
            s(f"mb[0] = T.max(m[g], {lanes_sum(f'lg[g, T.Ramp(0, 1, {bn})]', bn, 'max')})")
            s(f"corr = {fast_exp('(m[g] - mb[0])')}", "m[g] = mb[0]")
            with s.block(f"for c in {s.d.vec(d)}:"):
                s("acc[g, c] = acc[g, c] * corr")
            with s.block(f"for j in T.vectorized({bn}):"):
                s(f"lg[g, j] = {fast_exp('(lg[g, j] - mb[0])')}")
            s(f"l[g] = l[g] * corr + {lanes_sum(f'lg[g, T.Ramp(0, 1, {bn})]', bn)}")
    with s.block(f"for j in range({bn}):"):
        with _kept_token(ctx, s, bn):
            _load_row(ctx, s, "vp")
            with s.block(f"for g in range({gh}):"):
                with s.block(f"for c in {s.d.vec(d)}:"):
                    s("acc[g, c] = acc[g, c] + lg[g, j] * kr[c]")


def tree_sum(s: Src, buf: str, n: int) -> str:
    """Sum of ``buf[0:n]`` by vector halving (log2 steps of vector adds, not n scalar adds)."""
    while n > 1 and n % 2 == 0:
        n //= 2
        with s.block(f"for c in {s.d.vec(n)}:"):
            s(f"{buf}[c] = {buf}[c] + {buf}[c + {n}]")
    return " + ".join(f"{buf}[{i}]" for i in range(n))


def _finish(ctx: StageCtx, s: Src, gh: int, ns: int) -> None:
    d = ctx.D
    with s.block(f"for g in range({gh}):"):
        if ns == 1:
            s("inv = T.if_then_else(l[g] > T.float32(0), T.float32(1) / l[g], T.float32(0))")
            with s.block(f"for c in {s.d.vec(d)}:"):
                s(f'out[b, h0 + g, c] = T.Cast("{ctx.dtype}", acc[g, c] * inv)')
        else:
            with s.block(f"for c in {s.d.vec(d)}:"):
                s("pacc[b, h0 + g, sp, c] = acc[g, c]")
            s("pml[b, h0 + g, sp, 0] = m[g]", "pml[b, h0 + g, sp, 1] = l[g]")


def gen_combine(ctx: StageCtx) -> KernelSource:
    """Merge the splits' partials: ``out = Σ acc_s e^(m_s - M) / Σ l_s e^(m_s - M)``."""
    s = Src(ctx.dialect)
    ns, d = splits(ctx), ctx.D
    ns = str(ns) if ns else "NS"
    params = [("pacc", ("B", ctx.HQ, ns, d), "float32"), ("pml", ("B", ctx.HQ, ns, 2), "float32"),
              ("out", ("B", ctx.HQ, d), ctx.dtype)]
    with s.func("combine", params, ("B",) + (("NS",) if ns == "NS" else ())):
        with s.rows("r", f"B * {ctx.HQ}"):
            s(f"b = r // {ctx.HQ}", f"h = r % {ctx.HQ}")
            s.local("mm", 1)
            s.local("den", 1)
            s.local("o", d)
            s(f"mm[0] = {NEG_INF}", "den[0] = T.float32(0)")
            with s.block(f"for sp in range({ns}):"):
                with s.block("if pml[b, h, sp, 1] > T.float32(0):"):
                    s("mm[0] = T.max(mm[0], pml[b, h, sp, 0])")
            with s.block(f"for c in {s.d.vec(d)}:"):
                s("o[c] = T.float32(0)")
            with s.block(f"for sp in range({ns}):"):
                with s.block("if pml[b, h, sp, 1] > T.float32(0):"):
                    s("f = T.exp(pml[b, h, sp, 0] - mm[0])", "den[0] = den[0] + pml[b, h, sp, 1] * f")
                    with s.block(f"for c in {s.d.vec(d)}:"):
                        s("o[c] = o[c] + pacc[b, h, sp, c] * f")
            s("inv = T.if_then_else(den[0] > T.float32(0), T.float32(1) / den[0], T.float32(0))")
            with s.block(f"for c in {s.d.vec(d)}:"):
                s(f'out[b, h, c] = T.Cast("{ctx.dtype}", o[c] * inv)')
    return s.source("attend", "combine")


def gen_reallocate(ctx: StageCtx) -> KernelSource:
    """SparQ's mean-value reallocation (``attention(mean_value=True)``), after attention:
    ``out ← α·out + (1 - α)·v̄`` per query head, ``α`` the mass of its kept tokens under the
    softmax of the selector's (group-merged) scores over the context, ``v̄ = v_sum / L``."""
    s = Src(ctx.dialect)
    hs, _ = score_rows(ctx, 0)
    params = [("scores", ("B", hs, "N"), "float32"), ("lens", ("B",), "int32"),
              ("rid", ("B",), "int64"), ("kidx", ("B", ctx.HQ, "K"), "int32"),
              ("kcnt", ("B", ctx.HQ), "int32"), ("vsum", ("S", ctx.HKV, ctx.D), "float32"),
              ("out", ("B", ctx.HQ, ctx.D), ctx.dtype)]
    with s.func("reallocate", params, ("B", "N", "K", "S")):
        with s.rows("r", f"B * {ctx.HQ}"):
            s(f"b = r // {ctx.HQ}", f"h = r % {ctx.HQ}", f"hkv = h // {ctx.G}",
              "hs = h" if hs == ctx.HQ else "hs = hkv", "L = T.min(lens[b], N)")
            s.local("mx", 1)
            s.local("den", 1)
            s.local("al", 1)
            s(f"mx[0] = {NEG_INF}", "den[0] = T.float32(0)", "al[0] = T.float32(0)")
            with s.block("for t in range(L):"):
                s("mx[0] = T.max(mx[0], scores[b, hs, t])")
            with s.block(f"if mx[0] > {NEG_INF}:"):
                with s.block("for t in range(L):"):
                    s("den[0] = den[0] + T.exp(scores[b, hs, t] - mx[0])")
                with s.block("for i in range(kcnt[b, h]):"):
                    s("al[0] = al[0] + T.exp(scores[b, hs, kidx[b, h, i]] - mx[0])")
                s("al[0] = al[0] / den[0]")
            with s.block(f"for c in range({ctx.D}):"):
                s(f'out[b, h, c] = T.Cast("{ctx.dtype}", al[0] * T.Cast("float32", out[b, h, c])'
                  ' + (T.float32(1) - al[0]) * vsum[rid[b], hkv, c] / T.Cast("float32", '
                  "T.max(lens[b], 1)))")
    return s.source("attend", "reallocate")
