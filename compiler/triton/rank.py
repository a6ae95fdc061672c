"""Select: each scored selector's decision, then the candidate lists.

* ``select_decide`` (``select_decide1``, ... per part) — one program per decision row: top-k by
  a radix search over order-preserving integer keys of the scores (counts per digit,
  ``select_radix_bits`` per pass), ties lowest index first; the threshold rule; or top-p: the
  scores' softmax written to a scratch row, then the pruner's exact ``radix`` top-p search on
  it (mass histograms). Writes one flag per unit.
* ``select_compact`` — one program per query head: expands each part's unit flags to tokens
  (pages × page_size, valid tokens only; a combined selector ORs or ANDs its parts), ORs a
  ``union`` group and the sink/window keep rules, and writes the ascending, -1 padded
  ``cand_idx`` with ``cand_cnt``.
"""

from __future__ import annotations

from ..source import SourceWriter
from .kernels import KernelSpec, make_kernel
from .prelude import radix_passes
from .select import Ctx, select_rows, suffix
from .top_p import top_p_decision


def gen_decide(c: Ctx, part: int = 0) -> KernelSpec:
    s = c.p.selectors()[part]
    npass, pad = radix_passes(c.schedule["select_radix_bits"])
    args = [("score_ptr", "*fp32"), ("len_ptr", "*i32"), ("kunits_ptr", "*i32"),
            ("hist_ptr", "*fp64"), ("flag_ptr", "*i8"), ("scr_ptr", "*fp32"), ("NUMAX", "i32"),
            ("thresh", "fp32")]
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
    elif s.rule == "top_p":
        _softmax(w)
        w("n = NU")
        top_p_decision(w, "radix", s.p)
    else:
        with w.block("for start in range(0, NU, BLOCK):"):
            w("offs = start + tl.arange(0, BLOCK)",
              "v = tl.load(row_ptr + offs, mask=offs < NU, other=float('-inf'))",
              "tl.store(flag_row + offs, (v >= thresh).to(tl.int8), mask=offs < NU)")
    consts = dict(ROWS=select_rows(s, c.shape),
                  UNIT=c.shape.page_size if s.score.per == "page" else 1,
                  BITS=c.schedule["select_radix_bits"], NPASS=npass, PAD=pad,
                  BLOCK=c.schedule["scan_block"], PMASS=float(s.p or 1.0))
    return make_kernel("select", "select_decide" + suffix(part), args, consts, w,
                       c.schedule["scan_warps"], 1)


def _softmax(w: SourceWriter) -> None:
    """``softmax`` of the row's ``NU`` scores into the scratch row, which ``row_ptr`` then
    names (a row of ``-inf`` gives zeros: nothing is kept)."""
    w("mx = tl.full([1], float('-inf'), tl.float32).max(0)")
    with w.block("for start in range(0, NU, BLOCK):"):
        w("offs = start + tl.arange(0, BLOCK)",
          "mx = tl.maximum(mx, tl.max(tl.load(row_ptr + offs, mask=offs < NU, "
          "other=float('-inf')), 0))")
    w("den = tl.zeros([1], tl.float32).sum(0)")
    # tensor masks only: Triton 3.9's interpreter rejects a tensor mask and-ed with a scalar
    ok = "(offs < NU) & ((mx + tl.zeros([BLOCK], tl.float32)) > float('-inf'))"
    with w.block("for start in range(0, NU, BLOCK):"):
        w("offs = start + tl.arange(0, BLOCK)",
          "v = tl.load(row_ptr + offs, mask=offs < NU, other=float('-inf'))",
          f"den += tl.sum(tl.where({ok}, tl.exp(v - mx), 0.0), 0)")
    w("scr_row = scr_ptr + pid.to(tl.int64) * NUMAX")
    with w.block("for start in range(0, NU, BLOCK):"):
        w("offs = start + tl.arange(0, BLOCK)",
          "v = tl.load(row_ptr + offs, mask=offs < NU, other=float('-inf'))",
          f"tl.store(scr_row + offs, tl.where({ok}, tl.exp(v - mx) / den, 0.0), mask=offs < NU)")
    w("tl.debug_barrier()", "row_ptr = scr_row")


def gen_compact(c: Ctx) -> KernelSpec:
    """Candidate lists per query head from the parts' unit flags and the keep rules."""
    s, sh, keep = c.p.select, c.shape, c.p.keep
    parts = c.p.selectors()
    nflags = max(1, len(parts))
    args = [(f"flag{i}_ptr", "*i8") for i in range(nflags)]
    args += [("len_ptr", "*i32"), ("idx_ptr", "*i32"), ("cnt_ptr", "*i32")]
    args += [(f"NUMAX{i}", "i32") for i in range(nflags)] + [("WIDTH", "i32")]
    w = SourceWriter()
    w("pid = tl.program_id(0)", "b = pid // HQ", "h = pid % HQ",
      "L = tl.load(len_ptr + b)", "run = tl.zeros([1], tl.int32).sum(0)",
      "out_row = idx_ptr + pid.to(tl.int64) * WIDTH")
    with w.block("for start in range(0, L, BLOCK):"):
        w("t = start + tl.arange(0, BLOCK)", "m = t < L",
          "keep = (t < SINK) | (t >= L - WINDOW)")
        if s is None:
            w("keep = keep | m")
        elif parts:
            inter = s.rule == "intersect"
            w("chosen = m" if inter else "chosen = t < 0")
            for i, part in enumerate(parts):
                _pick(w, c, i, part)
                w(f"chosen = chosen {'&' if inter else '|'} pick")
            w("keep = keep | chosen")
        w("keep = keep & m",
          "pos = run + tl.cumsum(keep.to(tl.int32), 0) - 1",
          "tl.store(out_row + pos, t, mask=keep & (pos < WIDTH))",
          "run += tl.sum(keep.to(tl.int32), 0)")
    w("tl.store(cnt_ptr + pid, tl.minimum(run, WIDTH))")
    with w.block("for start in range(run, WIDTH, BLOCK):"):
        w("j = start + tl.arange(0, BLOCK)",
          "tl.store(out_row + j, tl.full([BLOCK], -1, tl.int32), mask=j < WIDTH)")
    consts = dict(HQ=sh.q_heads, G=sh.group_size, SINK=keep.sink, WINDOW=keep.window,
                  BLOCK=c.schedule["scan_block"])
    return make_kernel("select", "select_compact", args, consts, w,
                       c.schedule["scan_warps"], 1)


def _pick(w: SourceWriter, c: Ctx, i: int, part) -> None:
    """``pick``: the tokens ``t`` (valid where ``m``) part ``i`` chose for query head ``h``."""
    rows = select_rows(part, c.shape)
    unit = c.shape.page_size if part.score.per == "page" else 1
    frow = {"none": f"(b * {rows} + h)", "union": f"(b * {rows} + h // G * G + gi)"}.get(
        part.group, f"(b * {rows} + h // G)")
    load = (f"tl.load(flag{i}_ptr + {frow}.to(tl.int64) * NUMAX{i} + t // {unit}, mask=m, "
            "other=0) != 0")
    if part.group != "union":
        w(f"pick = {load}")
        return
    w("pick = t < 0")
    with w.block("for gi in tl.static_range(G):"):
        w(f"pick = pick | ({load})")
