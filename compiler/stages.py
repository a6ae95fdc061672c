"""The stage ABI every backend implements, and the torch reference of each stage.

A pipeline runs as four stages over torch tensors (DLPack-shareable, any device). Backends may
fuse stages, but each stage's inputs and outputs are these, so stages from different backends
can be mixed and every stage can be checked against the reference on its own.

Inputs (from a paged cache — :class:`PagedCache`, which ``runtime``'s ``PagedKVCache`` is —
and the batch's ids):

* ``q [B, Hq, D]`` (fp16/bf16/fp32); ``page_table int32 [B, NP]`` (-1 padded, the batch's rows);
  ``lengths int32 [B]``; ``k_pages``/``v_pages [cap, Hkv, ps, D]``; summaries
  ``[cap, Hkv, C]``; key codes (``cache.key_codes[KeyCodeSpec.of(estimator)].tensors()``)
  ``packed uint8 [cap, Hkv, ps, nbytes]`` with float32 ``scale``/``zero`` ``[cap, Hkv, ps]`` and,
  when smoothed, ``smooth float32 [Hkv, D]`` (token granularity), or the per-channel min/max
  ``lo``/``hi [cap, Hkv, D]`` in the cache dtype (page; group: at each group's first page).

Stages (lists are per *query* head; a group that shares a decision repeats it):

1. **select** → ``cand_idx int32 [B, Hq, C]`` ascending token positions, -1 padded, and
   ``cand_cnt int32 [B, Hq]`` — the selector's choice plus the keep rules (sink, window);
2. **estimate** → ``est_w float32 [B, Hq, C]``: softmax of ``scale · q·K̃`` over the row's
   candidates (aligned with ``cand_idx``; 0 on padding);
3. **prune** → ``kept_idx int32 [B, Hq, K]``, ``kept_cnt int32 [B, Hq]`` (keep-rule tokens are
   always kept);
4. **attend** → ``out [B, Hq, D]`` in q's dtype: exact attention over ``kept_idx``.

The exact answer of each stage lives with the reference executor
(``twilight.runtime.evaluation.reference_stages``, dense masks/weights over ``[B, Hq, T]``);
``lists_to_mask`` and ``rows_to_dense`` below turn a backend's lists into that form.

Every value a stage reads is finite: ``check_query_finite`` refuses a non-finite query at
``run`` and the runtime's cache refuses non-finite keys and values at append (the policy:
``twilight.runtime.serving.checks``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import InputError, NonFiniteInputError


class PagedCache(Protocol):
    """What stage kernels read of a paged KV cache (the layout above; ``runtime``'s
    ``PagedKVCache`` is one). The compiler names only this, never the runtime class."""

    num_kv_heads: int
    head_dim: int
    page_size: int
    k_pages: Tensor
    v_pages: Tensor
    page_table: Tensor
    lengths: Tensor
    page_fill: Tensor
    summaries: dict[str, Tensor]
    token_summaries: dict[str, Tensor]  # [cap, Hkv, ps, C]: per-token maps of the keys
    key_codes: dict[Any, Any]
    v_sum: Tensor | None  # float32 [request slots, Hkv, D]: running sum of V (mean_value)

    def resolve_ids(self, req: int | Sequence[int] | None) -> list[int]: ...

    def gather_pages(self, req: int | Sequence[int] | None = None) -> tuple[Tensor, Tensor]: ...

    # the host bookkeeping a generated append needs (no read of a device tensor)
    generation: int  # bumped whenever the cache reallocates a tensor

    def length(self, rid: int) -> int: ...

    def reserve(self, ids: Sequence[int], n: int = 1) -> None: ...

    def advance(self, ids: Sequence[int], n: int = 1) -> None: ...



@dataclass
class StageInputs:
    """What every stage reads for one batch of requests of a cache."""

    q: Tensor
    page_table: Tensor  # int32 [B, NP]
    lengths: Tensor  # int32 [B]
    cache: PagedCache
    ids: list[int]

    @property
    def max_len(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0


def stage_inputs(q: Tensor, cache: PagedCache, req=None) -> StageInputs:
    ids = cache.resolve_ids(req)
    pages, page_valid = cache.gather_pages(ids)
    return StageInputs(q, pages.to(torch.int32), page_valid.sum(1).to(torch.int32), cache, ids)


def run_stages(c, x: StageInputs, num_prune: int, return_lists: bool = False):
    """select → (estimate → prune) per pruner → attend, with ``c``'s stage methods (any
    backend's, or a mix): the one place the stage order is written down."""
    idx, cnt = c.select(x)
    for i in range(num_prune):
        w = c.estimate(i, x, idx, cnt)
        idx, cnt = c.prune(i, x, w, idx, cnt)
    out = c.attend(x, idx, cnt)
    return (out, (idx, cnt)) if return_lists else out


