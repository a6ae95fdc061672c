"""Select: the score kernel (the traced score expression); decisions and candidate lists are
``rank.py``'s.

``select_score`` (``select_score1``, ... for the further parts of a combined selector) runs one
program per (request, decision row, block of pages/tokens). It evaluates the user's score
expression over the query and the page summaries (per page), the keys — or the codes of the
selector's ``estimate=`` format — or a token summary (per token), read through the page table,
and merges the GQA group in registers (``mean``/``max``; ``kv`` scores the group's mean
query). Invalid units and NaN scores score ``-inf``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import ir
from ..source import SourceWriter
from .expr import Chan, ChannelTables, Emitter, as_rows, expr_width, next_pow2
from .kernels import DTYPE_NAMES, PTR, KernelSpec, make_kernel

SCORE_MODES = {"none": 0, "union": 0, "mean": 1, "max": 2, "kv": 3}


@dataclass(frozen=True)
class Ctx:
    """What every stage generator reads."""

    p: ir.PipelineIR
    shape: ir.Shape
    schedule: dict
    tables: ChannelTables

    @property
    def dtype_ptr(self) -> str:
        return PTR[DTYPE_NAMES[self.shape.dtype]]


def select_rows(s: ir.Select, shape: ir.Shape) -> int:
    """Decision rows per request: one per query head, or one per KV head for merged groups."""
    return shape.kv_heads if s.group in ("mean", "max", "kv") else shape.q_heads


def suffix(part: int) -> str:
    """Kernel names of scored selector ``part``: ``select_score``, then ``select_score1``..."""
    return str(part) if part else ""


def _q_leaf(mode: int, g: int):
    if mode == 3:  # the group's mean query
        return lambda c: (f"tl.sum(tl.load(q_ptr + (b * HQ + hkv * G + g_ar[:, None]) * D + "
                          f"{c.idx}[None, :], mask=(g_ar < G)[:, None] & {c.mask}[None, :], "
                          f"other=0.0).to(tl.float32), axis=0)[None, :] / {float(g)}")
    return lambda c: (f"tl.load(q_ptr + (b * HQ + qh) * D + {c.idx}[None, :], "
                      f"mask={c.mask}[None, :], other=0.0).to(tl.float32)")


def _key_leaf(e: ir.Estimator | None):
    """The tile of keys at a channel context: the keys, or the estimator's dequantized codes
    (``keycodes``'s arithmetic: ``code·scale + zero``, ``code·((hi - lo)/levels) + lo``)."""
    def leaf(ch: Chan) -> str:
        mask = f"umask[:, None] & {ch.mask}[None, :]"
        if e is None:
            return f"tl.load(k_ptr + kbase[:, None] + {ch.idx}[None, :], mask={mask}, other=0.0)" \
                ".to(tl.float32)"
        per, levels = 8 // e.bits, (1 << e.bits) - 1
        byte = (f"tl.load(packed_ptr + tok[:, None] * NBYTES + ({ch.idx} // {per})[None, :], "
                f"mask={mask}, other=0).to(tl.int32)")
        code = (f"((({byte}) >> (({ch.idx} % {per}) * {e.bits})[None, :]) & {levels})"
                ".to(tl.float32)")
        if e.granularity == "token":
            val = (f"({code} * tl.load(scale_ptr + tok, mask=umask, other=0.0)[:, None] + "
                   "tl.load(zero_ptr + tok, mask=umask, other=0.0)[:, None])")
            if e.smooth:
                val = (f"({val} * tl.load(smooth_ptr + hkv * D + {ch.idx}, mask={ch.mask}, "
                       "other=1.0)[None, :])")
            return val
        side = "pg" if e.granularity == "page" else "lead"
        lo, hi = (f"tl.load({n}_ptr + ({side} * HKV + hkv)[:, None] * D + {ch.idx}[None, :], "
                  f"mask={mask}, other=0.0).to(tl.float32)" for n in ("lo", "hi"))
        return f"({code} * tl.math.div_rn({hi} - {lo}, {float(levels)!r} + 0.0 * {lo}) + {lo})"
    return leaf


def key_kind(e: ir.Estimator) -> str:
    """``exact``, ``token``, ``page`` or ``group``: which keys an estimate reads."""
    return "exact" if e.kind == "exact" else e.granularity


def key_args(c: Ctx, e: ir.Estimator) -> list[tuple[str, str]]:
    """The key arguments of a kernel reading estimator ``e``'s keys, in ``KeyCodes.tensors()``
    order (the estimate kernels', and a selector's with ``estimate=``)."""
    kind = key_kind(e)
    if kind == "exact":
        return [("k_ptr", c.dtype_ptr)]
    if kind == "token":
        smooth = [("smooth_ptr", "*fp32")] if e.smooth else []
        return [("packed_ptr", "*u8"), ("scale_ptr", "*fp32"), ("zero_ptr", "*fp32"), *smooth]
    return [("packed_ptr", "*u8"), ("lo_ptr", c.dtype_ptr), ("hi_ptr", c.dtype_ptr)]


def key_inputs(c: Ctx, sel: ir.Select) -> list[tuple[str, str]]:
    """What a per-token score over the key reads: the keys, or the estimator's code tensors."""
    return [("k_ptr", c.dtype_ptr)] if sel.estimator is None else key_args(c, sel.estimator)


def _summary_leaf(i: int, cf: int, page: bool):
    def leaf(ch: Chan) -> str:
        at = "pg[:, None] * (HKV * {cf}) + hkv * {cf}" if page else "tok[:, None] * {cf}"
        return (f"tl.load(sum{i}_ptr + {at.format(cf=cf)} + {ch.idx}[None, :], "
                f"mask=umask[:, None] & {ch.mask}[None, :] & ({ch.idx} < {cf})[None, :], "
                "other=0.0).to(tl.float32)")
    return leaf


def _score_leaves(c: Ctx, s: ir.Select, mode: int) -> tuple[dict, list, dict]:
    """(leaf loaders, kernel arguments, summary field widths) of selector ``s``'s score."""
    sh, sc = c.shape, s.score
    per_page = sc.per == "page"
    unit = "(offs_u * PS)" if per_page else "offs_u"
    leaves = {"q": _q_leaf(mode, sh.group_size),
              "position": lambda ch: f"{unit}.to(tl.float32)",
              "query_position": lambda ch: "tl.zeros([1], tl.float32) + (L - 1).to(tl.float32)"}
    args = [("q_ptr", c.dtype_ptr), ("pt_ptr", "*i32"), ("len_ptr", "*i32")]
    widths = {}
    if sc.summary is not None:
        for i, f in enumerate(sc.summary.fields):
            cf = expr_width(f.expr, sh.head_dim)
            widths[f"summary.{f.name}"] = cf
            args.append((f"sum{i}_ptr", c.dtype_ptr))
            leaves[f"summary.{f.name}"] = _summary_leaf(i, cf, per_page)
    else:
        args += key_inputs(c, s)
        leaves["k"] = _key_leaf(s.estimator)
    args += [("chan_ptr", "*i32"), ("mat_ptr", "*fp32"), ("out_ptr", "*fp32"), ("NP", "i32"),
             ("NUMAX", "i32")]
    return leaves, args, widths


def gen_score(c: Ctx, part: int = 0) -> KernelSpec:
    s, sh = c.p.selectors()[part], c.shape
    sc = s.score
    per_page = sc.per == "page"
    mode = SCORE_MODES[s.group]
    full = Chan("offs_d", "dmask", sh.head_dim)
    leaves, args, widths = _score_leaves(c, s, mode)
    em = Emitter(leaves, full, c.tables, prefix="e", widths=widths)
    val = em.emit(sc.expr)
    score = [*em.lines, f"sc = {as_rows(val, 'BN')}", "sc = tl.where(sc != sc, float('-inf'), sc)"]
    w = SourceWriter()
    w("pid = tl.program_id(0)", "blk = tl.program_id(1)",
      "b = pid // ROWS", "row = pid % ROWS",
      "hkv = row // G" if select_rows(s, sh) == sh.q_heads else "hkv = row",
      "L = tl.load(len_ptr + b)",
      "NU = (L + PS - 1) // PS" if per_page else "NU = L",
      "offs_u = blk * BN + tl.arange(0, BN)", "umask = offs_u < NU",
      "offs_d = tl.arange(0, BD)", "dmask = offs_d < D", "g_ar = tl.arange(0, GP)")
    if per_page:
        w("pg = tl.load(pt_ptr + b * NP + offs_u, mask=umask, other=0).to(tl.int64)")
    else:
        w("pg = tl.load(pt_ptr + b * NP + offs_u // PS, mask=umask, other=0).to(tl.int64)",
          "tok = (pg * HKV + hkv) * PS + offs_u % PS", "kbase = tok * D")
        if s.estimator is not None and s.estimator.granularity == "group":
            w("lead = tl.load(pt_ptr + b * NP + (offs_u // PS) // GRP * GRP, mask=umask, "
              "other=0).to(tl.int64)")
    if mode in (1, 2):  # merge the group's scores: mean (1) or max (2)
        w("acc = tl.zeros([BN], tl.float32)" if mode == 1 else
          "acc = tl.full([BN], float('-inf'), tl.float32)")
        with w.block("for gi in tl.static_range(G):"):
            w("qh = hkv * G + gi", *score, "acc = acc + sc" if mode == 1 else
              "acc = tl.maximum(acc, sc)")
        w("sc = acc / G" if mode == 1 else "sc = acc")
    else:
        w("qh = row", *score)
    w("sc = tl.where(umask, sc, float('-inf'))",
      "tl.store(out_ptr + (b * ROWS + row).to(tl.int64) * NUMAX + offs_u, sc, mask=umask)")
    consts = dict(HQ=sh.q_heads, HKV=sh.kv_heads, G=sh.group_size, GP=next_pow2(sh.group_size),
                  D=sh.head_dim, BD=next_pow2(sh.head_dim), PS=sh.page_size,
                  ROWS=select_rows(s, sh), BN=c.schedule["select_block_n"])
    if s.estimator is not None:
        consts |= dict(NBYTES=-(-sh.head_dim * s.estimator.bits // 8))
        if s.estimator.granularity == "group":
            consts["GRP"] = s.estimator.group_pages
    return make_kernel("select", "select_score" + suffix(part), args, consts, w,
                       c.schedule["select_warps"], 1)
