"""Attend: flash-decoding over per-head ragged index lists, GQA aware, split-KV + combine.

Grid ``(request × head group, split)``. When every query head of a GQA group keeps the same
list (all group modes but ``none``), one program serves the whole group: it loads each K/V
row once and scores it against the group's queries (a ``[G, BLOCK_N]`` tile of logits). With
per-head lists a program serves one head. Split ``s`` of ``attend_splits`` takes a contiguous
slice of the list (``ceil(count / splits)`` rounded to the block), keeps an online max/sum and
an unnormalized accumulator, and writes them as a partial; ``attend_combine`` rescales and
sums the partials per head. One split writes the output directly (no combine kernel).
Logits are ``scale · q·k`` (then ``softcap · tanh(·/softcap)`` when set); an empty list gives 0.
"""

from __future__ import annotations

from .. import ir, passes
from ..passes import softmax_scale
from ..source import SourceWriter
from .expr import next_pow2
from .kernels import KernelSpec, make_kernel
from .select import Ctx, select_rows


def shared_lists(p: ir.PipelineIR) -> bool:
    """True when all query heads of a group end with one kept list."""
    return passes.lists_shared_after(p, len(p.prune))


def gen_attend(c: Ctx) -> KernelSpec:
    sh, sc = c.shape, c.schedule
    shared = shared_lists(c.p)
    splits = sc["attend_splits"]
    args = [("q_ptr", c.dtype_ptr), ("k_ptr", c.dtype_ptr), ("v_ptr", c.dtype_ptr),
            ("pt_ptr", "*i32"), ("kidx_ptr", "*i32"), ("kcnt_ptr", "*i32"),
            ("out_ptr", c.dtype_ptr), ("pacc_ptr", "*fp32"), ("pml_ptr", "*fp32"),
            ("NP", "i32"), ("K", "i32")]
    w = SourceWriter()
    w("pid = tl.program_id(0)", "s = tl.program_id(1)",
      "b = pid // NHG", "hg = pid % NHG",
      "h0 = hg * G" if shared else "h0 = hg", "hkv = hg" if shared else "hkv = hg // G",
      "heads = h0 + tl.arange(0, GP)", "hm = tl.arange(0, GP) < HPP",
      "offs_d = tl.arange(0, BD)", "dmask = offs_d < D",
      "q = tl.load(q_ptr + (b * HQ + heads)[:, None] * D + offs_d[None, :], "
      "mask=hm[:, None] & dmask[None, :], other=0.0).to(tl.float32)",
      "lrow = (b * HQ + h0).to(tl.int64) * K",
      "n = tl.load(kcnt_ptr + b * HQ + h0)",
      "chunk = tl.cdiv(tl.cdiv(n, SPLITS), BN) * BN",
      "lo = s * chunk", "hi = tl.minimum(n, lo + chunk)",
      "m_i = tl.full([GP], float('-inf'), tl.float32)",
      "l_i = tl.zeros([GP], tl.float32)",
      "acc = tl.zeros([GP, BD], tl.float32)")
    with w.block("for start in range(lo, hi, BN):"):
        w("j = start + tl.arange(0, BN)", "jm = j < hi",
          "tok = tl.load(kidx_ptr + lrow + j, mask=jm, other=0)",
          "pg = tl.load(pt_ptr + b * NP + tok // PS, mask=jm, other=0).to(tl.int64)",
          "base = ((pg * HKV + hkv) * PS + tok % PS) * D",
          "km = jm[:, None] & dmask[None, :]",
          "kt = tl.load(k_ptr + base[:, None] + offs_d[None, :], mask=km, other=0.0)"
          ".to(tl.float32)",
          "vt = tl.load(v_ptr + base[:, None] + offs_d[None, :], mask=km, other=0.0)"
          ".to(tl.float32)",
          "lg = tl.sum(q[:, None, :] * kt[None, :, :], axis=2) * SM_SCALE")
        if c.p.attend.softcap:
            w("lg = _tw_softcap(lg, CAP)")
        w("lg = tl.where(jm[None, :], lg, float('-inf'))",
          "m_new = tl.maximum(m_i, tl.max(lg, 1))",
          "alpha = tl.exp(m_i - m_new)",
          "pr = tl.exp(lg - m_new[:, None])",
          "l_i = l_i * alpha + tl.sum(pr, 1)",
          "acc = acc * alpha[:, None] + tl.sum(pr[:, :, None] * vt[None, :, :], axis=1)",
          "m_i = m_new")
    w("om = hm[:, None] & dmask[None, :]")
    if splits == 1:
        w("o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]",
          "tl.store(out_ptr + (b * HQ + heads)[:, None] * D + offs_d[None, :], o, mask=om)")
    else:
        w("prow = (b * HQ + heads).to(tl.int64) * SPLITS + s",
          "tl.store(pacc_ptr + prow[:, None] * D + offs_d[None, :], acc, mask=om)",
          "tl.store(pml_ptr + prow * 2, m_i, mask=hm)",
          "tl.store(pml_ptr + prow * 2 + 1, l_i, mask=hm)")
    g = sh.group_size if shared else 1
    consts = dict(HQ=sh.q_heads, HKV=sh.kv_heads, G=sh.group_size, NHG=sh.q_heads // g,
                  HPP=g, GP=next_pow2(g), D=sh.head_dim, BD=next_pow2(sh.head_dim),
                  PS=sh.page_size, BN=sc["attend_block_n"], SPLITS=splits,
                  SM_SCALE=softmax_scale(c.p, sh.head_dim),
                  CAP=float(c.p.attend.softcap or 0.0))
    return make_kernel("attend", "attend", args, consts, w, sc["attend_warps"],
                       sc["num_stages"])


