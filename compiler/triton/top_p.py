"""Prune: top-p (sort / bisect / radix), top-k and threshold decisions, then kept lists.

``prune_decide`` runs one program per decision row (a query head, or a KV head when the group
is merged with ``mean``/``max``; the merged weights are written to a scratch row first). It
writes one flag per candidate. The top-p strategies, each a schedule choice:

* ``sort`` — the exact path: int64 keys ``(weight bits << 32) | (2**31-1 - position)`` sorted
  descending in one block (weight desc, position asc — the reference's stable order), float64
  cumsum, keep the prefix whose mass *before* each element is < p·total; the last kept key is
  the threshold on the unsorted row.
* ``bisect`` — threshold ``t`` in ``[0, 2·max w]``: ``lo`` always holds mass ≥ p, ``hi`` never;
  stop when the bracket ``[lo, hi)`` holds at most ``bisect_mass`` of the row's mass (``mass``
  stop, the default), is < eps (``eps``), or after a fixed count (``iters``); the first two also
  stop when every weight in the bracket is one value. Keep ``w ≥ lo``. Extra tokens over the
  minimal set all lie within the bracket of the threshold.
* ``radix`` — the exact threshold key by mass histograms over the weights' float32 bits,
  ``radix_bits`` per pass (fixed pass count); ties at the threshold resolved lowest index first
  with the count ``ceil((p·total - mass above) / t)``.

``prune_compact`` (one program per query head) ORs a ``union`` group's flags and the keep rules
and writes the ascending, -1 padded ``kept_idx`` and ``kept_cnt``.

With the schedule's ``fuse_prune_compact`` (and any group but ``union``, whose query heads OR
flags written by other programs), the compaction is folded into ``prune_decide``: after a
barrier each decision program compacts the query heads it decided for (one head, or the G heads
of a merged ``mean``/``max`` row) from the flags it has just written, and no ``prune_compact``
kernel exists.
"""

from __future__ import annotations

from .. import ir
from ..source import SourceWriter
from .kernels import KernelSpec, make_kernel
from .prelude import radix_passes
from .select import Ctx


def prune_rows(pr: ir.Prune, shape: ir.Shape) -> int:
    return shape.kv_heads if pr.group in ("mean", "max") else shape.q_heads


def _merge(w: SourceWriter, pr: ir.Prune) -> None:
    """Merge a group's weight rows into the scratch row (mean, or max renormalized)."""
    if pr.group not in ("mean", "max"):
        w("n = tl.load(ccnt_ptr + pid)", "row_ptr = w_ptr + pid.to(tl.int64) * C")
        return
    mean = pr.group == "mean"
    w("h0 = (pid % ROWS) * G", "n = tl.load(ccnt_ptr + b * HQ + h0)",
      "row_ptr = scr_ptr + pid.to(tl.int64) * C",
      "tot = tl.zeros([1], tl.float32).sum(0)")
    with w.block("for start in range(0, n, BLOCK):"):
        w("offs = start + tl.arange(0, BLOCK)", "m = offs < n",
          "acc = tl.zeros([BLOCK], tl.float32)" if mean else
          "acc = tl.full([BLOCK], float('-inf'), tl.float32)")
        with w.block("for gi in tl.static_range(G):"):
            w("v = tl.load(w_ptr + (b * HQ + h0 + gi).to(tl.int64) * C + offs, mask=m, "
              "other=0.0)",
              "acc = acc + v" if mean else "acc = tl.maximum(acc, v)")
        w("acc = tl.where(m, acc / G, 0.0)" if mean else "acc = tl.where(m, acc, 0.0)",
          "tl.store(row_ptr + offs, acc, mask=m)",
          "tot += tl.sum(acc, 0)")
    w("tl.debug_barrier()")
    if not mean:  # the reference renormalizes the max-merged row
        w("inv = 1.0 / tl.maximum(tot, 1e-30)")
        with w.block("for start in range(0, n, BLOCK):"):
            w("offs = start + tl.arange(0, BLOCK)",
              "v = tl.load(row_ptr + offs, mask=offs < n, other=0.0)",
              "tl.store(row_ptr + offs, v * inv, mask=offs < n)")
        w("tl.debug_barrier()")


