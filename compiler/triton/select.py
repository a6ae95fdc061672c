"""Select: score kernel (the traced score expression), budget decision, candidate lists.

Three kernels per selector, all generated from the IR:

* ``select_score`` — one program per (request, decision row, block of pages/tokens). It
  evaluates the user's score expression over the query and the page summaries (per page) or
  the keys (per token), read through the page table, and merges the GQA group in registers
  (``mean``/``max``; ``kv`` scores the group's mean query). Invalid units score ``-inf``.
* ``select_decide`` — one program per decision row: top-k by a radix search over
  order-preserving integer keys of the scores (counts per digit, ``select_radix_bits`` per
  pass), ties lowest index first; or the threshold rule. Writes one flag per unit.
* ``select_compact`` — one program per query head: expands unit flags to tokens (pages ×
  page_size, valid tokens only), ORs a ``union`` group and the sink/window keep rules, and
  writes the ascending, -1 padded ``cand_idx`` with ``cand_cnt``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import ir
from ..source import SourceWriter
from .expr import Chan, ChannelTables, Emitter, as_rows, expr_width, next_pow2
from .kernels import DTYPE_NAMES, PTR, KernelSpec, make_kernel
from .prelude import radix_passes

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


def _q_leaf(mode: int, g: int):
    if mode == 3:  # the group's mean query
        return lambda c: (f"tl.sum(tl.load(q_ptr + (b * HQ + hkv * G + g_ar[:, None]) * D + "
                          f"{c.idx}[None, :], mask=(g_ar < G)[:, None] & {c.mask}[None, :], "
                          f"other=0.0).to(tl.float32), axis=0)[None, :] / {float(g)}")
    return lambda c: (f"tl.load(q_ptr + (b * HQ + qh) * D + {c.idx}[None, :], "
                      f"mask={c.mask}[None, :], other=0.0).to(tl.float32)")


def gen_score(c: Ctx) -> KernelSpec:
    s, sh = c.p.select, c.shape
    per_page = s.score.per == "page"
    mode = SCORE_MODES[s.group]
    full = Chan("offs_d", "dmask", sh.head_dim)
    leaves = {"q": _q_leaf(mode, sh.group_size)}
    args = [("q_ptr", c.dtype_ptr), ("pt_ptr", "*i32"), ("len_ptr", "*i32")]
    if per_page:
        for i, f in enumerate(s.score.summary.fields):
            cf = expr_width(f.expr, sh.head_dim)
            args.append((f"sum{i}_ptr", c.dtype_ptr))
            leaves[f"summary.{f.name}"] = (
                lambda ch, i=i, cf=cf: f"tl.load(sum{i}_ptr + pg[:, None] * (HKV * {cf}) + "
                f"hkv * {cf} + {ch.idx}[None, :], mask=umask[:, None] & {ch.mask}[None, :] & "
                f"({ch.idx} < {cf})[None, :], other=0.0).to(tl.float32)")
    else:
        args.append(("k_ptr", c.dtype_ptr))
        leaves["k"] = lambda ch: (f"tl.load(k_ptr + kbase[:, None] + {ch.idx}[None, :], "
                                  f"mask=umask[:, None] & {ch.mask}[None, :], other=0.0)"
                                  ".to(tl.float32)")
    args += [("chan_ptr", "*i32"), ("out_ptr", "*fp32"), ("NP", "i32"), ("NUMAX", "i32")]
    em = Emitter(leaves, full, c.tables, prefix="e")
    val = em.emit(s.score.expr)
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
          "kbase = ((pg * HKV + hkv) * PS + offs_u % PS) * D")
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
    return make_kernel("select", "select_score", args, consts, w,
                       c.schedule["select_warps"], 1)


def gen_decide(c: Ctx) -> KernelSpec:
    s = c.p.select
    npass, pad = radix_passes(c.schedule["select_radix_bits"])
    args = [("score_ptr", "*fp32"), ("len_ptr", "*i32"), ("kunits_ptr", "*i32"),
            ("hist_ptr", "*fp64"), ("flag_ptr", "*i8"), ("NUMAX", "i32"), ("thresh", "fp32")]
    w = SourceWriter()
    w("pid = tl.program_id(0)", "b = pid // ROWS",
      "L = tl.load(len_ptr + b)", "NU = (L + UNIT - 1) // UNIT",
      "row_ptr = score_ptr + pid.to(tl.int64) * NUMAX",
      "flag_row = flag_ptr + pid.to(tl.int64) * NUMAX")
    if s.rule == "top_k":
        w("k = tl.load(kunits_ptr + b)",
          "thr, above = _tw_radix(row_ptr, NU, k.to(tl.float64), hist_ptr + pid * (1 << BITS),"
          " True, False, False, BITS, NPASS, PAD, BLOCK)",
          "_tw_flag_ranked(row_ptr, NU, thr, k - above.to(tl.int32), flag_row, True, False, "
          "PAD, BLOCK)")
    else:
        with w.block("for start in range(0, NU, BLOCK):"):
            w("offs = start + tl.arange(0, BLOCK)",
              "v = tl.load(row_ptr + offs, mask=offs < NU, other=float('-inf'))",
              "tl.store(flag_row + offs, (v >= thresh).to(tl.int8), mask=offs < NU)")
    consts = dict(ROWS=select_rows(s, c.shape),
                  UNIT=c.shape.page_size if s.score.per == "page" else 1,
                  BITS=c.schedule["select_radix_bits"], NPASS=npass, PAD=pad,
                  BLOCK=c.schedule["scan_block"])
    return make_kernel("select", "select_decide", args, consts, w,
                       c.schedule["scan_warps"], 1)


def gen_compact(c: Ctx) -> KernelSpec:
    """Candidate lists per query head from unit flags and the keep rules."""
    s, sh, keep = c.p.select, c.shape, c.p.keep
    kind = 0 if s is None else 1 if s.rule == "none" else 2
    fmode = 0
    if kind == 2:
        fmode = 2 if s.group == "union" else 1 if s.group in ("mean", "max", "kv") else 0
    args = [("flag_ptr", "*i8"), ("len_ptr", "*i32"), ("idx_ptr", "*i32"), ("cnt_ptr", "*i32"),
            ("NUMAX", "i32"), ("WIDTH", "i32")]
    w = SourceWriter()
    w("pid = tl.program_id(0)", "b = pid // HQ", "h = pid % HQ",
      "L = tl.load(len_ptr + b)", "run = tl.zeros([1], tl.int32).sum(0)",
      "out_row = idx_ptr + pid.to(tl.int64) * WIDTH")
    with w.block("for start in range(0, L, BLOCK):"):
        w("t = start + tl.arange(0, BLOCK)", "m = t < L",
          "keep = (t < SINK) | (t >= L - WINDOW)")
        if kind == 0:
            w("keep = keep | m")
        elif kind == 2:
            frow = {0: "(b * FROWS + h)", 1: "(b * FROWS + h // G)",
                    2: "(b * FROWS + h // G * G + gi)"}
            load = (f"tl.load(flag_ptr + {frow[fmode]}.to(tl.int64) * NUMAX + t // UNIT, "
                    "mask=m, other=0) != 0")
            if fmode == 2:
                with w.block("for gi in tl.static_range(G):"):
                    w(f"keep = keep | ({load})")
            else:
                w(f"keep = keep | ({load})")
        w("keep = keep & m",
          "pos = run + tl.cumsum(keep.to(tl.int32), 0) - 1",
          "tl.store(out_row + pos, t, mask=keep & (pos < WIDTH))",
          "run += tl.sum(keep.to(tl.int32), 0)")
    w("tl.store(cnt_ptr + pid, tl.minimum(run, WIDTH))")
    with w.block("for start in range(run, WIDTH, BLOCK):"):
        w("j = start + tl.arange(0, BLOCK)",
          "tl.store(out_row + j, tl.full([BLOCK], -1, tl.int32), mask=j < WIDTH)")
    consts = dict(HQ=sh.q_heads, G=sh.group_size,
                  FROWS=select_rows(s, sh) if kind == 2 else 1,
                  UNIT=sh.page_size if kind == 2 and s.score.per == "page" else 1,
                  SINK=keep.sink, WINDOW=keep.window, BLOCK=c.schedule["scan_block"])
    return make_kernel("select", "select_compact", args, consts, w,
                       c.schedule["scan_warps"], 1)
