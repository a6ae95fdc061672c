"""Cache side: page summaries from the summary expressions, and quantized keys.

* ``append_summary`` — one program per (touched page, KV head): loads the page's keys
  ``[page_size, D]`` (valid slots only), evaluates each field of the pipeline's summary with
  the expression emitter (token reductions mask invalid slots), stores ``[C]`` per field.
* ``append_token_summary`` — one program per (new token, KV head): each field of a token
  summary (``k @ P``, ``k[chans]``, ...) of the token's key, stored ``[C]`` per field.
* ``append_codes_int<bits>_token[_smooth]`` — one program per (new token, KV head): per-token
  min-max over head_dim (of the key divided channel-wise by the smoothing factors, for the
  smoothed format), codes packed ``8 // bits`` per byte (channel ``PER·j + i`` at bit ``bits·i``).
* ``append_codes_int<bits>_page`` — one program per (touched page, KV head): the per-channel
  min/max over the page's valid tokens, stored in the cache dtype into ``lo``/``hi`` (exact: the
  min of values of a dtype is one of them), and the codes against them; invalid slots get code
  0, an empty page ``lo = hi = 0``.
* ``append_codes_int<bits>_group<G>`` — one program per (group, KV head), the group given as
  its ``G`` physical pages (-1: not allocated): the per-channel min/max over the valid tokens of
  all its pages, stored at its first page, then the codes of every allocated page.

Divisions are ``div_rn`` and rounding is half-to-even so codes equal torch's bit for bit.
"""

from __future__ import annotations

from .. import ir
from ..source import SourceWriter
from .expr import Chan, Emitter, expr_width, next_pow2
from .kernels import KernelSpec, make_kernel
from .select import Ctx


def gen_summary(c: Ctx, summary: ir.Summary) -> KernelSpec:
    sh = c.shape
    full = Chan("offs_d", "dmask", sh.head_dim, "offs_d")
    leaves = {"page_k": lambda ch: (
        f"tl.load(k_ptr + (base + offs_t)[:, None] * D + {ch.idx}[None, :], "
        f"mask=rmask[:, None] & {ch.mask}[None, :], other=0.0).to(tl.float32)")}
    args = [("k_ptr", c.dtype_ptr), ("pages_ptr", "*i64"), ("fill_ptr", "*i64"),
            ("chan_ptr", "*i32"), ("mat_ptr", "*fp32")]
    args += [(f"out{i}_ptr", c.dtype_ptr) for i in range(len(summary.fields))]
    em = Emitter(leaves, full, c.tables, prefix="s")
    stores = []
    for i, f in enumerate(summary.fields):
        v = em.emit(f.expr)
        cf, lanes = expr_width(f.expr, sh.head_dim), v.chan.lanes or v.chan.idx
        stores.append(f"tl.store(out{i}_ptr + (pg * HKV + hkv) * {cf} + {lanes}[None, :], "
                      f"{v.src} + tl.zeros([1, {next_pow2(cf)}], tl.float32), "
                      f"mask=({lanes} < {cf})[None, :])")
    w = SourceWriter()
    w("pg = tl.load(pages_ptr + tl.program_id(0))", "hkv = tl.program_id(1)",
      "rcount = tl.load(fill_ptr + pg).to(tl.int32)",
      "offs_t = tl.arange(0, PS)", "rmask = offs_t < rcount",
      "offs_d = tl.arange(0, BD)", "dmask = offs_d < D",
      "base = (pg * HKV + hkv) * PS", *em.lines, *stores)
    consts = dict(HKV=sh.kv_heads, D=sh.head_dim, BD=next_pow2(sh.head_dim), PS=sh.page_size)
    return make_kernel("append", f"append_summary_{summary.name}", args, consts, w,
                       c.schedule["scan_warps"], 1)


def gen_token_summary(c: Ctx, summary: ir.Summary) -> KernelSpec:
    sh = c.shape
    full = Chan("offs_d", "dmask", sh.head_dim, "offs_d")
    leaves = {"k": lambda ch: (f"tl.load(k_ptr + tok * D + {ch.idx}[None, :], "
                               f"mask={ch.mask}[None, :], other=0.0).to(tl.float32)")}
    args = [("k_ptr", c.dtype_ptr), ("phys_ptr", "*i64"), ("slot_ptr", "*i64"),
            ("chan_ptr", "*i32"), ("mat_ptr", "*fp32")]
    args += [(f"out{i}_ptr", c.dtype_ptr) for i in range(len(summary.fields))]
    em = Emitter(leaves, full, c.tables, prefix="s")
    stores = []
    for i, f in enumerate(summary.fields):
        v = em.emit(f.expr)
        cf, lanes = expr_width(f.expr, sh.head_dim), v.chan.lanes or v.chan.idx
        stores.append(f"tl.store(out{i}_ptr + tok * {cf} + {lanes}[None, :], "
                      f"{v.src} + tl.zeros([1, {next_pow2(cf)}], tl.float32), "
                      f"mask=({lanes} < {cf})[None, :])")
    w = SourceWriter()
    w("hkv = tl.program_id(1)",
      "tok = (tl.load(phys_ptr + tl.program_id(0)) * HKV + hkv) * PS + "
      "tl.load(slot_ptr + tl.program_id(0))",
      "offs_d = tl.arange(0, BD)", "dmask = offs_d < D", *em.lines, *stores)
    consts = dict(HKV=sh.kv_heads, D=sh.head_dim, BD=next_pow2(sh.head_dim), PS=sh.page_size)
    return make_kernel("append", f"append_token_summary_{summary.name}", args, consts, w,
                       c.schedule["scan_warps"], 1)