def _total(w: SourceWriter) -> None:
    """``P``, the mass to keep, and ``wmax``, the heaviest weight, of the row."""
    w("tot64 = tl.zeros([1], tl.float64).sum(0)",
      "wmax = tl.zeros([1], tl.float32).sum(0)")
    with w.block("for start in range(0, n, BLOCK):"):
        w("offs = start + tl.arange(0, BLOCK)",
          "v = tl.load(row_ptr + offs, mask=offs < n, other=0.0)",
          "tot64 += tl.sum(v.to(tl.float64), 0)",
          "wmax = tl.maximum(wmax, tl.max(v, 0))")
    w("P = tot64 * PMASS")


def top_p_decision(w: SourceWriter, strategy: str, p: float) -> None:
    """The decision of a top-p row ``row_ptr`` of ``n`` weights into ``flag_row`` (names the
    kernel defines; constants ``PMASS``, ``BITS``, ``NPASS``, ``PAD``, ``BLOCK``, ``ROWB``)."""
    keep_all = p >= 1.0  # every positive weight (the reference's p >= 1 rule)
    if strategy == "sort":
        w("offs = tl.arange(0, ROWB)", "m = offs < n",
          "v = tl.load(row_ptr + offs, mask=m, other=0.0)",
          "key = tl.where(m, (v.to(tl.int32, bitcast=True).to(tl.int64) << 32) | "
          "(2147483647 - offs).to(tl.int64), -1)",
          "srt = tl.sort(key, 0, descending=True)",
          "ws = tl.where(srt >= 0, (srt >> 32).to(tl.int32).to(tl.float32, bitcast=True), 0.0)"
          ".to(tl.float64)",
          "cum = tl.cumsum(ws, 0)",
          "P = tl.sum(ws, 0) * PMASS",
          "keep_s = ws > 0" if keep_all else "keep_s = (ws > 0) & ((cum - ws) < P)",
          "last = tl.min(tl.where(keep_s, srt, 9223372036854775807), 0)",
          "tl.store(flag_row + offs, (m & (key >= last)).to(tl.int8), mask=m)")
        return
    _total(w)
    if strategy == "bisect":
        _bisect(w, keep_all)
        return
    w("thr, above = _tw_radix(row_ptr, n, P, hist_ptr + pid * (1 << BITS), False, True, True, "
      "BITS, NPASS, PAD, BLOCK)",
      "t = _tw_key_value(thr, PAD).to(tl.float64)",
      "mt = tl.where(t > 0, tl.ceil((P - above) / tl.where(t > 0, t, 1.0)), 0.0)",
      "mt = tl.minimum(mt, 2147483647.0).to(tl.int32)")
    if keep_all:
        w("thr = thr * 0", "mt = mt * 0 + 2147483647")
    w("_tw_flag_ranked(row_ptr, n, thr, mt, flag_row, False, True, PAD, BLOCK)")


