"""The append kernels: page summaries from the summary expressions, and quantized keys.

After an append, the pages it touched need their summaries (any ``@tw.page_summary``: each field
is a reduction over the page's valid tokens, lowered by ``expr.Lowering``) and their key codes
recomputed: per token (min/max over head_dim) or per page (min/max per channel over the valid
tokens), packed as ``runtime.quant`` packs them. Rows are (touched page or token, KV head).
Rounding is half-to-even (``T.nearbyint``) as ``torch.round``.
"""

from __future__ import annotations

import torch

from ...runtime.paged_cache import PagedKVCache
from ...runtime.quant import KeyCodeSpec
from ..ir import Summary
from .build import KernelSource, aligned
from .context import StageCtx
from .dialect import NEG_INF, POS_INF, Src, ceil_div
from .expr import Lowering, channel_tables


def gen_summaries(ctx: StageCtx, summary: Summary) -> KernelSource:
    """``s_<field>[page] ← field(keys of page)`` for the listed physical pages."""
    s = Src(ctx.dialect)
    exprs = [f.expr for f in summary.fields]
    tables = channel_tables(exprs)
    widths = ctx.summary_widths()
    params = [("kp", ("CAP", ctx.HKV, ctx.PS, ctx.D), ctx.dtype), ("fill", ("CAP",), "int64"),
              ("pages", ("P",), "int64")]
    params += [(f"tbl{i}", (ctx.HKV, len(t[0]) if isinstance(t[0], tuple) else len(t)),
                "int32") for i, t in enumerate(tables)]
    params += [(f"s_{f.name}", ("CAP", ctx.HKV, widths[f"summary.{f.name}"]), ctx.dtype)
               for f in summary.fields]

    def leaf(e, c):
        return f'T.Cast("float32", kp[pg, hkv, t, {c}])'
    with s.func(f"summary_{summary.name}", params, ("CAP", "P")):
        with s.rows("r", f"P * {ctx.HKV}"):
            s(f"pg = pages[r // {ctx.HKV}]", f"hkv = r % {ctx.HKV}",
              'nv = T.Cast("int32", fill[pg])')
            for f in summary.fields:
                with s.block(f"for c in range({widths[f'summary.{f.name}']}):"):
                    low = Lowering(s, leaf, {"page_k": ctx.D}, tables, ctx.vec,
                                   token=("t", ctx.PS, "nv"))
                    s(f'{f"s_{f.name}"}[pg, hkv, c] = T.Cast("{ctx.dtype}", {low.value(f.expr, "c")})')
    return KernelSource("append", f"summary_{summary.name}", s.text())


def _encode(x: str, zero: str, scale: str, levels: int) -> str:
    safe = f"T.if_then_else({scale} > T.float32(0), {scale}, T.float32(1))"
    code = f"T.nearbyint(({x} - {zero}) / {safe})"
    return f'T.Cast("uint8", T.max(T.min({code}, T.float32({levels})), T.float32(0)))'


def gen_token_codes(ctx: StageCtx, bits: int) -> KernelSource:
    """Per-token codes of the listed (page, slot) tokens: min/max over head_dim."""
    s = Src(ctx.dialect)
    d, per, levels = ctx.D, 8 // bits, (1 << bits) - 1
    nb = ceil_div(d * bits, 8)
    params = [("kp", ("CAP", ctx.HKV, ctx.PS, d), ctx.dtype), ("phys", ("N",), "int64"),
              ("slot", ("N",), "int64"), ("codes", ("CAP", ctx.HKV, ctx.PS, nb), "uint8"),
              ("ksc", ("CAP", ctx.HKV, ctx.PS), "float32"),
              ("kzr", ("CAP", ctx.HKV, ctx.PS), "float32")]
    with s.func(f"token_codes{bits}", params, ("CAP", "N")):
        with s.rows("r", f"N * {ctx.HKV}"):
            s(f"pg = phys[r // {ctx.HKV}]", f"sl = slot[r // {ctx.HKV}]", f"hkv = r % {ctx.HKV}")
            s.local("lo", 1)
            s.local("hi", 1)
            s(f"lo[0] = {POS_INF}", f"hi[0] = {NEG_INF}")
            x = 'T.Cast("float32", kp[pg, hkv, sl, {c}])'
            with s.block(f"for c in range({d}):"):
                s(f"lo[0] = T.min(lo[0], {x.format(c='c')})",
                  f"hi[0] = T.max(hi[0], {x.format(c='c')})")
            s(f"sc = (hi[0] - lo[0]) / T.float32({levels})")
            s("ksc[pg, hkv, sl] = sc", "kzr[pg, hkv, sl] = lo[0]")
            _pack(s, per, bits, nb, d, "codes[pg, hkv, sl, j]",
                  lambda c: _encode(x.format(c=c), "lo[0]", "sc", levels))
    return KernelSource("append", f"token_codes{bits}", s.text())


