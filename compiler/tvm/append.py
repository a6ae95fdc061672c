"""The append kernels: page summaries from the summary expressions, and quantized keys.

After an append, the pages it touched need their summaries (any ``@tw.page_summary``: each field
is a reduction over the page's valid tokens, lowered by ``expr.Lowering``) and their key codes
recomputed: per token (min/max over head_dim) or per page (min/max per channel over the valid
tokens, stored as the page's min/max in the cache dtype) or per group of pages (the same over
the group's pages, stored at its first page), packed as ``compiler.keycodes`` packs them. Smoothed
token codes divide the keys by the factors ``smooth [Hkv, D]`` first. Rows are (touched page,
token or group, KV head). Rounding is half-to-even (``T.nearbyint``) as ``torch.round``.
"""

from __future__ import annotations

import torch

from ..ir import Summary
from ..keycodes import KeyCodeSpec
from ..stages import PagedCache, check_page_ids
from .build import KernelSource, aligned
from .context import StageCtx
from .dialect import NEG_INF, POS_INF, Src, ceil_div
from .expr import Lowering, channel_tables, matrices


def _constant_params(ctx: StageCtx, exprs) -> tuple[list, list, list]:
    """(channel tables, matrices, their buffer params) of some summary expressions."""
    tables, mats = channel_tables(exprs), matrices(exprs)
    params = [(f"tbl{i}", (ctx.HKV, len(t[0]) if isinstance(t[0], tuple) else len(t)),
               "int32") for i, t in enumerate(tables)]
    params += [(f"mat{i}", (ctx.HKV, m.in_width, m.out_width), "float32")
               for i, m in enumerate(mats)]
    return tables, mats, params


def gen_summaries(ctx: StageCtx, summary: Summary) -> KernelSource:
    """``s_<field>[page] ← field(keys of page)`` for the listed physical pages."""
    s = Src(ctx.dialect)
    tables, mats, consts = _constant_params(ctx, [f.expr for f in summary.fields])
    widths = ctx.summary_widths(summary)
    params = [("kp", ("CAP", ctx.HKV, ctx.PS, ctx.D), ctx.dtype), ("fill", ("CAP",), "int64"),
              ("pages", ("P",), "int64"), *consts]
    params += [(f"s_{f.name}", ("CAP", ctx.HKV, widths[f"summary.{f.name}"]), ctx.dtype)
               for f in summary.fields]

    def leaf(e, c):
        if e.op == "head_dim":
            return f"T.float32({float(ctx.D)!r})"
        return f'T.Cast("float32", kp[pg, hkv, t, {c}])'
    with s.func(f"summary_{summary.name}", params, ("CAP", "P")):
        with s.rows("r", f"P * {ctx.HKV}"):
            s(f"pg = pages[r // {ctx.HKV}]", f"hkv = r % {ctx.HKV}",
              'nv = T.Cast("int32", fill[pg])')
            for f in summary.fields:
                with s.block(f"for c in range({widths[f'summary.{f.name}']}):"):
                    low = Lowering(s, leaf, {"page_k": ctx.D}, tables, ctx.vec,
                                   token=("t", ctx.PS, "nv"), mats=mats)
                    s(f'{f"s_{f.name}"}[pg, hkv, c] = T.Cast("{ctx.dtype}", {low.value(f.expr, "c")})')
    return s.source("append", f"summary_{summary.name}")


def gen_token_summaries(ctx: StageCtx, summary: Summary) -> KernelSource:
    """``ts_<field>[page, slot] ← field(key)`` for the listed (page, slot) tokens."""
    s = Src(ctx.dialect)
    tables, mats, consts = _constant_params(ctx, [f.expr for f in summary.fields])
    widths = ctx.summary_widths(summary)
    params = [("kp", ("CAP", ctx.HKV, ctx.PS, ctx.D), ctx.dtype), ("phys", ("N",), "int64"),
              ("slot", ("N",), "int64"), *consts]
    params += [(f"ts_{f.name}", ("CAP", ctx.HKV, ctx.PS, widths[f"summary.{f.name}"]),
                ctx.dtype) for f in summary.fields]

    def leaf(e, c):
        if e.op == "head_dim":
            return f"T.float32({float(ctx.D)!r})"
        return f'T.Cast("float32", kp[pg, hkv, sl, {c}])'
    name = f"token_summary_{summary.name}"
    with s.func(name, params, ("CAP", "N")):
        with s.rows("r", f"N * {ctx.HKV}"):
            s(f"pg = phys[r // {ctx.HKV}]", f"sl = slot[r // {ctx.HKV}]", f"hkv = r % {ctx.HKV}")
            for f in summary.fields:
                with s.block(f"for c in range({widths[f'summary.{f.name}']}):"):
                    low = Lowering(s, leaf, {"k": ctx.D}, tables, ctx.vec, mats=mats)
                    s(f'ts_{f.name}[pg, hkv, sl, c] = T.Cast("{ctx.dtype}", '
                      f'{low.value(f.expr, "c")})')
    return s.source("append", name)