def _bisect(w: SourceWriter, keep_all: bool) -> None:
    """Bisection on a threshold in ``[0, 2·wmax]`` until the bracket holds a single weight
    value (``EARLY``), at most ``MASS`` of the row's mass, is below ``EPS``, or ``ITERS`` rounds
    ran; keep ``w >= lo``. ``mlo``/``mhi``: the mass at or above each end."""
    w("lo = tl.zeros([1], tl.float32).sum(0)",
      "hi = wmax * 2.0 + 1e-30",  # strictly above every weight: hi never holds mass p
      "mlo = tot64 + 0.0", "mhi = tot64 * 0.0",
      "go = hi < lo" if keep_all else "go = hi > lo",
      "it = tl.zeros([1], tl.int32).sum(0)")
    with w.block("while go:"):
        w("mid = (lo + hi) * 0.5",
          "mass = tl.zeros([1], tl.float64).sum(0)",
          "vmin_a = hi + 0.0", "vmax_a = lo - 1.0",
          "vmin_b = hi + 0.0", "vmax_b = lo - 1.0")
        with w.block("for start in range(0, n, BLOCK):"):
            w("offs = start + tl.arange(0, BLOCK)",
              "v = tl.load(row_ptr + offs, mask=offs < n, other=0.0)",
              "mass += tl.sum(tl.where(v >= mid, v, 0.0).to(tl.float64), 0)",
              "ina = (v >= lo) & (v < mid) & (offs < n)",
              "inb = (v >= mid) & (v < hi) & (offs < n)",
              "vmin_a = tl.minimum(vmin_a, tl.min(tl.where(ina, v, float('inf')), 0))",
              "vmax_a = tl.maximum(vmax_a, tl.max(tl.where(ina, v, float('-inf')), 0))",
              "vmin_b = tl.minimum(vmin_b, tl.min(tl.where(inb, v, float('inf')), 0))",
              "vmax_b = tl.maximum(vmax_b, tl.max(tl.where(inb, v, float('-inf')), 0))")
        w("up = mass >= P",
          "lo = tl.where(up, mid, lo)", "hi = tl.where(up, hi, mid)",
          "mlo = tl.where(up, mass, mlo)", "mhi = tl.where(up, mhi, mass)",
          "single = tl.where(up, vmin_b >= vmax_b, vmin_a >= vmax_a)",
          "it += 1",
          "go = (hi - lo > EPS) & (mlo - mhi > tot64 * MASS) & (it < ITERS)")
        with w.block("if EARLY:"):
            w("go = go & (single == 0)")
    with w.block("for start in range(0, n, BLOCK):"):
        w("offs = start + tl.arange(0, BLOCK)", "m = offs < n",
          "v = tl.load(row_ptr + offs, mask=m, other=0.0)",
          "tl.store(flag_row + offs, (m & (v >= lo) & (v > 0)).to(tl.int8), mask=m)")


def gen_decide(c: Ctx, stage: int, row_block: int) -> KernelSpec:
    pr, sh, sc = c.p.prune[stage], c.shape, c.schedule
    strategy = sc["top_p_strategy"]
    bits = sc.get("radix_bits", 8) if pr.rule == "top_p" else sc["select_radix_bits"]
    npass, pad = radix_passes(bits)
    args = [("w_ptr", "*fp32"), ("ccnt_ptr", "*i32"), ("kunits_ptr", "*i32"),
            ("scr_ptr", "*fp32"), ("hist_ptr", "*fp64"), ("flag_ptr", "*i8")]
    fused = fuses_compact(c, stage)
    if fused:
        args += [("cidx_ptr", "*i32"), ("len_ptr", "*i32"), ("idx_ptr", "*i32"),
                 ("cnt_ptr", "*i32")]
    args.append(("C", "i32"))
    w = SourceWriter()
    w("pid = tl.program_id(0)", "b = pid // ROWS")
    _merge(w, pr)
    w("flag_row = flag_ptr + pid.to(tl.int64) * C")
    if pr.rule == "top_p":
        top_p_decision(w, strategy, pr.p)
    elif pr.rule == "top_k":
        w("k = tl.load(kunits_ptr + b)",
          "thr, above = _tw_radix(row_ptr, n, k.to(tl.float64), hist_ptr + pid * "
          "(1 << BITS), False, False, True, BITS, NPASS, PAD, BLOCK)",
          "_tw_flag_ranked(row_ptr, n, thr, k - above.to(tl.int32), flag_row, False, "
          "True, PAD, BLOCK)")
    else:
        with w.block("for start in range(0, n, BLOCK):"):
            w("offs = start + tl.arange(0, BLOCK)", "m = offs < n",
              "v = tl.load(row_ptr + offs, mask=m, other=0.0)",
              f"tl.store(flag_row + offs, (m & (v >= {float(pr.threshold)!r})).to(tl.int8),"
              " mask=m)")
    if fused:  # this program's flags, then the query heads it decided for
        w("tl.debug_barrier()", "L = tl.load(len_ptr + b)")
        if pr.group in ("mean", "max"):
            with w.block("for gi in tl.static_range(G):"):
                _compact(w, "(pid % ROWS) * G + gi", "pid", False)
        else:
            _compact(w, "pid % ROWS", "pid", False)
    stop = sc.get("bisect_stop", "mass")
    consts = dict(HQ=sh.q_heads, G=sh.group_size, ROWS=prune_rows(pr, sh),
                  SINK=c.p.keep.sink, WINDOW=c.p.keep.window,
                  PMASS=float(pr.p or 1.0),
                  EPS=float(sc.get("bisect_eps", 0.0)) if stop == "eps" else 0.0,
                  MASS=float(sc.get("bisect_mass", 1e-3)) if stop == "mass" else -1.0,
                  ITERS=int(sc.get("bisect_iters", 64)) if stop == "iters" else 64,
                  EARLY=int(stop != "iters"), BITS=bits, NPASS=npass, PAD=pad,
                  BLOCK=sc["scan_block"], ROWB=row_block)
    return make_kernel("prune", f"prune{stage}_decide", args, consts, w, sc["scan_warps"], 1)


