"""Estimate: a sparse GEMV of q against the candidates' low-precision keys, then a softmax.

One program per (request, query head) walks its candidate list in blocks of ``estimate_block_n``
tokens, reads each token's page through the page table and dequantizes the INT2/4/8 codes in
registers (or reads the exact keys), forms ``scale · q·k̃`` (softcapped like the attention), and
keeps an online max and sum. A second pass over the row normalizes the stored logits in place
and zeroes the padding, so ``est_w`` is exactly the stage ABI: softmax over the candidates.
A ``kv`` group estimates from the group's mean query.

Key formats (``compiler.keycodes``; arguments in ``KeyCodes.tensors()`` order):

* ``token`` — ``packed, scale, zero`` (float32 per token): ``k̃ = code · scale + zero``;
* ``token`` smoothed — also ``smooth float32 [Hkv, D]``: the codes are of ``k / s``, so the
  query is multiplied by ``s`` once per program: ``q·(k̃ ∘ s) = (q ∘ s)·k̃``;
* ``page`` — ``packed, lo, hi`` (cache dtype, per page and channel): ``k̃ = code · (hi - lo) /
  levels + lo``, read at the token's own page;
* ``group`` of ``GRP`` pages — the same, with ``lo``/``hi`` read at the group's first page,
  ``page_table[b, (t // PS) // GRP · GRP]``.
"""

from __future__ import annotations

from ..passes import softmax_scale
from ..source import SourceWriter
from .expr import next_pow2
from .kernels import KernelSpec, make_kernel
from .select import Ctx, key_args, key_kind


def _key_tile(w: SourceWriter, kind: str) -> None:
    """Float32 key tile ``kt [BN, BD]`` of the block's tokens (``pg``, ``slot``, ``jm``)."""
    tok = "((pg * HKV + hkv) * PS + slot)"
    mask = "jm[:, None] & dmask[None, :]"
    if kind == "exact":
        w(f"kt = tl.load(k_ptr + {tok}[:, None] * D + offs_d[None, :], mask={mask}, "
          "other=0.0).to(tl.float32)")
        return
    w(f"byte = tl.load(packed_ptr + {tok}[:, None] * NBYTES + (offs_d // PER)[None, :], "
      f"mask={mask}, other=0).to(tl.int32)",
      "code = ((byte >> ((offs_d % PER) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)")
    if kind == "token":
        w(f"sc = tl.load(scale_ptr + {tok}, mask=jm, other=0.0)",
          f"zr = tl.load(zero_ptr + {tok}, mask=jm, other=0.0)",
          "kt = code * sc[:, None] + zr[:, None]")
        return
    if kind == "group":  # the side data lives at the group's first page
        w("lead = tl.load(pt_ptr + b * NP + (tok // PS) // GRP * GRP, mask=jm, "
          "other=0).to(tl.int64)")
    side = f"(({'lead' if kind == 'group' else 'pg'} * HKV + hkv) * D)"
    # (hi - lo) * (1 / levels): within an ulp of torch's (hi - lo) / levels, no division
    w(f"lo = tl.load(lo_ptr + {side}[:, None] + offs_d[None, :], mask={mask}, "
      "other=0.0).to(tl.float32)",
      f"hi = tl.load(hi_ptr + {side}[:, None] + offs_d[None, :], mask={mask}, "
      "other=0.0).to(tl.float32)",
      "kt = code * ((hi - lo) * INV_LEVELS) + lo")


def gen_estimate(c: Ctx, stage: int) -> KernelSpec:
    pr, sh, sc = c.p.prune[stage], c.shape, c.schedule
    e = pr.estimator
    kind = key_kind(e)
    args = [("q_ptr", c.dtype_ptr), ("pt_ptr", "*i32"), ("cidx_ptr", "*i32"),
            ("ccnt_ptr", "*i32"), *key_args(c, e), ("w_ptr", "*fp32"), ("NP", "i32"),
            ("C", "i32")]
    qmean = pr.group == "kv"
    q_line = ("q = tl.sum(tl.load(q_ptr + (b * HQ + hkv * G + g_ar[:, None]) * D + "
              "offs_d[None, :], mask=(g_ar < G)[:, None] & dmask[None, :], other=0.0)"
              ".to(tl.float32), axis=0) / G") if qmean else \
        "q = tl.load(q_ptr + pid * D + offs_d, mask=dmask, other=0.0).to(tl.float32)"
    cap = c.p.attend.softcap
    w = SourceWriter()
    w("pid = tl.program_id(0)", "b = pid // HQ", "h = pid % HQ", "hkv = h // G",
      "offs_d = tl.arange(0, BD)", "dmask = offs_d < D", "g_ar = tl.arange(0, GP)", q_line)
    if e.smooth:  # (q ∘ s)·(k / s)
        w("q = q * tl.load(smooth_ptr + hkv * D + offs_d, mask=dmask, other=0.0)")
    w("n = tl.load(ccnt_ptr + pid)",
      "row = pid.to(tl.int64) * C",
      "m_i = tl.full([1], float('-inf'), tl.float32).max(0)",
      "l_i = tl.zeros([1], tl.float32).sum(0)")
    with w.block("for start in range(0, n, BN):"):
        w("j = start + tl.arange(0, BN)", "jm = j < n",
          "tok = tl.load(cidx_ptr + row + j, mask=jm, other=0)",
          "pg = tl.load(pt_ptr + b * NP + tok // PS, mask=jm, other=0).to(tl.int64)",
          "slot = tok % PS")
        _key_tile(w, kind)
        w("lg = tl.sum(kt * q[None, :], axis=1) * SM_SCALE")
        if cap:
            w("lg = _tw_softcap(lg, CAP)")
        w("lg = tl.where(jm, lg, float('-inf'))",
          "tl.store(w_ptr + row + j, lg, mask=jm)",
          "m_new = tl.maximum(m_i, tl.max(lg, 0))",
          "l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(lg - m_new), 0)",
          "m_i = m_new")
    w("tl.debug_barrier()",
      "inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)")
    with w.block("for start in range(0, C, BN):"):
        w("j = start + tl.arange(0, BN)", "jm = j < n",
          "lg = tl.load(w_ptr + row + j, mask=jm, other=float('-inf'))",
          "w = tl.where(jm, tl.exp(lg - m_i) * inv, 0.0)",
          "tl.store(w_ptr + row + j, w, mask=j < C)")
    consts = dict(HQ=sh.q_heads, HKV=sh.kv_heads, G=sh.group_size, GP=next_pow2(sh.group_size),
                  D=sh.head_dim, BD=next_pow2(sh.head_dim), PS=sh.page_size,
                  BN=sc["estimate_block_n"], SM_SCALE=softmax_scale(c.p, sh.head_dim),
                  CAP=float(cap or 0.0))
    if kind != "exact":
        per = 8 // e.bits
        consts.update(BITS=e.bits, PER=per, NBYTES=-(-sh.head_dim * e.bits // 8))
    if kind in ("page", "group"):
        consts.update(INV_LEVELS=1.0 / ((1 << e.bits) - 1))
    if kind == "group":
        consts.update(GRP=e.group_pages)
    return make_kernel("estimate", f"estimate{stage}", args, consts, w,
                       sc["estimate_warps"], sc["num_stages"])
