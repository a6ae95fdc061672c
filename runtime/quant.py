"""Low-precision key formats for the top-p pruner's weight estimate.

Two granularities of asymmetric min-max quantization, both computed in float32 whatever the
input dtype:

* ``"token"`` (Twilight's published estimator): per token, over its ``head_dim`` channels,
  ``zero = min(x)``, ``scale = (max(x) - min(x)) / (2**bits - 1)``, one float32 scale and zero
  per token.
* ``"page"`` (KIVI-style, per channel): per page and KV head, over the page's *valid* tokens,
  ``zero[c] = min(x[:, c])``, ``scale[c] = (max - min) / (2**bits - 1)``. This is the Quest
  min/max page summary reused as zero point and scale; it survives outlier key channels that
  flatten every other channel under per-token quantization (ALGORITHMS.md, "Where the published
  estimator breaks").

``code = clamp(round((x - zero) / scale), 0, 2**bits - 1)`` and ``dequant = code * scale + zero``,
so ``|x - dequant(x)| <= scale / 2`` (plus float32 rounding). When ``max == min`` the scale is 0,
every code is 0 and the dequantized value is exact; nothing divides by zero. Codes of non-finite
inputs are unspecified (0 after ``nan_to_num``), never an error.

Codes are packed into ``uint8``: 8 bits one code a byte, 4 bits two (channel ``2j`` in the low
nibble, ``2j+1`` in the high one), 2 bits four (channel ``4j+i`` at bit ``2i``). The last byte is
zero-padded when ``head_dim * bits`` is not a multiple of 8.

Bytes per token and KV head (:func:`bytes_per_token`), with ``packed = ceil(head_dim * bits / 8)``:

* token granularity: ``packed + 8`` (float32 scale and zero);
* page granularity: ``packed + 8 * head_dim / page_size`` (float32 scale and zero per channel,
  shared by the page's tokens).

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

__all__ = [
    "GRANULARITIES",
    "SUPPORTED_BITS",
    "KeyCodeSpec",
    "bytes_per_token",
    "dequantize_page",
    "dequantize_token",
    "pack_codes",
    "packed_bytes",
    "quantize_page",
    "quantize_token",
    "unpack_codes",
]

SUPPORTED_BITS = (2, 4, 8)
GRANULARITIES = ("token", "page")


@dataclass(frozen=True)
class KeyCodeSpec:
    """One quantized-key format kept by the cache: ``bits`` in (2, 4, 8), ``granularity`` in
    ("token", "page").

    >>> KeyCodeSpec(4, "page").name
    'int4_page'
    """

    bits: int
    granularity: str = "token"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"KeyCodeSpec.bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"KeyCodeSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )

    @property
    def name(self) -> str:
        return f"int{self.bits}_{self.granularity}"


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def packed_bytes(head_dim: int, bits: int) -> int:
    """Bytes that one token's ``head_dim`` codes take once packed."""
    return math.ceil(head_dim * _check_bits(bits) / 8)


def bytes_per_token(spec: KeyCodeSpec, head_dim: int, page_size: int) -> float:
    """Bytes per token and KV head of ``spec``: packed codes plus its share of scale and zero.

    >>> bytes_per_token(KeyCodeSpec(4, "token"), 128, 16), bytes_per_token(KeyCodeSpec(4, "page"), 128, 16)
    (72.0, 128.0)
    """
    codes = packed_bytes(head_dim, spec.bits)
    if spec.granularity == "token":
        return float(codes + 8)
    return codes + 8 * head_dim / page_size


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
    """Per-channel min-max quantization within a page.

    ``x [..., ps, D]`` holds one page per leading index, ``valid [..., ps]`` (bool, broadcastable
    to ``x.shape[:-1]``) marks its filled slots; the min and max run over valid tokens only.
    Returns ``(packed uint8 [..., ps, nbytes], scale float32 [..., D], zero float32 [..., D])``.
    Invalid slots get code 0; a page without valid tokens gets scale 0 and zero 0.
    """
    levels = (1 << _check_bits(bits)) - 1
    xf = x.float()
    v = valid.to(torch.bool)[..., None]
    lo = xf.masked_fill(~v, math.inf).amin(-2)
    hi = xf.masked_fill(~v, -math.inf).amax(-2)
    any_valid = v.any(-2)
    zero = torch.where(any_valid, lo, torch.zeros_like(lo))
    scale = torch.where(any_valid, (hi - lo) / levels, torch.zeros_like(lo))
    codes = _encode(xf, scale[..., None, :], zero[..., None, :], bits)
    codes = codes.masked_fill(~v, 0)
    return pack_codes(codes, bits), scale, zero


def dequantize_page(
    packed: Tensor, scale: Tensor, zero: Tensor, bits: int, head_dim: int
) -> Tensor:
    """Float32 ``[..., ps, head_dim]`` values of per-page codes (``scale``/``zero`` ``[..., D]``)."""
    codes = unpack_codes(packed, bits, head_dim).float()
    return codes * scale[..., None, :] + zero[..., None, :]