def _encode(x: str, zero: str, scale: str, levels: int) -> str:
    safe = f"T.if_then_else({scale} > T.float32(0), {scale}, T.float32(1))"
    code = f"T.nearbyint(({x} - {zero}) / {safe})"
    return f'T.Cast("uint8", T.max(T.min({code}, T.float32({levels})), T.float32(0)))'


def token_codes_name(spec: KeyCodeSpec) -> str:
    return f"token_codes{spec.bits}" + ("_smooth" if spec.smooth else "")


def gen_token_codes(ctx: StageCtx, bits: int, smooth: bool = False) -> KernelSource:
    """Per-token codes of the listed (page, slot) tokens: min/max over head_dim (of the keys
    divided by the smoothing factors ``smooth [Hkv, D]``, for smoothed codes)."""
    s = Src(ctx.dialect)
    d, per, levels = ctx.D, 8 // bits, (1 << bits) - 1
    nb = ceil_div(d * bits, 8)
    name = token_codes_name(KeyCodeSpec(bits, smooth=smooth))
    params = [("kp", ("CAP", ctx.HKV, ctx.PS, d), ctx.dtype), ("phys", ("N",), "int64"),
              ("slot", ("N",), "int64"), ("codes", ("CAP", ctx.HKV, ctx.PS, nb), "uint8"),
              ("ksc", ("CAP", ctx.HKV, ctx.PS), "float32"),
              ("kzr", ("CAP", ctx.HKV, ctx.PS), "float32")]
    if smooth:
        params.append(("smooth", (ctx.HKV, d), "float32"))
    with s.func(name, params, ("CAP", "N")):
        with s.rows("r", f"N * {ctx.HKV}"):
            s(f"pg = phys[r // {ctx.HKV}]", f"sl = slot[r // {ctx.HKV}]", f"hkv = r % {ctx.HKV}")
            s.local("lo", 1)
            s.local("hi", 1)
            s(f"lo[0] = {POS_INF}", f"hi[0] = {NEG_INF}")
            x = 'T.Cast("float32", kp[pg, hkv, sl, {c}])'
            if smooth:  # as torch: k.float() / s, an IEEE division
                x = f"({x} / smooth[hkv, {{c}}])"
            with s.block(f"for c in range({d}):"):
                s(f"lo[0] = T.min(lo[0], {x.format(c='c')})",
                  f"hi[0] = T.max(hi[0], {x.format(c='c')})")
            s(f"sc = (hi[0] - lo[0]) / T.float32({levels})")
            s("ksc[pg, hkv, sl] = sc", "kzr[pg, hkv, sl] = lo[0]")
            _pack(s, per, bits, nb, d, "codes[pg, hkv, sl, j]",
                  lambda c: _encode(x.format(c=c), "lo[0]", "sc", levels))
    return s.source("append", name)


def _pack(s: Src, per: int, bits: int, nb: int, d: int, dst: str, code) -> None:
    with s.block(f"for j in range({nb}):"):
        terms = []
        for i in range(per):
            c = f"T.min(j * {per} + {i}, {d - 1})"
            val = f"T.if_then_else(j * {per} + {i} < {d}, {code(c)}, T.uint8(0))"
            terms.append(f"T.shift_left({val}, T.uint8({i * bits}))")
        s(f"{dst} = " + " + ".join(terms))