def gen_combine(c: Ctx) -> KernelSpec:
    sh, splits = c.shape, c.schedule["attend_splits"]
    args = [("pacc_ptr", "*fp32"), ("pml_ptr", "*fp32"), ("out_ptr", c.dtype_ptr)]
    w = SourceWriter()
    w("pid = tl.program_id(0)", "offs_s = tl.arange(0, SP)", "sm = offs_s < SPLITS",
      "offs_d = tl.arange(0, BD)", "dmask = offs_d < D",
      "prow = pid.to(tl.int64) * SPLITS + offs_s",
      "m = tl.load(pml_ptr + prow * 2, mask=sm, other=float('-inf'))",
      "l = tl.load(pml_ptr + prow * 2 + 1, mask=sm, other=0.0)",
      "acc = tl.load(pacc_ptr + prow[:, None] * D + offs_d[None, :], "
      "mask=sm[:, None] & dmask[None, :], other=0.0)",
      "mx = tl.max(m, 0)",
      "wt = tl.where(m > float('-inf'), tl.exp(m - mx), 0.0)",
      "tot = tl.sum(l * wt, 0)",
      "o = tl.sum(acc * wt[:, None], 0) / tl.where(tot > 0, tot, 1.0)",
      "tl.store(out_ptr + pid * D + offs_d, o, mask=dmask)")
    consts = dict(D=sh.head_dim, BD=next_pow2(sh.head_dim), SPLITS=splits,
                  SP=next_pow2(splits))
    return make_kernel("attend", "attend_combine", args, consts, w, 4, 1)


def gen_reallocate(c: Ctx) -> KernelSpec:
    """SparQ's mean-value reallocation (``attention(mean_value=True)``), after attention: one
    program per (request, query head), ``out ← α·out + (1 - α)·v_sum / L`` with ``α`` the mass of
    the kept tokens under the softmax of the selector's (group-merged) scores of this step."""
    sh = c.shape
    s = c.p.selectors()[0]
    args = [("score_ptr", "*fp32"), ("len_ptr", "*i32"), ("rid_ptr", "*i64"),
            ("kidx_ptr", "*i32"), ("kcnt_ptr", "*i32"), ("vsum_ptr", "*fp32"),
            ("out_ptr", c.dtype_ptr), ("NUMAX", "i32"), ("K", "i32")]
    row = "h" if select_rows(s, sh) == sh.q_heads else "h // G"
    w = SourceWriter()
    w("pid = tl.program_id(0)", "b = pid // HQ", "h = pid % HQ",
      f"srow = score_ptr + (b * ROWS + {row}).to(tl.int64) * NUMAX",
      "L = tl.minimum(tl.load(len_ptr + b), NUMAX)",
      "mx = tl.full([1], float('-inf'), tl.float32).max(0)")
    with w.block("for start in range(0, L, BLOCK):"):
        w("t = start + tl.arange(0, BLOCK)",
          "mx = tl.maximum(mx, tl.max(tl.load(srow + t, mask=t < L, other=float('-inf')), 0))")
    # tensor masks only: Triton 3.9's interpreter rejects a tensor mask and-ed with a scalar
    w("fin = (mx + tl.zeros([BLOCK], tl.float32)) > float('-inf')",
      "den = tl.zeros([1], tl.float32).sum(0)")
    with w.block("for start in range(0, L, BLOCK):"):
        w("t = start + tl.arange(0, BLOCK)",
          "v = tl.load(srow + t, mask=t < L, other=float('-inf'))",
          "den += tl.sum(tl.where((t < L) & fin, tl.exp(v - mx), 0.0), 0)")
    w("n = tl.load(kcnt_ptr + pid)", "al = tl.zeros([1], tl.float32).sum(0)")
    with w.block("for start in range(0, n, BLOCK):"):
        w("j = start + tl.arange(0, BLOCK)",
          "tok = tl.load(kidx_ptr + pid.to(tl.int64) * K + j, mask=j < n, other=0)",
          "v = tl.load(srow + tok, mask=j < n, other=float('-inf'))",
          "al += tl.sum(tl.where((j < n) & fin, tl.exp(v - mx), 0.0), 0)")
    w("al = tl.where(den > 0, al / tl.where(den > 0, den, 1.0), 0.0)",
      "offs_d = tl.arange(0, BD)", "dmask = offs_d < D",
      "o = tl.load(out_ptr + pid * D + offs_d, mask=dmask, other=0.0).to(tl.float32)",
      "vs = tl.load(vsum_ptr + (tl.load(rid_ptr + b) * HKV + h // G) * D + offs_d, "
      "mask=dmask, other=0.0)",
      "o = al * o + (1.0 - al) * vs / tl.maximum(tl.load(len_ptr + b), 1).to(tl.float32)",
      "tl.store(out_ptr + pid * D + offs_d, o, mask=dmask)")
    consts = dict(HQ=sh.q_heads, HKV=sh.kv_heads, G=sh.group_size, ROWS=select_rows(s, sh),
                  D=sh.head_dim, BD=next_pow2(sh.head_dim), BLOCK=c.schedule["scan_block"])
    return make_kernel("attend", "attend_reallocate", args, consts, w,
                       c.schedule["scan_warps"], 1)
