"""Low-precision key formats for the top-p pruner's weight estimate.

Asymmetric min-max quantization, computed in float32 whatever the input dtype, at three
granularities (a :class:`KeyCodeSpec`):

* ``"token"`` (Twilight's published estimator): per token, over its ``head_dim`` channels,
  ``zero = min(x)``, ``scale = (max(x) - min(x)) / (2**bits - 1)``; one float32 scale and zero
  per token. With ``smooth = α`` the token is first divided channel-wise by factors
  ``s [Hkv, D]`` (:func:`fit_smoothing`: each channel's absolute maximum to the power α, on the
  cache's first append), and the estimate multiplies the
  query by ``s``: ``q·k = (q∘s)·(k/s)``. A few outlier channels then no longer set the range
  that every other channel is rounded to.
* ``"page"`` (KIVI-style, per channel): per page and KV head, over the page's *valid* tokens,
  ``zero[c] = min(x[:, c])``, ``scale[c] = (max - min) / (2**bits - 1)``. ``min``/``max`` are
  exactly Quest's page summary, kept in the cache dtype (the min or max of values of a dtype is
  a value of that dtype, so nothing is rounded), and shared with it when the pipeline has it.
* ``"group"``: per channel over the valid tokens of ``group_pages`` consecutive pages of a
  request; the min/max are stored once per group (at the group's first page).

``code = clamp(round((x - zero) / scale), 0, 2**bits - 1)`` and ``dequant = code * scale + zero``,
so ``|x - dequant(x)| <= scale / 2`` (plus float32 rounding). When ``max == min`` the scale is 0,
every code is 0 and the dequantized value is exact; nothing divides by zero. Codes of non-finite
inputs are unspecified (0 after ``nan_to_num``), never an error.

Codes are packed into ``uint8``: 8 bits one code a byte, 4 bits two (channel ``2j`` in the low
nibble, ``2j+1`` in the high one), 2 bits four (channel ``4j+i`` at bit ``2i``). The last byte is
zero-padded when ``head_dim * bits`` is not a multiple of 8.

Bytes read per candidate token and KV head (:func:`bytes_per_token`), with
``packed = ceil(head_dim * bits / 8)`` and ``e`` the cache dtype's size (2 for fp16/bf16):

* token (smoothed or not): ``packed + 8`` (float32 scale and zero; the smoothing factors are
  ``4 * head_dim`` bytes per KV head for the whole cache);
* page: ``packed + 2 * e * head_dim / page_size`` (the page's min and max per channel). When
  Quest's summary is shared, the cache stores only the packed codes beyond what Quest keeps;
* group of ``G`` pages: ``packed + 2 * e * head_dim / (page_size * G)``.

Example:
    >>> import torch
    >>> x = torch.randn(2, 5, 64)
    >>> packed, scale, zero = quantize_token(x, bits=4)
    >>> packed.shape, packed.dtype, scale.shape
    (torch.Size([2, 5, 32]), torch.uint8, torch.Size([2, 5]))
    >>> err = (dequantize_token(packed, scale, zero, bits=4, head_dim=64) - x).abs()
    >>> bool((err <= scale[..., None] / 2 + 1e-6).all())
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ir
from .ir import GRANULARITIES, code_name, code_problem

__all__ = [
    "GRANULARITIES",
    "SUPPORTED_BITS",
    "KeyCodeSpec",
    "bytes_per_token",
    "channel_extreme",
    "codes_from_minmax",
    "dequantize_minmax",
    "dequantize_token",
    "fit_smoothing",
    "minmax_summaries",
    "pack_codes",
    "packed_bytes",
    "quantize_page",
    "quantize_token",
    "unpack_codes",
]

SUPPORTED_BITS = (2, 4, 8)


@dataclass(frozen=True)
class KeyCodeSpec:
    """One quantized-key format kept by the cache: ``bits`` in (2, 4, 8), ``granularity`` in
    ("token", "page", "group"), ``group_pages`` (≥ 2, a power of two, for "group" only) and
    ``smooth`` (per-channel smoothing strength α in (0, 1], 0 for none; "token" only).

    >>> KeyCodeSpec(4, "page").name, KeyCodeSpec(4, "group", 4).name
    ('int4_page', 'int4_group4')
    """

    bits: int
    granularity: str = "token"
    group_pages: int = 1
    smooth: float = 0.0

    def __post_init__(self) -> None:
        problem = code_problem(self.bits, self.granularity, self.group_pages, self.smooth)
        if problem:
            raise ValueError(f"KeyCodeSpec: {problem}")

    @classmethod
    def of(cls, estimator) -> KeyCodeSpec:
        """The format a quantized ``ir.Estimator`` reads."""
        return cls(estimator.bits, estimator.granularity, estimator.group_pages,
                   estimator.smooth)

    @classmethod
    def of_pipeline(cls, p, granularity: str | None = None) -> list[KeyCodeSpec]:
        """The distinct formats the quantized estimators of pipeline IR ``p`` read (of one
        ``granularity``, if given), in pruner order: what its cache keeps and its append
        kernels write."""
        specs = dict.fromkeys(cls.of(e) for e in p.estimators() if e.kind == "quantized")
        return [s for s in specs if granularity in (None, s.granularity)]

    @property
    def name(self) -> str:
        return code_name(self.bits, self.granularity, self.group_pages, self.smooth)


def minmax_summaries(p: ir.PipelineIR) -> tuple[str, str] | None:
    """Names of the pipeline's summary fields that are exactly the per-channel key min and max
    of a page (Quest's ``kmin``/``kmax``), which page-granularity codes then share; None if it
    has none (the cache keeps its own)."""
    found: dict[str, str] = {}
    page_k = ir.Expr("page_k", (), ())
    for s in p.summaries():
        for f in s.fields:
            e = f.expr
            if e.op in ("reduce_min", "reduce_max") and e.inputs == (page_k,) \
                    and e.attrs == (("axis", "token"),):
                found.setdefault(e.op[7:], f"{s.name}.{f.name}")
    return (found["min"], found["max"]) if len(found) == 2 else None


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def packed_bytes(head_dim: int, bits: int) -> int:
    """Bytes that one token's ``head_dim`` codes take once packed."""
    return math.ceil(head_dim * _check_bits(bits) / 8)


def bytes_per_token(spec: KeyCodeSpec, head_dim: int, page_size: int,
                    elem_bytes: int = 2) -> float:
    """Bytes read per candidate token and KV head of ``spec``: packed codes plus its share of
    scale and zero (``elem_bytes``: the cache dtype's size, for the per-channel min/max).

    >>> [bytes_per_token(KeyCodeSpec(4, g, n), 128, 16) for g, n in
    ...  (("token", 1), ("page", 1), ("group", 4))]
    [72.0, 96.0, 72.0]
    """
    codes = packed_bytes(head_dim, spec.bits)
    if spec.granularity == "token":
        return float(codes + 8)
    return codes + 2 * elem_bytes * head_dim / (page_size * spec.group_pages)


def _shifts(bits: int, device: torch.device) -> Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes ``[..., D]`` (values in ``[0, 2**bits)``) into ``uint8 [..., ceil(D*bits/8)]``."""
    per_byte = 8 // _check_bits(bits)
    c = codes.to(torch.uint8)
    if per_byte == 1:
        return c.contiguous()
    pad = (-c.shape[-1]) % per_byte
    if pad:
        c = torch.cat([c, c.new_zeros(*c.shape[:-1], pad)], dim=-1)
    c = c.reshape(*c.shape[:-1], -1, per_byte) << _shifts(bits, c.device)
    # The shifted fields never overlap, so a sum is a bitwise or.
    return c.sum(-1, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int, head_dim: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [..., nbytes]`` to ``uint8`` codes ``[..., head_dim]``."""
    per_byte = 8 // _check_bits(bits)
    if per_byte == 1:
        return packed[..., :head_dim]
    mask = (1 << bits) - 1
    c = (packed[..., None] >> _shifts(bits, packed.device)) & mask
    return c.reshape(*packed.shape[:-1], -1)[..., :head_dim]


def _encode(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Codes of float32 ``x`` given broadcastable float32 ``scale`` and ``zero``, unpacked."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((x - zero) / safe)
    q = torch.nan_to_num(q, nan=0.0).clamp_(0, (1 << bits) - 1)
    return q.to(torch.uint8)


def quantize_token(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token min-max quantization over the last dim of ``x [..., D]``.

    Returns ``(packed uint8 [..., ceil(D*bits/8)], scale float32 [...], zero float32 [...])``.
    """
    levels = (1 << _check_bits(bits)) - 1
    xf = x.float()
    zero = xf.amin(-1)
    scale = (xf.amax(-1) - zero) / levels
    codes = _encode(xf, scale[..., None], zero[..., None], bits)
    return pack_codes(codes, bits), scale, zero


def dequantize_token(
    packed: Tensor, scale: Tensor, zero: Tensor, bits: int, head_dim: int
) -> Tensor:
    """Float32 ``[..., head_dim]`` values of per-token codes."""
    codes = unpack_codes(packed, bits, head_dim).float()
    return codes * scale[..., None] + zero[..., None]


def quantize_page(x: Tensor, valid: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel min-max quantization within a page (or any set of tokens).

    ``x [..., n, D]`` holds one page per leading index, ``valid [..., n]`` (bool, broadcastable
    to ``x.shape[:-1]``) marks its filled slots; the min and max run over valid tokens only.
    Returns ``(packed uint8 [..., n, nbytes], lo float32 [..., D], hi float32 [..., D])``: the
    per-channel min and max, i.e. zero point and ``scale = (hi - lo) / (2**bits - 1)``.
    Invalid slots get code 0; a page without valid tokens gets ``lo = hi = 0``.
    """
    xf = x.float()
    lo, hi = channel_extreme(xf, valid, "min"), channel_extreme(xf, valid, "max")
    return codes_from_minmax(xf, valid, lo, hi, bits), lo, hi


def channel_extreme(x: Tensor, valid: Tensor, which: str) -> Tensor:
    """Per-channel ``"min"`` or ``"max"`` ``[..., D]`` of ``x [..., n, D]`` over the tokens
    marked by ``valid [..., n]`` (broadcastable); 0 where none is valid. The cache's own
    ``key.min``/``key.max`` summaries and page codes' zero point and scale."""
    v = valid.to(torch.bool)[..., None]
    fill = math.inf if which == "min" else -math.inf
    out = getattr(x.masked_fill(~v, fill), f"a{which}")(-2)
    return out.masked_fill(~v.any(-2), 0)


def codes_from_minmax(x: Tensor, valid: Tensor, lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    """Packed codes ``[..., n, nbytes]`` of ``x [..., n, D]`` against per-channel ``lo``/``hi``
    ``[..., D]`` (any float dtype; read as float32). Invalid slots get code 0."""
    levels = (1 << _check_bits(bits)) - 1
    lo, hi = lo.float(), hi.float()
    scale = (hi - lo) / levels
    codes = _encode(x.float(), scale[..., None, :], lo[..., None, :], bits)
    codes = codes.masked_fill(~valid.to(torch.bool)[..., None], 0)
    return pack_codes(codes, bits)


def dequantize_minmax(
    packed: Tensor, lo: Tensor, hi: Tensor, bits: int, head_dim: int
) -> Tensor:
    """Float32 ``[..., n, head_dim]`` values of per-channel codes (``lo``/``hi`` ``[..., D]``)."""
    levels = (1 << _check_bits(bits)) - 1
    lo, hi = lo.float(), hi.float()
    codes = unpack_codes(packed, bits, head_dim).float()
    return codes * ((hi - lo) / levels)[..., None, :] + lo[..., None, :]


def fit_smoothing(k: Tensor, alpha: float = 1.0) -> Tensor:
    """Per-channel smoothing factors ``float32 [Hkv, D]`` of keys ``k [Hkv, n, D]``: each
    channel's absolute maximum over the finite values, floored at 1e-3 of the head's largest
    (so that a silent channel is not blown up), to the power ``alpha``; 1 for a head with no
    signal at all. ``alpha = 1`` flattens every channel to the range [-1, 1]; smaller values
    (SmoothQuant's migration strength) flatten less."""
    kf = k.float()
    a = torch.where(torch.isfinite(kf), kf.abs(), torch.zeros_like(kf)).amax(-2)  # [Hkv, D]
    top = a.amax(-1, keepdim=True)
    s = torch.maximum(a, 1e-3 * top)
    s = s if alpha == 1 else s.pow(alpha)
    return torch.where(top > 0, s, torch.ones_like(s)).contiguous()