def _minmax_codes(ctx: StageCtx, s: Src, bits: int, pages: list[str]) -> None:
    """Per-channel min/max codes over the valid tokens of ``pages`` (TVMScript expressions of
    physical page ids, -1 = none): the min/max go to ``klo``/``khi`` at ``pages[0]`` in the cache
    dtype (0 when no token is valid), then every page's codes are encoded from those stored
    values (invalid slots get code 0), as ``compiler.keycodes.quantize_page`` /
    ``codes_from_minmax``."""
    d, per, levels = ctx.D, 8 // bits, (1 << bits) - 1
    nb = ceil_div(d * bits, 8)
    s.local("lo", d)
    s.local("hi", d)
    s.local("nv", 1, "int32")
    s("nv[0] = 0")
    with s.block(f"for c in range({d}):"):
        s(f"lo[c] = {POS_INF}", f"hi[c] = {NEG_INF}")
    for pg in pages:
        with s.block(f"if {pg} >= 0:"):
            s(f'm = T.Cast("int32", fill[{pg}])', "nv[0] = nv[0] + m")
            with s.block(f"for t in range({ctx.PS}):"):
                with s.block("if t < m:"):
                    with s.block(f"for c in range({d}):"):
                        x = f'T.Cast("float32", kp[{pg}, hkv, t, c])'
                        s(f"lo[c] = T.min(lo[c], {x})", f"hi[c] = T.max(hi[c], {x})")
    lead = pages[0]
    with s.block(f"for c in range({d}):"):
        with s.block("if nv[0] == 0:"):
            s("lo[c] = T.float32(0)", "hi[c] = T.float32(0)")
        # the codes are those of the values stored (exact: a min/max of cache-dtype values)
        s(f'lo[c] = T.Cast("float32", T.Cast("{ctx.dtype}", lo[c]))',
          f'hi[c] = T.Cast("float32", T.Cast("{ctx.dtype}", hi[c]))')
        with s.block(f"if {lead} >= 0:"):
            s(f'klo[{lead}, hkv, c] = T.Cast("{ctx.dtype}", lo[c])',
              f'khi[{lead}, hkv, c] = T.Cast("{ctx.dtype}", hi[c])')
        s(f"hi[c] = (hi[c] - lo[c]) / T.float32({levels})")  # now the scale
    for pg in pages:
        with s.block(f"if {pg} >= 0:"):
            s(f'm = T.Cast("int32", fill[{pg}])')
            with s.block(f"for t in range({ctx.PS}):"):
                x = f'T.Cast("float32", kp[{pg}, hkv, t, {{c}}])'

                def code(c, x=x):
                    enc = _encode(x.format(c=c), f"lo[{c}]", f"hi[{c}]", levels)
                    return f"T.if_then_else(t < m, {enc}, T.uint8(0))"
                _pack(s, per, bits, nb, d, f"codes[{pg}, hkv, t, j]", code)


def _minmax_params(ctx: StageCtx, bits: int) -> list[tuple[str, tuple, str]]:
    nb = ceil_div(ctx.D * bits, 8)
    return [("codes", ("CAP", ctx.HKV, ctx.PS, nb), "uint8"),
            ("klo", ("CAP", ctx.HKV, ctx.D), ctx.dtype), ("khi", ("CAP", ctx.HKV, ctx.D), ctx.dtype)]


def gen_page_codes(ctx: StageCtx, bits: int) -> KernelSource:
    """Page-granularity codes of the listed pages: per-channel min/max over each page's valid
    tokens, stored in ``klo``/``khi`` (the page's min/max summary), and the codes from them."""
    s = Src(ctx.dialect)
    params = [("kp", ("CAP", ctx.HKV, ctx.PS, ctx.D), ctx.dtype), ("fill", ("CAP",), "int64"),
              ("pages", ("P",), "int64")] + _minmax_params(ctx, bits)
    with s.func(f"page_codes{bits}", params, ("CAP", "P")):
        with s.rows("r", f"P * {ctx.HKV}"):
            s(f"pg = pages[r // {ctx.HKV}]", f"hkv = r % {ctx.HKV}")
            _minmax_codes(ctx, s, bits, ["pg"])
    return s.source("append", f"page_codes{bits}")


def group_codes_name(spec: KeyCodeSpec) -> str:
    return f"group_codes{spec.bits}_g{spec.group_pages}"


