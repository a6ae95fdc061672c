"""Cache side: page summaries from the summary expressions, and quantized keys.

* ``append_summary`` — one program per (touched page, KV head): loads the page's keys
  ``[page_size, D]`` (valid slots only), evaluates each field of the pipeline's summary with
  the expression emitter (token reductions mask invalid slots), stores ``[C]`` per field.
* ``append_codes_token<bits>`` — one program per (new token, KV head): per-token min-max over
  head_dim, codes packed ``8 // bits`` per byte (channel ``PER·j + i`` at bit ``bits·i``).
* ``append_codes_page<bits>`` — one program per (touched page, KV head): per-channel min-max
  over the page's valid tokens; invalid slots get code 0; an empty page scale 0 and zero 0.

Divisions are ``div_rn`` and rounding is half-to-even so codes equal torch's bit for bit.
"""

from __future__ import annotations

from .. import ir
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
            ("chan_ptr", "*i32")]
    args += [(f"out{i}_ptr", c.dtype_ptr) for i in range(len(summary.fields))]
    em = Emitter(leaves, full, c.tables, prefix="s")
    stores = []
    for i, f in enumerate(summary.fields):
        v = em.emit(f.expr)
        cf, lanes = expr_width(f.expr, sh.head_dim), v.chan.lanes or v.chan.idx
        stores.append(f"tl.store(out{i}_ptr + (pg * HKV + hkv) * {cf} + {lanes}[None, :], "
                      f"{v.src} + tl.zeros([1, {next_pow2(cf)}], tl.float32), "
                      f"mask=({lanes} < {cf})[None, :])")
    body = ["pg = tl.load(pages_ptr + tl.program_id(0))", "hkv = tl.program_id(1)",
            "rcount = tl.load(fill_ptr + pg).to(tl.int32)",
            "offs_t = tl.arange(0, PS)", "rmask = offs_t < rcount",
            "offs_d = tl.arange(0, BD)", "dmask = offs_d < D",
            "base = (pg * HKV + hkv) * PS"] + em.lines + stores
    consts = dict(HKV=sh.kv_heads, D=sh.head_dim, BD=next_pow2(sh.head_dim), PS=sh.page_size)
    return make_kernel("append", f"append_summary_{summary.name}", args, consts, body,
                       c.schedule["scan_warps"], 1)


def _code_consts(c: Ctx, bits: int) -> dict:
    per = 8 // bits
    nbytes = -(-c.shape.head_dim * bits // 8)
    return dict(HKV=c.shape.kv_heads, D=c.shape.head_dim, PS=c.shape.page_size, BITS=bits,
                PER=per, NBYTES=nbytes, NBP=next_pow2(nbytes), LEVELS=(1 << bits) - 1)


_PACK = ["code = tl.where(cm, code, 0)",
         "packed = tl.sum(code << (offs_i * BITS)[None, :], axis=1)"]


def gen_codes_token(c: Ctx, bits: int) -> KernelSpec:
    args = [("k_ptr", c.dtype_ptr), ("phys_ptr", "*i64"), ("slot_ptr", "*i64"),
            ("packed_ptr", "*u8"), ("scale_ptr", "*fp32"), ("zero_ptr", "*fp32")]
    body = ["t = tl.program_id(0)", "hkv = tl.program_id(1)",
            "tok = (tl.load(phys_ptr + t) * HKV + hkv) * PS + tl.load(slot_ptr + t)",
            "offs_b = tl.arange(0, NBP)", "offs_i = tl.arange(0, PER)",
            "ch = offs_b[:, None] * PER + offs_i[None, :]", "cm = ch < D",
            "x = tl.load(k_ptr + tok * D + ch, mask=cm, other=0.0).to(tl.float32)",
            "lo = tl.min(tl.min(tl.where(cm, x, float('inf')), 1), 0)",
            "hi = tl.max(tl.max(tl.where(cm, x, float('-inf')), 1), 0)",
            "scale = tl.math.div_rn(hi - lo, LEVELS * 1.0)",
            "safe = tl.where(scale > 0, scale, 1.0)",
            "code = _tw_round(tl.math.div_rn(x - lo, safe + tl.zeros_like(x)), LEVELS)"] + _PACK
    body += ["tl.store(packed_ptr + tok * NBYTES + offs_b, packed.to(tl.uint8), "
             "mask=offs_b < NBYTES)",
             "tl.store(scale_ptr + tok, scale)", "tl.store(zero_ptr + tok, lo)"]
    return make_kernel("append", f"append_codes_token{bits}", args, _code_consts(c, bits), body,
                       c.schedule["scan_warps"], 1)


def gen_codes_page(c: Ctx, bits: int) -> KernelSpec:
    args = [("k_ptr", c.dtype_ptr), ("pages_ptr", "*i64"), ("fill_ptr", "*i64"),
            ("packed_ptr", "*u8"), ("scale_ptr", "*fp32"), ("zero_ptr", "*fp32")]
    body = ["pg = tl.load(pages_ptr + tl.program_id(0))", "hkv = tl.program_id(1)",
            "fill = tl.load(fill_ptr + pg).to(tl.int32)",
            "offs_t = tl.arange(0, PS)", "offs_b = tl.arange(0, NBP)",
            "offs_i = tl.arange(0, PER)",
            "ch = offs_b[:, None] * PER + offs_i[None, :]",
            "cm = (offs_t < fill)[:, None, None] & (ch < D)[None, :, :]",
            "tok = (pg * HKV + hkv) * PS + offs_t",
            "x = tl.load(k_ptr + tok[:, None, None] * D + ch[None, :, :], mask=cm, other=0.0)"
            ".to(tl.float32)",
            "lo = tl.min(tl.where(cm, x, float('inf')), 0)",
            "hi = tl.max(tl.where(cm, x, float('-inf')), 0)",
            "zero = tl.where(fill > 0, lo, 0.0)",
            "scale = tl.where(fill > 0, tl.math.div_rn(hi - lo, LEVELS * 1.0 + tl.zeros_like(lo)),"
            " 0.0)",
            "safe = tl.where(scale > 0, scale, 1.0)",
            "code = _tw_round(tl.math.div_rn(x - zero[None, :, :], safe[None, :, :] + "
            "tl.zeros_like(x)), LEVELS)",
            "code = tl.where(cm, code, 0)",
            "packed = tl.sum(code << (offs_i * BITS)[None, None, :], axis=2)",
            "tl.store(packed_ptr + tok[:, None] * NBYTES + offs_b[None, :], packed.to(tl.uint8),"
            " mask=(offs_b < NBYTES)[None, :])",
            "pm = ch < D",
            "tl.store(scale_ptr + (pg * HKV + hkv) * D + ch, scale, mask=pm)",
            "tl.store(zero_ptr + (pg * HKV + hkv) * D + ch, zero, mask=pm)"]
    return make_kernel("append", f"append_codes_page{bits}", args, _code_consts(c, bits), body,
                       c.schedule["scan_warps"], 1)
