"""A paged cache's side data: page summaries, token summaries and key codes, allocated and kept
on append.

:class:`SideData` is the part of :class:`~twilight.runtime.serving.paged_cache.PagedKVCache`
that allocates the side data and re-encodes what an append touched — in torch, or through an
:class:`Appender` (a backend's generated append kernels) when the cache has one. It holds no
state of its own: it reads and writes the cache's tensors (``k_pages``, ``page_fill``,
``summaries``, ``token_summaries``, ``key_codes``, ...), whose layout the ``paged_cache`` module
docstring describes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ...compiler.keycodes import (
    KeyCodeSpec,
    codes_from_minmax,
    packed_bytes,
    quantize_page,
    quantize_token,
)
from ...errors import InputError

__all__ = ["Appender", "KeyCodes", "SideData", "SummaryFn", "TokenSummaryFn"]

SummaryFn = Callable[[Tensor, Tensor], Tensor]
"""``(keys float32 [P, Hkv, ps, D], valid bool [P, ps]) -> [P, Hkv, C]``."""

TokenSummaryFn = Callable[[Tensor], Tensor]
"""``(keys float32 [N, Hkv, D]) -> [N, Hkv, C]``: a map of each key."""


@dataclass
class KeyCodes:
    """Quantized keys of one :class:`KeyCodeSpec`, indexed by physical page first: ``packed``
    codes with ``scale``/``zero`` (+ ``smooth``) for "token", ``lo``/``hi`` otherwise."""

    packed: Tensor
    scale: Tensor | None = None
    zero: Tensor | None = None
    lo: Tensor | None = None
    hi: Tensor | None = None
    smooth: Tensor | None = None

    def tensors(self) -> tuple[Tensor, ...]:
        """What an estimate kernel reads, in its argument order: ``packed, scale, zero[,
        smooth]`` (token) or ``packed, lo, hi`` (page, group)."""
        side = (self.scale, self.zero, self.smooth) if self.lo is None else (self.lo, self.hi)
        return (self.packed, *(t for t in side if t is not None))


class Appender(Protocol):
    """Generated kernels that keep a cache's side data on append, in place of the torch code
    here (a backend's ``StageKernels`` is one: ``compiler.backend``). They must write exactly
    what the torch code writes, and cover every summary and key-code format of the cache (a
    cache from ``make_cache`` for the same pipeline)."""

    def refresh_pages(self, cache, pages: Tensor) -> None: ...

    def refresh_tokens(self, cache, phys: Tensor, slot: Tensor) -> None: ...

    def refresh_groups(self, cache, gp: Tensor) -> None: ...


class SideData:
    """Side-data updates of a ``PagedKVCache`` (a mixin of it)."""

    # ---- allocation ------------------------------------------------------------------------

    def _new_summary(self, name: str, fn: SummaryFn, pages: int) -> Tensor:
        probe = torch.zeros(1, self.num_kv_heads, self.page_size, self.head_dim, device=self.device)
        out = fn(probe, torch.ones(1, self.page_size, dtype=torch.bool, device=self.device))
        if out.dim() != 3 or tuple(out.shape[:2]) != (1, self.num_kv_heads):
            raise InputError(
                f"summary {name!r}: expected [P, num_kv_heads={self.num_kv_heads}, C] from pages "
                f"[P, {self.num_kv_heads}, {self.page_size}, {self.head_dim}], got {tuple(out.shape)}"
            )
        return torch.zeros(
            pages, self.num_kv_heads, out.shape[2], dtype=self.dtype, device=self.device
        )

    def _new_token_summary(self, name: str, fn: TokenSummaryFn, pages: int) -> Tensor:
        probe = torch.zeros(1, self.num_kv_heads, self.head_dim, device=self.device)
        out = fn(probe)
        if out.dim() != 3 or tuple(out.shape[:2]) != (1, self.num_kv_heads):
            raise InputError(f"token summary {name!r}: expected [N, num_kv_heads="
                             f"{self.num_kv_heads}, C] from keys [N, {self.num_kv_heads}, "
                             f"{self.head_dim}], got {tuple(out.shape)}")
        return torch.zeros(pages, self.num_kv_heads, self.page_size, out.shape[2],
                           dtype=self.dtype, device=self.device)

    def _new_codes(self, spec: KeyCodeSpec, pages: int) -> KeyCodes:
        h, ps, d = self.num_kv_heads, self.page_size, self.head_dim
        packed = torch.zeros(
            pages, h, ps, packed_bytes(d, spec.bits), dtype=torch.uint8, device=self.device
        )
        if spec.granularity == "token":
            side = dict(dtype=torch.float32, device=self.device)
            smooth = torch.ones(h, d, **side) if spec.smooth else None
            return KeyCodes(packed, torch.zeros(pages, h, ps, **side),
                            torch.zeros(pages, h, ps, **side), smooth=smooth)
        if spec.granularity == "page":  # lo/hi are linked to the min/max summaries
            return KeyCodes(packed)
        side = dict(dtype=self.dtype, device=self.device)
        return KeyCodes(packed, lo=torch.zeros(pages, h, d, **side),
                        hi=torch.zeros(pages, h, d, **side))

    def _link_minmax(self) -> None:
        """Point every page-granularity format's ``lo``/``hi`` at the min/max summaries."""
        for spec, codes in self.key_codes.items():
            if spec.granularity == "page":
                lo, hi = self.minmax_summaries
                codes.lo, codes.hi = self.summaries[lo], self.summaries[hi]

    # ---- refresh after an append ---------------------------------------------------------

    # ---- refresh on append ------------------------------------------------------------------

    def _refresh_side(self, k_tok: Tensor, ids: list[int], old: list[int], n: int,
                      phys: Tensor, slot: Tensor) -> None:
        """Side data of the ``n`` tokens just written at ``(phys, slot)`` for requests ``ids``
        (``old``: their lengths before), through the appender's kernels when there is one."""
        if self.appender is not None:  # the backend's generated append kernels
            self._refresh_generated(ids, old, n, phys, slot)
            return
        for name, fn in self.token_summary_fns.items():
            self.token_summaries[name][phys, :, slot] = fn(k_tok.float()).to(self.dtype)
        self._update_token_codes(k_tok, phys, slot)
        self._update_pages(torch.unique(phys))
        if any(sp.granularity == "group" for sp in self.key_code_specs):
            self._update_groups(ids, old, n)

    def _refresh_generated(self, ids: list[int], old: list[int], n: int, phys: Tensor,
                           slot: Tensor) -> None:
        """What the torch ``_update_*`` methods below do, through ``self.appender``."""
        app = self.appender
        if self.token_summaries or any(sp.granularity == "token" for sp in self.key_code_specs):
            app.refresh_tokens(self, phys, slot)
        app.refresh_pages(self, torch.unique(phys))
        for g in sorted({sp.group_pages for sp in self.key_code_specs
                         if sp.granularity == "group"}):
            app.refresh_groups(self, self.group_pages(ids, old, [o + n - 1 for o in old], g))

    def _update_token_codes(self, k_tok: Tensor, phys: Tensor, slot: Tensor) -> None:
        for spec, codes in self.key_codes.items():
            if spec.granularity == "token":
                x = k_tok.float() / codes.smooth if spec.smooth else k_tok
                packed, scale, zero = quantize_token(x, spec.bits)
                codes.packed[phys, :, slot] = packed
                codes.scale[phys, :, slot] = scale
                codes.zero[phys, :, slot] = zero

    def _update_pages(self, pages: Tensor) -> None:
        """Recompute summaries and page-granularity codes of ``pages`` over their valid tokens."""
        keys = self.k_pages[pages].float()  # [P, Hkv, ps, D]
        valid = torch.arange(self.page_size, device=self.device) < self.page_fill[pages, None]
        for name, fn in self.summary_fns.items():
            self.summaries[name][pages] = fn(keys, valid).to(self.dtype)
        for spec, codes in self.key_codes.items():
            if spec.granularity == "page":  # zero point and scale: the stored min/max summary
                codes.packed[pages] = codes_from_minmax(
                    keys, valid[:, None, :], codes.lo[pages], codes.hi[pages], spec.bits)

    def group_pages(self, ids: Sequence[int], first: Sequence[int], last: Sequence[int],
                    g: int) -> Tensor:
        """Physical pages ``int64 [N, g]`` (-1 where not allocated) of every group of ``g``
        logical pages holding token positions ``first[i]..last[i]`` of request ``ids[i]``."""
        rows = []
        ps = self.page_size
        for r, a, b in zip(ids, first, last, strict=True):
            for grp in range(a // ps // g, b // ps // g + 1):
                rows.append((r, grp * g))
        if not rows:
            return torch.zeros(0, g, dtype=torch.int64, device=self.device)
        r = torch.tensor([x[0] for x in rows], device=self.device)
        start = torch.tensor([x[1] for x in rows], device=self.device)
        cols = start[:, None] + torch.arange(g, device=self.device)
        ok = cols < self.page_table.shape[1]
        pages = self.page_table[r[:, None], cols.clamp(max=self.page_table.shape[1] - 1)]
        return torch.where(ok, pages.to(torch.int64), -1)

    def _update_groups(self, ids: list[int], old: list[int], n: int) -> None:
        """Re-encode every group-granularity group the append touched, over its valid tokens."""
        for spec in self.key_code_specs:
            if spec.granularity != "group":
                continue
            gp = self.group_pages(ids, old, [o + n - 1 for o in old], spec.group_pages)
            self.encode_groups(spec, gp)

    def encode_groups(self, spec: KeyCodeSpec, gp: Tensor) -> None:
        """Min/max (at each group's first page) and codes of the groups ``gp int64 [N, G]``."""
        codes, ps = self.key_codes[spec], self.page_size
        n, g = gp.shape
        if n == 0:
            return
        pg = gp.clamp(min=0)
        keys = self.k_pages[pg].float()  # [N, G, Hkv, ps, D]
        keys = keys.transpose(1, 2).reshape(n, self.num_kv_heads, g * ps, self.head_dim)
        fill = torch.where(gp >= 0, self.page_fill[pg], 0)  # [N, G]
        valid = (torch.arange(ps, device=self.device) < fill[..., None]).reshape(n, g * ps)
        packed, lo, hi = quantize_page(keys, valid[:, None, :], spec.bits)
        codes.lo[gp[:, 0]] = lo.to(self.dtype)
        codes.hi[gp[:, 0]] = hi.to(self.dtype)
        packed = packed.reshape(n, self.num_kv_heads, g, ps, -1).transpose(1, 2)
        live = gp >= 0
        codes.packed[gp[live]] = packed[live]

    def set_smoothing(self, spec: KeyCodeSpec, factors: Tensor) -> None:
        """Use ``factors float32 [Hkv, D]`` (positive) for the smoothed format ``spec`` instead
        of fitting them on the first append; tokens already stored are re-encoded."""
        if spec not in self.smoothing_fitted:
            raise InputError(f"set_smoothing: the cache keeps no smoothed format {spec.name}")
        want = (self.num_kv_heads, self.head_dim)
        if not isinstance(factors, Tensor) or tuple(factors.shape) != want \
                or not bool(((factors > 0) & torch.isfinite(factors)).all()):
            raise InputError(f"factors: expected positive finite values of shape {list(want)}, "
                             f"got {tuple(getattr(factors, 'shape', ()))}")
        codes = self.key_codes[spec]
        codes.smooth.copy_(factors.to(codes.smooth))
        self.smoothing_fitted[spec] = True
        used = torch.nonzero(self.page_fill > 0).flatten()
        if used.numel():
            k = self.k_pages[used].float() / codes.smooth[:, None, :]  # [P, Hkv, ps, D]
            codes.packed[used], codes.scale[used], codes.zero[used] = quantize_token(k, spec.bits)
