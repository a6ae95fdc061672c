"""Reading a paged cache back densely: page lists, gathered tensors, memory use.

:class:`CacheReads` is the read side of
:class:`~twilight.runtime.serving.paged_cache.PagedKVCache` (the reference executor, tests and
tools read through it; the generated kernels read the pages in place). It holds no state of its
own and reads the cache's tensors, whose layout the ``paged_cache`` module docstring describes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["CacheReads"]


class CacheReads:
    """Dense reads of a ``PagedKVCache`` (a mixin of it)."""

    def gather_pages(self, req: int | Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Physical page ids ``int64 [B, NP]`` (-1 padded) of the requests (all live ones by
        default) and the valid-token count of each page ``int64 [B, NP]`` (0 on padding).
        Index any ``[cap, ...]`` tensor (summaries, codes) with ``pages.clamp(min=0)``."""
        ids = self.resolve_ids(req)
        idx = torch.tensor(ids, dtype=torch.int64, device=self.device)
        lengths = self.lengths[idx]
        num_pages = math.ceil(int(lengths.max()) / self.page_size) if ids else 0
        pages = self.page_table[idx, :num_pages].to(torch.int64)
        start = torch.arange(num_pages, device=self.device) * self.page_size
        page_valid = (lengths[:, None] - start).clamp(0, self.page_size)
        return pages, page_valid

    def gather_paged(self, t: Tensor, req: int | Sequence[int] | None = None) -> Tensor:
        """``t [cap, Hkv, ...]`` (e.g. a summary, or codes' scale) gathered per request as
        ``[B, Hkv, NP, ...]``, zero on padding pages."""
        pages, page_valid = self.gather_pages(req)
        out = t[pages.clamp(min=0)]  # [B, NP, Hkv, ...]
        mask = (page_valid > 0).view(*pages.shape, *([1] * (t.dim() - 1)))
        return out.masked_fill(~mask, 0).transpose(1, 2)

    def gather_tokens(
        self, t: Tensor, req: int | Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``t [cap, Hkv, ps, ...]`` (K, V, token codes) gathered densely as ``[B, Hkv, Tmax, ...]``,
        zero past each request's length, with ``valid bool [B, Tmax]``."""
        pages, page_valid = self.gather_pages(req)
        lengths = page_valid.sum(1)
        t_max = int(lengths.max()) if lengths.numel() else 0
        out = t[pages.clamp(min=0)].transpose(1, 2)  # [B, Hkv, NP, ps, ...]
        out = out.reshape(*out.shape[:2], pages.shape[1] * self.page_size, *t.shape[3:])
        out = out[:, :, :t_max]
        valid = torch.arange(t_max, device=self.device) < lengths[:, None]
        mask = valid.view(valid.shape[0], 1, t_max, *([1] * (t.dim() - 3)))
        return out.masked_fill(~mask, 0), valid

    def gather(self, req: int | Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Dense ``K, V [B, Hkv, Tmax, D]`` (cache dtype, zero past each length) and
        ``valid bool [B, Tmax]`` of the requests (all live ones, by id, by default)."""
        k, valid = self.gather_tokens(self.k_pages, req)
        v, _ = self.gather_tokens(self.v_pages, req)
        return k, v, valid

    def memory_bytes(self) -> dict[str, int]:
        """Bytes allocated by component (capacity, not use), with their ``"total"``."""
        parts = {
            "k_pages": self.k_pages,
            "v_pages": self.v_pages,
            "page_table": self.page_table,
            "lengths": self.lengths,
            "page_fill": self.page_fill,
        }
        parts |= {f"summary:{n}": t for n, t in self.summaries.items()}
        parts |= {f"token_summary:{n}": t for n, t in self.token_summaries.items()}
        if self.v_sum is not None:
            parts["v_sum"] = self.v_sum
        out = {name: t.numel() * t.element_size() for name, t in parts.items()}
        shared = {id(t) for t in self.summaries.values()}
        for spec, codes in self.key_codes.items():  # a page format's lo/hi are summaries
            out[f"key_codes:{spec.name}"] = sum(
                t.numel() * t.element_size() for t in codes.tensors() if id(t) not in shared
            )
        out["total"] = sum(out.values())
        return out