def _code_consts(c: Ctx, bits: int) -> dict:
    per = 8 // bits
    nbytes = -(-c.shape.head_dim * bits // 8)
    return dict(HKV=c.shape.kv_heads, D=c.shape.head_dim, PS=c.shape.page_size, BITS=bits,
                PER=per, NBYTES=nbytes, NBP=next_pow2(nbytes), LEVELS=(1 << bits) - 1)


def codes_kernel_name(e) -> str:
    """Name of the append kernel that writes the codes of ``e`` (an ``ir.Estimator`` or a
    ``KeyCodeSpec``: they share names; one kernel per key-code format; a
    Python identifier: ``int4_token_smooth0.5`` → ``append_codes_int4_token_smooth0_5``)."""
    return f"append_codes_{e.name}".replace(".", "_")


def gen_codes(c: Ctx, e: ir.Estimator) -> KernelSpec:
    """The append kernel of a quantized estimator's key-code format."""
    gen = {"token": gen_codes_token, "page": gen_codes_page, "group": gen_codes_group}
    return gen[e.granularity](c, e)


def gen_codes_token(c: Ctx, e: ir.Estimator) -> KernelSpec:
    args = [("k_ptr", c.dtype_ptr), ("phys_ptr", "*i64"), ("slot_ptr", "*i64"),
            ("packed_ptr", "*u8"), ("scale_ptr", "*fp32"), ("zero_ptr", "*fp32")]
    if e.smooth:
        args.append(("smooth_ptr", "*fp32"))
    w = SourceWriter()
    w("t = tl.program_id(0)", "hkv = tl.program_id(1)",
      "tok = (tl.load(phys_ptr + t) * HKV + hkv) * PS + tl.load(slot_ptr + t)",
      "offs_b = tl.arange(0, NBP)", "offs_i = tl.arange(0, PER)",
      "ch = offs_b[:, None] * PER + offs_i[None, :]", "cm = ch < D",
      "x = tl.load(k_ptr + tok * D + ch, mask=cm, other=0.0).to(tl.float32)")
    if e.smooth:  # codes of k / s (torch's true division, so div_rn)
        w("x = tl.math.div_rn(x, tl.load(smooth_ptr + hkv * D + ch, mask=cm, other=1.0))")
    w("lo = tl.min(tl.min(tl.where(cm, x, float('inf')), 1), 0)",
      "hi = tl.max(tl.max(tl.where(cm, x, float('-inf')), 1), 0)",
      "scale = tl.math.div_rn(hi - lo, LEVELS * 1.0)",
      "safe = tl.where(scale > 0, scale, 1.0)",
      "code = _tw_round(tl.math.div_rn(x - lo, safe + tl.zeros_like(x)), LEVELS)",
      "code = tl.where(cm, code, 0)",
      "packed = tl.sum(code << (offs_i * BITS)[None, :], axis=1)",
      "tl.store(packed_ptr + tok * NBYTES + offs_b, packed.to(tl.uint8), mask=offs_b < NBYTES)",
      "tl.store(scale_ptr + tok, scale)", "tl.store(zero_ptr + tok, lo)")
    return make_kernel("append", codes_kernel_name(e), args, _code_consts(c, e.bits), w,
                       c.schedule["scan_warps"], 1)


# Encode the keys ``x [PS, NBP, PER]`` of page ``pg`` (valid where ``cm``) against float32
# ``lo``/``scale`` ``[NBP, PER]`` and store the packed codes (``smask``: whether to store).
_ENCODE = [
    "safe = tl.where(scale > 0, scale, 1.0)",
    "code = _tw_round(tl.math.div_rn(x - lo[None, :, :], safe[None, :, :] + tl.zeros_like(x)),"
    " LEVELS)",
    "code = tl.where(cm, code, 0)",
    "packed = tl.sum(code << (offs_i * BITS)[None, None, :], axis=2)",
    "tok = (pg * HKV + hkv) * PS + offs_t",
    "tl.store(packed_ptr + tok[:, None] * NBYTES + offs_b[None, :], packed.to(tl.uint8),"
    " mask=(offs_b < NBYTES)[None, :] & smask[:, None])",
]

_CHANNELS = ["offs_t = tl.arange(0, PS)", "offs_b = tl.arange(0, NBP)",
             "offs_i = tl.arange(0, PER)", "ch = offs_b[:, None] * PER + offs_i[None, :]",
             "chm = ch < D"]


def _page_keys(fill: str) -> list[str]:
    """Float32 keys ``x [PS, NBP, PER]`` of page ``pg`` with ``fill`` valid slots (``cm``)."""
    return [f"cm = (offs_t < {fill})[:, None, None] & chm[None, :, :]",
            "x = tl.load(k_ptr + ((pg * HKV + hkv) * PS + offs_t)[:, None, None] * D + "
            "ch[None, :, :], mask=cm, other=0.0).to(tl.float32)"]


# Store float32 min/max ``lo``/``hi`` ``[NBP, PER]`` at page ``lead`` in the cache dtype and
# read them back as float32 (exact: they are values of that dtype), then the scale.
_STORE_MINMAX = [
    "side = (lead * HKV + hkv) * D + ch",
    "lo = lo.to(lo_ptr.dtype.element_ty)",
    "hi = hi.to(hi_ptr.dtype.element_ty)",
    # tensor masks only: Triton 3.9's interpreter rejects a tensor mask and-ed with a scalar
    "smask2 = chm & ((lead + tl.zeros_like(ch).to(tl.int64)) >= 0)",
    "tl.store(lo_ptr + side, lo, mask=smask2)",
    "tl.store(hi_ptr + side, hi, mask=smask2)",
    "lo = lo.to(tl.float32)",
    "hi = hi.to(tl.float32)",
    "scale = tl.math.div_rn(hi - lo, LEVELS * 1.0 + tl.zeros_like(lo))",
]


def gen_codes_page(c: Ctx, e: ir.Estimator) -> KernelSpec:
    args = [("k_ptr", c.dtype_ptr), ("pages_ptr", "*i64"), ("fill_ptr", "*i64"),
            ("packed_ptr", "*u8"), ("lo_ptr", c.dtype_ptr), ("hi_ptr", c.dtype_ptr)]
    w = SourceWriter()
    w("pg = tl.load(pages_ptr + tl.program_id(0))", "hkv = tl.program_id(1)",
      "fill = tl.load(fill_ptr + pg).to(tl.int32)", "lead = pg",
      "smask = (pg + tl.zeros([PS], tl.int64)) >= 0",
      *_CHANNELS, *_page_keys("fill"),
      "lo = tl.min(tl.where(cm, x, float('inf')), 0)",
      "hi = tl.max(tl.where(cm, x, float('-inf')), 0)",
      "lo = tl.where((fill > 0) & chm, lo, 0.0)",
      "hi = tl.where((fill > 0) & chm, hi, 0.0)",
      *_STORE_MINMAX, *_ENCODE)
    return make_kernel("append", codes_kernel_name(e), args, _code_consts(c, e.bits), w,
                       c.schedule["scan_warps"], 1)


def gen_codes_group(c: Ctx, e: ir.Estimator) -> KernelSpec:
    """Two passes over the group's pages: the min/max, then the codes (a page's keys are
    loaded twice rather than the whole group held in registers)."""
    args = [("k_ptr", c.dtype_ptr), ("gp_ptr", "*i64"), ("fill_ptr", "*i64"),
            ("packed_ptr", "*u8"), ("lo_ptr", c.dtype_ptr), ("hi_ptr", c.dtype_ptr)]
    fill = "tl.load(fill_ptr + tl.maximum(pg, 0), mask=pg >= 0, other=0)"
    w = SourceWriter()
    w("grp = tl.program_id(0).to(tl.int64) * GRP", "hkv = tl.program_id(1)", *_CHANNELS,
      "lo = tl.full([NBP, PER], float('inf'), tl.float32)",
      "hi = tl.full([NBP, PER], float('-inf'), tl.float32)",
      "count = tl.zeros([1], tl.int32).sum(0)")
    with w.block("for j in range(GRP):"):
        w("pg = tl.load(gp_ptr + grp + j)", f"fill = {fill}.to(tl.int32)",
          "pg = tl.maximum(pg, 0)", *_page_keys("fill"),
          "lo = tl.minimum(lo, tl.min(tl.where(cm, x, float('inf')), 0))",
          "hi = tl.maximum(hi, tl.max(tl.where(cm, x, float('-inf')), 0))",
          "count += fill")
    w("lo = tl.where((count > 0) & chm, lo, 0.0)",
      "hi = tl.where((count > 0) & chm, hi, 0.0)",
      "lead = tl.load(gp_ptr + grp)", *_STORE_MINMAX)
    with w.block("for j in range(GRP):"):
        w("pg = tl.load(gp_ptr + grp + j)",
          "smask = (pg + tl.zeros([PS], tl.int64)) >= 0",
          f"fill = {fill}.to(tl.int32)",
          "pg = tl.maximum(pg, 0)", *_page_keys("fill"), *_ENCODE)
    consts = _code_consts(c, e.bits) | dict(GRP=e.group_pages)
    return make_kernel("append", codes_kernel_name(e), args, consts, w,
                       c.schedule["scan_warps"], 1)
