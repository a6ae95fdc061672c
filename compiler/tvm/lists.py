"""Candidate and kept lists on llvm: one row per GQA group when the group shares its list, whole
chosen pages written as vectors, and runs of undecided candidates skipped eight at a time.

The lists are what ``select.gen_candidates`` and ``top_p.gen_kept`` write (the cuda kernels):
ascending token positions, -1 past the count. A group shares one list when the selector (for
candidates) or the pruner (for kept lists) merges its heads' choices — every group mode but
``none`` — and the row then writes the list of each of the group's ``G`` heads at once.
"""

from __future__ import annotations

from .context import StageCtx, keep_text
from .dialect import Src

VW = 16


def _fill_tail(s: Src, heads: list[str], buf: str, start: str, end: str) -> None:
    """``buf[b, h, start:end] = -1`` for each head ``h`` in ``heads``, vectorized."""
    with s.block(f"for io in range(({end} - {start}) // {VW}):"):
        with s.block(f"for v in T.vectorized({VW}):"):
            for h in heads:
                s(f"{buf}[b, {h}, {start} + io * {VW} + v] = -1")
    with s.block(f"for i in range({start} + ({end} - {start}) // {VW} * {VW}, {end}):"):
        for h in heads:
            s(f"{buf}[b, {h}, i] = -1")


def _has_keep(ctx: StageCtx) -> bool:
    return bool(ctx.p.keep.sink or ctx.p.keep.window)


def write_candidates(ctx: StageCtx, s: Src, shared: bool, unit: int, chosen: str) -> None:
    """The candidates kernel's body: ``chosen`` is the text of "unit ``n`` is chosen" (for
    head ``h``, group ``hkv``); ``shared``: one list per group."""
    rows = ctx.HKV if shared else ctx.HQ
    heads = [f"hkv * {ctx.G} + {g}" for g in range(ctx.G)] if shared else ["h"]
    with s.rows("r", f"B * {rows}"):
        if shared:
            s(f"b = r // {rows}", f"hkv = r % {rows}", f"h = hkv * {ctx.G}")
        else:
            s(f"b = r // {rows}", f"h = r % {rows}", f"hkv = h // {ctx.G}")
        s.local("m", 1, "int32")
        s.local("ch", 1, "int32")
        s("m[0] = 0", "L = lens[b]")
        with s.block(f"for n in range((L + {unit - 1}) // {unit}):"):
            s(f"ch[0] = {chosen}")
            if unit >= 8:  # a whole chosen unit: its tokens, as one vector store
                whole = f"ch[0] == 1 and n * {unit} + {unit} <= L and m[0] + {unit} <= C"
                with s.block(f"if {whole}:"):
                    with s.block(f"for o in T.vectorized({unit}):"):
                        for hh in heads:
                            s(f"idx[b, {hh}, m[0] + o] = n * {unit} + o")
                    s(f"m[0] = m[0] + {unit}")
                ctx_block = s.block("else:")
            else:
                ctx_block = _nullblock()
            with ctx_block:
                with s.block(f"for o in range({unit}):"):
                    s(f"t = n * {unit} + o")
                    with s.block(f"if t < L and (ch[0] == 1 or {keep_text(ctx, 't', 'L')}):"):
                        with s.block("if m[0] < C:"):
                            for hh in heads:
                                s(f"idx[b, {hh}, m[0]] = t")
                        s("m[0] = m[0] + 1")
        for hh in heads:
            s(f"cnt[b, {hh}] = T.min(m[0], C)")
        _fill_tail(s, heads, "idx", "T.min(m[0], C)", "C")


def write_kept(ctx: StageCtx, s: Src, shared: bool, kept: str) -> None:
    """The kept-lists kernel's body: ``kept`` is the text of "candidate ``i`` is kept by the
    decisions" (head ``h``, group ``hkv``); blocks of 8 candidates whose decision bytes are all
    0 (read as 64-bit words, ``decw``: the flat decisions) and that hold no keep-rule token are
    skipped whole."""
    rows = ctx.HKV if shared else ctx.HQ
    heads = [f"hkv * {ctx.G} + {g}" for g in range(ctx.G)] if shared else ["h"]
    # a block is read as one word per head where its 8 bytes are word-aligned (every block
    # when the width C is a multiple of 8, as planned lists are; none, else, for a group)
    flat = [f"((b * {ctx.HQ} + {hh}) * C + i)" for hh in heads]
    last = f"B * {ctx.HQ} * C // 8 - 1"  # loads clamped in bounds: `and` does not short-circuit
    zero = " and ".join(f"{f} % 8 == 0 and decw[T.min({f} // 8, {last})] == T.uint64(0)"
                        for f in flat)
    if _has_keep(ctx):
        k = ctx.p.keep
        if k.sink:
            zero += f" and cidx[b, h, i] >= {k.sink}"
        if k.window:
            zero += f" and cidx[b, h, T.min(i + 7, C - 1)] < L - {k.window}"
    with s.rows("r", f"B * {rows}"):
        if shared:
            s(f"b = r // {rows}", f"hkv = r % {rows}", f"h = hkv * {ctx.G}")
        else:
            s(f"b = r // {rows}", f"h = r % {rows}", f"hkv = h // {ctx.G}")
        s("L = lens[b]", "n = ccnt[b, h]")
        s.local("m", 1, "int32")
        s.local("cur", 1, "int32")
        s("m[0] = 0", "cur[0] = 0")
        with s.block("while cur[0] < n:"):
            s("i = cur[0]")
            with s.block(f"if i + 8 <= n and {zero}:"):
                s("cur[0] = i + 8")
            with s.block("else:"):
                s("t = cidx[b, h, i]")
                with s.block(f"if {kept} or {keep_text(ctx, 't', 'L')}:"):
                    with s.block("if m[0] < K:"):
                        for hh in heads:
                            s(f"kidx[b, {hh}, m[0]] = t")
                    s("m[0] = m[0] + 1")
                s("cur[0] = i + 1")
        for hh in heads:
            s(f"kcnt[b, {hh}] = T.min(m[0], K)")
        _fill_tail(s, heads, "kidx", "T.min(m[0], K)", "K")


class _nullblock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