def v_sum_of(cache: PagedCache) -> Tensor:
    """The cache's running sum of V (``attention(mean_value=True)`` reads it), or a clear
    error when the cache was made without it."""
    if getattr(cache, "v_sum", None) is None:
        raise InputError("cache: attention(mean_value=True) reads the running sum of V, which "
                         "this cache does not keep; make it with make_cache(pipeline) (or "
                         "PagedKVCache(track_v_sum=True))")
    return cache.v_sum


def check_page_ids(cache: PagedCache, name: str, pages: Tensor, missing_ok: bool = False,
                   slots: Tensor | None = None) -> None:
    """Refuse physical page ids outside the cache's pool (``-1``, "not allocated", only where
    ``missing_ok``) and slots outside ``[0, page_size)`` before a kernel indexes with them: a
    kernel trusts its indices, and one past the pool reads or writes foreign memory. For the
    append (refresh) kernels' entry points, called with ids from outside the cache's own
    bookkeeping; the decode stages read page tables the cache wrote and are not checked."""
    cap = cache.k_pages.shape[0]
    if not isinstance(pages, Tensor) or pages.is_floating_point() or pages.is_complex():
        raise InputError(f"{name}: expected an integer tensor of physical page ids, got "
                         f"{type(pages).__name__} {getattr(pages, 'dtype', '')}")
    if pages.numel():
        lo, hi = int(pages.min()), int(pages.max())
        if lo < (-1 if missing_ok else 0) or hi >= cap:
            allowed = "-1 (none) or " if missing_ok else ""
            raise InputError(f"{name}: page ids must be {allowed}in [0, {cap}) (the cache's "
                             f"pool), got ids from {lo} to {hi}")
    if slots is not None and slots.numel():
        if tuple(slots.shape) != tuple(pages.shape):
            raise InputError(f"{name}: slot {tuple(slots.shape)} must match the page ids "
                             f"{tuple(pages.shape)}")
        if int(slots.min()) < 0 or int(slots.max()) >= cache.page_size:
            raise InputError(f"{name}: slots must lie in [0, page_size={cache.page_size})")


def check_query_finite(q: Tensor, cache: PagedCache, req=None) -> None:
    """Raise ``NonFiniteInputError`` if ``q [B, Hq, D]`` holds NaN or ±inf, naming the first
    request (row ``b`` is request ``req[b]``) and query head that does. Anything that is not a
    floating ``[B, Hq, D]`` tensor passes: the shape checks after this one name it."""
    if not isinstance(q, Tensor) or q.dim() != 3 or not q.is_floating_point():
        return
    if math.isfinite(q.sum(dtype=torch.float64).item()):
        return
    bad = (~torch.isfinite(q)).any(-1).nonzero()  # [n, 2]: (row, head)
    if not bad.numel():  # float64 queries whose finite values overflowed the sum
        return
    b, h = bad[0].tolist()
    try:
        who = f"request {cache.resolve_ids(req)[b]}"
    except Exception:  # noqa: BLE001 - a bad req is reported by the checks that follow
        who = f"row {b}"
    kind = "NaN" if bool(q[b, h].isnan().any()) else "inf"
    more = f" (and {len(bad) - 1} more (request, head) pairs)" if len(bad) > 1 else ""
    raise NonFiniteInputError(f"q: {who}, query head {h} holds {kind}{more}; twilight refuses a "
                              "non-finite query rather than select tokens for it (check the "
                              "model's activations)")


# ---- conversions ----------------------------------------------------------------------------------
def lists_to_mask(idx: Tensor, cnt: Tensor, t: int) -> Tensor:
    """``bool [B, H, t]`` from -1 padded index lists ``[B, H, C]`` with counts ``[B, H]``."""
    live = torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None].long()
    mask = torch.zeros(*idx.shape[:-1], t + 1, dtype=torch.bool, device=idx.device)
    pos = torch.where(live, idx.long(), t)
    return mask.scatter_(-1, pos, True)[..., :t]


def mask_to_lists(mask: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Ascending ``int32`` index lists (-1 padded to ``width``) and counts of a bool mask."""
    t = mask.shape[-1]
    cnt = mask.sum(-1)
    width = int(cnt.max()) if width is None else width
    pos = torch.arange(t, device=mask.device)
    key = torch.where(mask, pos, t + pos).sort(dim=-1).values[..., :width]
    if key.shape[-1] < width:
        key = torch.nn.functional.pad(key, (0, width - key.shape[-1]), value=2 * t)
    return torch.where(key < t, key, -1).to(torch.int32), cnt.to(torch.int32)


def rows_to_dense(values: Tensor, idx: Tensor, cnt: Tensor, t: int) -> Tensor:
    """Scatter per-candidate values ``[B, H, C]`` to ``[B, H, t]`` (0 elsewhere)."""
    live = torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None].long()
    out = torch.zeros(*idx.shape[:-1], t + 1, dtype=values.dtype, device=values.device)
    return out.scatter_(-1, torch.where(live, idx.long(), t), values * live)[..., :t]