def fuses_compact(c: Ctx, stage: int) -> bool:
    """Whether pruner ``stage``'s compaction runs inside its decide kernel (the schedule's
    ``fuse_prune_compact``; a ``union`` group always keeps the separate kernel)."""
    return bool(c.schedule.get("fuse_prune_compact", False)) and \
        c.p.prune[stage].group != "union"


def _compact(w: SourceWriter, head: str, frow: str, union: bool) -> None:
    """Kept list of query head ``head`` of request ``b`` from the flag row(s) ``frow`` (the
    G rows ``frow + gi`` for ``union``), the candidates and the keep rules; needs ``L``."""
    load = f"tl.load(flag_ptr + ({frow}).to(tl.int64) * C + cj, mask=cm, other=0) != 0"
    w(f"hrow = b * HQ + {head}",
      "n = tl.load(ccnt_ptr + hrow)",
      "run = tl.zeros([1], tl.int32).sum(0)",
      "out_row = idx_ptr + hrow.to(tl.int64) * C")
    with w.block("for start in range(0, n, BLOCK):"):
        w("cj = start + tl.arange(0, BLOCK)", "cm = cj < n",
          "tok = tl.load(cidx_ptr + hrow.to(tl.int64) * C + cj, mask=cm, other=0)",
          "keep = (tok < SINK) | (tok >= L - WINDOW)")
        if union:
            with w.block("for gi in tl.static_range(G):"):
                w(f"keep = keep | ({load})")
        else:
            w(f"keep = keep | ({load})")
        w("keep = keep & cm",
          "pos = run + tl.cumsum(keep.to(tl.int32), 0) - 1",
          "tl.store(out_row + pos, tok, mask=keep)",
          "run += tl.sum(keep.to(tl.int32), 0)")
    w("tl.store(cnt_ptr + hrow, run)")
    with w.block("for start in range(run, C, BLOCK):"):
        w("cj = start + tl.arange(0, BLOCK)",
          "tl.store(out_row + cj, tl.full([BLOCK], -1, tl.int32), mask=cj < C)")


def gen_compact(c: Ctx, stage: int) -> KernelSpec:
    pr, sh, keep = c.p.prune[stage], c.shape, c.p.keep
    frow = {"mean": "b * ROWS + h // G", "max": "b * ROWS + h // G",
            "union": "b * ROWS + h // G * G + gi"}.get(pr.group, "b * ROWS + h")
    args = [("flag_ptr", "*i8"), ("cidx_ptr", "*i32"), ("ccnt_ptr", "*i32"), ("len_ptr", "*i32"),
            ("idx_ptr", "*i32"), ("cnt_ptr", "*i32"), ("C", "i32")]
    w = SourceWriter()
    w("pid = tl.program_id(0)", "b = pid // HQ", "h = pid % HQ", "L = tl.load(len_ptr + b)")
    _compact(w, "h", frow, pr.group == "union")
    consts = dict(HQ=sh.q_heads, G=sh.group_size, ROWS=prune_rows(pr, sh), SINK=keep.sink,
                  WINDOW=keep.window, BLOCK=c.schedule["scan_block"])
    return make_kernel("prune", f"prune{stage}_compact", args, consts, w,
                       c.schedule["scan_warps"], 1)