def gen_group_codes(ctx: StageCtx, bits: int, group_pages: int) -> KernelSource:
    """Group-granularity codes of the listed groups ``gp int64 [N, G]`` (physical pages, -1 = not
    allocated, as ``PagedKVCache.group_pages`` gives them): per-channel min/max over the valid
    tokens of the group's pages, stored at its first page, and the codes of every page."""
    s = Src(ctx.dialect)
    g = group_pages
    name = group_codes_name(KeyCodeSpec(bits, "group", g))
    params = [("kp", ("CAP", ctx.HKV, ctx.PS, ctx.D), ctx.dtype), ("fill", ("CAP",), "int64"),
              ("gp", ("N", g), "int64")] + _minmax_params(ctx, bits)
    with s.func(name, params, ("CAP", "N")):
        with s.rows("r", f"N * {ctx.HKV}"):
            s(f"grp = r // {ctx.HKV}", f"hkv = r % {ctx.HKV}")
            _minmax_codes(ctx, s, bits, [f"gp[grp, {i}]" for i in range(g)])
    return s.source("append", name)


def append_sources(ctx: StageCtx):
    """The key-code kernels a pipeline's estimators need (one per distinct format)."""
    for spec in KeyCodeSpec.of_pipeline(ctx.p):
        if spec.granularity == "token":
            yield gen_token_codes(ctx, spec.bits, spec.smooth)
        elif spec.granularity == "page":
            yield gen_page_codes(ctx, spec.bits)
        else:
            yield gen_group_codes(ctx, spec.bits, spec.group_pages)


class AppendMixin:
    """The append kernels on a cache: recompute what ``PagedKVCache.append`` keeps beside K/V."""

    def refresh_pages(self, cache: PagedCache, pages: torch.Tensor) -> None:
        """Summaries and page-granularity codes (with their min/max) of physical ``pages``
        (int64), in place."""
        check_page_ids(cache, "refresh_pages", pages)
        pages = aligned(pages.to(torch.int64))
        for summ in self.p.summaries():
            outs = [cache.summaries[f"{summ.name}.{f.name}"] for f in summ.fields]
            self.kernels[f"summary_{summ.name}"](cache.k_pages, cache.page_fill, pages,
                                                 *self.summary_tables[summ.name], *outs)
        for spec in KeyCodeSpec.of_pipeline(self.p, "page"):
            self.kernels[f"page_codes{spec.bits}"](cache.k_pages, cache.page_fill, pages,
                                                   *cache.key_codes[spec].tensors())

    def refresh_tokens(self, cache: PagedCache, phys: torch.Tensor, slot: torch.Tensor) -> None:
        """Token summaries and token-granularity codes (smoothed or not) of the tokens at
        (``phys``, ``slot``) (int64), in place."""
        check_page_ids(cache, "refresh_tokens", phys, slots=slot)
        phys, slot = aligned(phys.to(torch.int64)), aligned(slot.to(torch.int64))
        for summ in self.p.token_summaries():
            outs = [cache.token_summaries[f"{summ.name}.{f.name}"] for f in summ.fields]
            self.kernels[f"token_summary_{summ.name}"](cache.k_pages, phys, slot,
                                                       *self.summary_tables[summ.name], *outs)
        for spec in KeyCodeSpec.of_pipeline(self.p, "token"):
            self.kernels[token_codes_name(spec)](cache.k_pages, phys, slot,
                                                 *cache.key_codes[spec].tensors())

    def refresh_groups(self, cache: PagedCache, gp: torch.Tensor) -> None:
        """Group-granularity codes of the groups ``gp int64 [N, G]`` (``cache.group_pages(...,
        G)``: physical pages, -1 = not allocated), in place, for every group format of ``G``
        pages: min/max at each group's first page, codes of each of its pages."""
        specs = KeyCodeSpec.of_pipeline(self.p, "group")
        if gp.dim() != 2 or gp.shape[1] not in {sp.group_pages for sp in specs}:
            raise ValueError(f"refresh_groups: gp {tuple(gp.shape)} must be [N, G] with G one "
                             "of the pipeline's group sizes "
                             f"{sorted({sp.group_pages for sp in specs})}")
        if gp.shape[0] == 0:
            return
        check_page_ids(cache, "refresh_groups", gp, missing_ok=True)
        gp = aligned(gp.to(torch.int64))
        for spec in specs:
            if spec.group_pages == gp.shape[1]:
                self.kernels[group_codes_name(spec)](cache.k_pages, cache.page_fill, gp,
                                                     *cache.key_codes[spec].tensors())
