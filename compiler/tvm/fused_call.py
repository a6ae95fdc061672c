"""Calling the fused module (``fused.py``) on the hot path: the argument list of each entry point
is assembled once per (plan, cache tensors) and reused; a call fills in the query, the new
token's K/V, the request rows and the output, then makes one FFI call.

The cache's tensors change only when the cache reallocates them (``PagedCache.generation``),
so their alignment is checked then, not every step. Scratch is the plan's (allocated aligned).
"""

from __future__ import annotations

import torch

from ..keycodes import KeyCodeSpec
from ..stages import PagedCache
from .build import Kernel, check_aligned
from .context import StageCtx
from .fused import code_buffers, summary_buffers

PER_CALL = ("q", "knew", "vnew", "rows", "out")


def cache_buffers(ctx: StageCtx, cache: PagedCache) -> dict[str, torch.Tensor]:
    """The fused module's names for ``cache``'s tensors."""
    out = {"table": cache.page_table, "lengths": cache.lengths, "fill": cache.page_fill,
           "kp": cache.k_pages, "vp": cache.v_pages}
    for name, buf in summary_buffers(ctx).items():
        out[buf] = cache.summaries[name]
    for extra in ("key.min", "key.max"):
        if extra in cache.summaries:
            out["sum_" + extra.replace(".", "_")] = cache.summaries[extra]
    for spec in KeyCodeSpec.of_pipeline(ctx.p):
        for buf, t in zip(code_buffers(ctx, spec), cache.key_codes[spec].tensors(), strict=True):
            out[buf] = t
    return out


class FusedCall:
    """The entry points of one fused kernel over one plan's scratch."""

    def __init__(self, ctx: StageCtx, kernel: Kernel, scratch: dict[str, torch.Tensor],
                 tables: dict[str, torch.Tensor]):
        self.ctx, self.scratch, self.tables = ctx, scratch, tables
        self.names = kernel.source.entries
        self.fns = {e: kernel.entry(e) for e in self.names}
        self._args: dict[str, list] = {}
        self._slots = {e: {n: i for i, n in enumerate(names) if n in PER_CALL}
                       for e, names in self.names.items()}
        self._cache_key: tuple | None = None

    def _refresh(self, cache: PagedCache) -> None:
        key = (id(cache), cache.generation)
        if key == self._cache_key:
            return
        fixed = {**cache_buffers(self.ctx, cache), **self.tables, **self.scratch}
        for t in fixed.values():
            check_aligned(t, "fused")
        self._args = {e: [fixed.get(n) for n in names] for e, names in self.names.items()}
        self._cache_key = key

    def __call__(self, entry: str, cache: PagedCache, **per_call: torch.Tensor) -> None:
        """Run ``entry`` (``"run"`` or ``"step"``); ``per_call`` holds ``q``, ``rows``, ``out``
        (and ``knew``/``vnew`` for ``step``), aligned and contiguous (the caller's check)."""
        self._refresh(cache)
        args, slots = self._args[entry], self._slots[entry]
        for name, i in slots.items():
            t = args[i] = per_call[name]
            check_aligned(t, f"fused {entry}")  # a misaligned buffer can crash the process
        self.fns[entry](*args)