def _pack(s: Src, per: int, bits: int, nb: int, d: int, dst: str, code) -> None:
    with s.block(f"for j in range({nb}):"):
        terms = []
        for i in range(per):
            c = f"T.min(j * {per} + {i}, {d - 1})"
            val = f"T.if_then_else(j * {per} + {i} < {d}, {code(c)}, T.uint8(0))"
            terms.append(f"T.shift_left({val}, T.uint8({i * bits}))")
        s(f"{dst} = " + " + ".join(terms))


def gen_page_codes(ctx: StageCtx, bits: int) -> KernelSource:
    """Per-page codes of the listed pages: per-channel min/max over the page's valid tokens."""
    s = Src(ctx.dialect)
    d, per, levels = ctx.D, 8 // bits, (1 << bits) - 1
    nb = ceil_div(d * bits, 8)
    params = [("kp", ("CAP", ctx.HKV, ctx.PS, d), ctx.dtype), ("fill", ("CAP",), "int64"),
              ("pages", ("P",), "int64"), ("codes", ("CAP", ctx.HKV, ctx.PS, nb), "uint8"),
              ("ksc", ("CAP", ctx.HKV, d), "float32"), ("kzr", ("CAP", ctx.HKV, d), "float32")]
    with s.func(f"page_codes{bits}", params, ("CAP", "P")):
        with s.rows("r", f"P * {ctx.HKV}"):
            s(f"pg = pages[r // {ctx.HKV}]", f"hkv = r % {ctx.HKV}",
              'nv = T.Cast("int32", fill[pg])')
            s.local("lo", d)
            s.local("hi", d)
            with s.block(f"for c in range({d}):"):
                s(f"lo[c] = {POS_INF}", f"hi[c] = {NEG_INF}")
                with s.block(f"for t in range({ctx.PS}):"):
                    with s.block("if t < nv:"):
                        s('lo[c] = T.min(lo[c], T.Cast("float32", kp[pg, hkv, t, c]))',
                          'hi[c] = T.max(hi[c], T.Cast("float32", kp[pg, hkv, t, c]))')
                with s.block("if nv == 0:"):
                    s("lo[c] = T.float32(0)", "hi[c] = T.float32(0)")
                s("kzr[pg, hkv, c] = lo[c]",
                  f"ksc[pg, hkv, c] = (hi[c] - lo[c]) / T.float32({levels})")
            with s.block(f"for t in range({ctx.PS}):"):
                x = 'T.Cast("float32", kp[pg, hkv, t, {c}])'
                code = lambda c: (f"T.if_then_else(t < nv, {_encode(x.format(c=c), f'lo[{c}]', f'ksc[pg, hkv, {c}]', levels)}, T.uint8(0))")  # noqa: E501, E731
                _pack(s, per, bits, nb, d, "codes[pg, hkv, t, j]", code)
    return KernelSource("append", f"page_codes{bits}", s.text())


class AppendMixin:
    """The append kernels on a cache: recompute what ``PagedKVCache.append`` keeps beside K/V."""

    def refresh_pages(self, cache: PagedKVCache, pages: torch.Tensor) -> None:
        """Summaries and page-granularity codes of physical ``pages`` (int64), in place."""
        pages = aligned(pages.to(torch.int64))
        for summ in self.p.summaries():
            outs = [cache.summaries[f"{summ.name}.{f.name}"] for f in summ.fields]
            self.kernels[f"summary_{summ.name}"](cache.k_pages, cache.page_fill, pages,
                                                 *self.summary_tables, *outs)
        for e in self.p.estimators():
            if e.kind == "quantized" and e.granularity == "page":
                codes = cache.key_codes[KeyCodeSpec(e.bits, "page")]
                self.kernels[f"page_codes{e.bits}"](cache.k_pages, cache.page_fill, pages,
                                                    *codes.tensors())

    def refresh_tokens(self, cache: PagedKVCache, phys: torch.Tensor, slot: torch.Tensor) -> None:
        """Token-granularity codes of the tokens at (``phys``, ``slot``) (int64), in place."""
        phys, slot = aligned(phys.to(torch.int64)), aligned(slot.to(torch.int64))
        for e in self.p.estimators():
            if e.kind == "quantized" and e.granularity == "token":
                codes = cache.key_codes[KeyCodeSpec(e.bits, "token")]
                self.kernels[f"token_codes{e.bits}"](cache.k_pages, phys, slot, *codes.tensors())
