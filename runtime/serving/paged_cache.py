"""A paged KV cache for decode, one per layer, with the side data sparse attention reads.

Beside K and V pages the cache keeps, per physical page and KV head, any number of page
*summaries* (e.g. Quest's per-channel min and max) and any number of quantized-key formats
(:class:`~twilight.compiler.keycodes.KeyCodeSpec`) for the top-p pruner's estimate. Every append
recomputes the summaries (and the page-granularity codes) of each page it touched, over that
page's valid tokens only, so the stored side data never depends on how a sequence was chunked.

Layout (``cap`` = capacity in pages, ``ps`` = page size):

* ``k_pages``, ``v_pages``: ``[cap, Hkv, ps, D]`` in the cache dtype;
* ``page_table``: int32 ``[request_slots, max_pages]``, -1 padded; ``lengths``: int64 ``[slots]``;
* ``summaries[name]``: ``[cap, Hkv, C]`` in the cache dtype;
* ``token_summaries[name]``: ``[cap, Hkv, ps, C]`` in the cache dtype — per-token maps of the
  keys (a projection ``k @ P``, a channel subset), computed for each appended token;
* ``v_sum`` (when ``track_v_sum``): float32 ``[request_slots, Hkv, D]``, the running sum of each
  request's values (SparQ's mean value is ``v_sum / length``);
* ``key_codes[spec]``: :class:`KeyCodes`, ``packed`` uint8 ``[cap, Hkv, ps, nbytes]`` and

  - "token": float32 ``scale``/``zero`` ``[cap, Hkv, ps]``, and with ``smooth`` the float32
    factors ``smooth [Hkv, D]`` (fitted on the cache's first append, or :meth:`set_smoothing`);
  - "page": ``lo``/``hi`` ``[cap, Hkv, D]`` in the cache dtype — the page's per-channel key min
    and max. They *are* two summary tensors: the ones named by ``minmax_summaries`` (Quest's,
    when the pipeline has it) or ``key.min``/``key.max``, which the cache then adds itself;
  - "group": ``lo``/``hi`` ``[cap, Hkv, D]`` in the cache dtype, meaningful at each group's
    first page (logical page ``j`` of a request belongs to the group of page ``j - j % G``).
    Like all side data they are allocated per physical page: a group reads ``G`` times less
    side data than a page, but allocates as much.

Appending to a page re-encodes that page's per-channel codes (its min/max may have moved), and
appending to a group re-encodes the whole group (``G · ps`` tokens). With an ``appender`` (a
backend's generated append kernels, :class:`Appender`) that work runs in those kernels instead
of torch: ``DecodePipeline.make_cache`` passes its own kernels where they run on the cache's
device.

Request ids are page-table rows; a freed id is reused by the next :meth:`PagedKVCache.add_request`.
Keys or values holding NaN or inf are refused by :meth:`PagedKVCache.append`
(``NonFiniteInputError`` naming the request, KV head and token position) before anything is
stored, so the cache only ever holds finite values (the policy: ``twilight.runtime.serving.checks``).

Example:
    >>> import torch
    >>> from twilight.compiler.keycodes import KeyCodeSpec
    >>> quest = {"min": lambda k, valid: k.masked_fill(~valid[:, None, :, None], float("inf")).amin(2)}
    >>> cache = PagedKVCache(2, 64, page_size=16, summaries=quest, key_codes=[KeyCodeSpec(4, "token")])
    >>> a, b = cache.add_requests(2)
    >>> cache.append(torch.randn(2, 40, 64, dtype=torch.float16), torch.randn(2, 40, 64, dtype=torch.float16), a)
    >>> cache.append(torch.randn(2, 2, 1, 64, dtype=torch.float16), torch.randn(2, 2, 1, 64, dtype=torch.float16), [a, b])
    >>> K, V, valid = cache.gather()
    >>> K.shape, valid.sum(1).tolist()
    (torch.Size([2, 2, 41, 64]), [41, 1])
    >>> pages, page_valid = cache.gather_pages()
    >>> cache.summaries["min"][pages.clamp(min=0)].shape  # [B, NP, Hkv, C]
    torch.Size([2, 3, 2, 64])
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ...compiler.ir import MAX_HEAD_DIM, MAX_HEADS, MAX_TOKENS, page_size_problem
from ...compiler.keycodes import (
    KeyCodeSpec,
    channel_extreme,
    fit_smoothing,
)
from ...errors import InputError
from .cache_read import CacheReads
from .cache_side import Appender, KeyCodes, SideData, SummaryFn, TokenSummaryFn
from .checks import as_request_id, cache_pages, refuse_non_finite_kv, whole

__all__ = ["Appender", "KeyCodes", "PagedKVCache", "SummaryFn", "TokenSummaryFn"]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
"""The cache (and query) dtypes, by the names ``Shape.dtype`` uses."""
_DTYPES = tuple(DTYPES.values())

MINMAX = ("key.min", "key.max")
"""Summaries the cache adds for page-granularity codes when no ``minmax_summaries`` are given."""


def _device(device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here (one line otherwise)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"PagedKVCache: device={device!r} is not a device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"PagedKVCache: device={device!r}, but this torch sees no CUDA device")
    return dev


def _grow(t: Tensor, rows: int, fill: float | int = 0) -> Tensor:
    """``t`` with its first dim extended to ``rows``, new rows set to ``fill``."""
    extra = t.new_full((rows - t.shape[0], *t.shape[1:]), fill)
    return torch.cat([t, extra])


class PagedKVCache(SideData, CacheReads):
    """Paged K/V storage of one layer, with page summaries and quantized keys kept beside it.

    See the module docstring for the layout and an example; the side data's allocation and
    refresh live in :class:`~twilight.runtime.serving.cache_side.SideData`, the dense reads in
    :class:`~twilight.runtime.serving.cache_read.CacheReads`.
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        *,
        page_size: int = 16,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        summaries: Mapping[str, SummaryFn] | None = None,
        key_codes: Sequence[KeyCodeSpec] = (),
        initial_pages: int = 64,
        minmax_summaries: tuple[str, str] | None = None,
        token_summaries: Mapping[str, TokenSummaryFn] | None = None,
        track_v_sum: bool = False,
        summary_keys: Mapping[str, str] | None = None,
        appender: Appender | None = None,
    ) -> None:
        problem = page_size_problem(page_size)
        if problem:
            raise InputError(f"PagedKVCache: {problem}")
        if dtype not in _DTYPES:
            raise InputError(f"PagedKVCache: dtype must be one of {_DTYPES}, got {dtype!r}")
        num_kv_heads, head_dim, initial_pages = (
            whole(f"PagedKVCache: {name}", n, 1, top) for name, n, top in (
                ("num_kv_heads", num_kv_heads, MAX_HEADS), ("head_dim", head_dim, MAX_HEAD_DIM),
                ("initial_pages", initial_pages, MAX_TOKENS)))
        self.num_kv_heads, self.head_dim, self.page_size = num_kv_heads, head_dim, int(page_size)
        self.dtype, self.device = dtype, _device(device)
        self.summary_fns: dict[str, SummaryFn] = dict(summaries or {})
        self.key_code_specs: tuple[KeyCodeSpec, ...] = tuple(dict.fromkeys(key_codes))
        if any(sp.granularity == "page" for sp in self.key_code_specs):
            if minmax_summaries is None:
                minmax_summaries = MINMAX
                self.summary_fns[MINMAX[0]] = lambda k, v: channel_extreme(k, v[:, None], "min")
                self.summary_fns[MINMAX[1]] = lambda k, v: channel_extreme(k, v[:, None], "max")
            missing = [n for n in minmax_summaries if n not in self.summary_fns]
            if missing:
                raise InputError(f"minmax_summaries: no summary named {missing[0]!r} (have "
                                 f"{sorted(self.summary_fns)})")
        self.minmax_summaries = minmax_summaries
        self.summary_keys: dict[str, str] = dict(summary_keys or {})
        """IR key of the expression behind each summary (``make_cache`` records them), so a
        pipeline can tell a same-named summary of another pipeline from its own."""
        self.appender = appender
        self.smoothing_fitted: dict[KeyCodeSpec, bool] = {
            sp: False for sp in self.key_code_specs if sp.smooth}
        with cache_pages(initial_pages, num_kv_heads, page_size, head_dim, dtype):
            shape = (initial_pages, num_kv_heads, page_size, head_dim)
            self.k_pages = torch.zeros(shape, dtype=dtype, device=self.device)
            self.v_pages = torch.zeros(shape, dtype=dtype, device=self.device)
            self.page_fill = torch.zeros(initial_pages, dtype=torch.int64, device=self.device)
            self.page_table = torch.full((0, 1), -1, dtype=torch.int32, device=self.device)
            self.lengths = torch.zeros(0, dtype=torch.int64, device=self.device)
            self.summaries = {
                n: self._new_summary(n, fn, initial_pages) for n, fn in self.summary_fns.items()
            }
            self.key_codes = {s: self._new_codes(s, initial_pages) for s in self.key_code_specs}
        self._link_minmax()
        self.token_summary_fns: dict[str, TokenSummaryFn] = dict(token_summaries or {})
        self.token_summaries = {n: self._new_token_summary(n, fn, initial_pages)
                                for n, fn in self.token_summary_fns.items()}
        self.v_sum = torch.zeros(0, num_kv_heads, head_dim, dtype=torch.float32,
                                 device=self.device) if track_v_sum else None
        self._free_pages: list[int] = list(range(initial_pages - 1, -1, -1))
        self._num_pages: list[int] = []  # pages held by each request slot
        self._host_lengths: list[int] = []  # ``lengths`` mirrored on the host: no device reads
        self._live: list[bool] = []
        self.generation = 0  # bumped whenever a tensor of the cache is reallocated

    def __deepcopy__(self, memo: dict) -> PagedKVCache:
        """A copy of every tensor and list (aliases kept: a page format's ``lo``/``hi`` stay
        its min/max summaries); the ``appender`` — compiled kernels, no state — is shared."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            setattr(new, name, value if name == "appender" else copy.deepcopy(value, memo))
        return new

    # ---- pages -----------------------------------------------------------------------------

    @property
    def capacity_pages(self) -> int:
        return self.k_pages.shape[0]

    def _grow_pages(self, needed: int) -> None:
        old = self.capacity_pages
        new = max(2 * old, old + needed)
        with cache_pages(new, self.num_kv_heads, self.page_size, self.head_dim, self.dtype):
            self._grow_to(old, new)

    def _grow_to(self, old: int, new: int) -> None:
        self.k_pages, self.v_pages = _grow(self.k_pages, new), _grow(self.v_pages, new)
        self.page_fill = _grow(self.page_fill, new)
        self.summaries = {n: _grow(t, new) for n, t in self.summaries.items()}
        self.token_summaries = {n: _grow(t, new) for n, t in self.token_summaries.items()}
        for spec, c in self.key_codes.items():
            c.packed = _grow(c.packed, new)
            own = {"token": ("scale", "zero"), "group": ("lo", "hi")}.get(spec.granularity, ())
            for name in own:  # a page format's lo/hi are summaries, grown above
                setattr(c, name, _grow(getattr(c, name), new))
        self._link_minmax()
        self._free_pages = list(range(new - 1, old - 1, -1)) + self._free_pages
        self.generation += 1

    # ---- requests --------------------------------------------------------------------------

    @property
    def num_requests(self) -> int:
        """Number of live requests."""
        return sum(self._live)

    @property
    def request_ids(self) -> list[int]:
        """Live request ids, ascending."""
        return [r for r, live in enumerate(self._live) if live]

    def add_request(self) -> int:
        """A new empty request; returns its id (the lowest free page-table row)."""
        for rid, live in enumerate(self._live):
            if not live:
                self._live[rid] = True
                return rid
        self._live.append(True)
        self._num_pages.append(0)
        self._host_lengths.append(0)
        self.page_table = _grow(self.page_table, len(self._live), -1)
        self.lengths = _grow(self.lengths, len(self._live))
        if self.v_sum is not None:
            self.v_sum = _grow(self.v_sum, len(self._live))
        self.generation += 1
        return len(self._live) - 1

    def add_requests(self, n: int) -> list[int]:
        return [self.add_request() for _ in range(n)]

    def free_request(self, rid: int) -> None:
        """Drop request ``rid``; its pages return to the free pool."""
        self._check_ids([rid])
        pages = self.page_table[rid, : self._num_pages[rid]].to(torch.int64)
        self._free_pages.extend(pages.flip(0).tolist())
        self.page_fill[pages] = 0
        self.page_table[rid] = -1
        self.lengths[rid] = 0
        if self.v_sum is not None:
            self.v_sum[rid] = 0
        self._host_lengths[rid] = 0
        self._num_pages[rid] = 0
        self._live[rid] = False

    def _page_tensors(self) -> list[Tensor]:
        """Every tensor indexed by physical page first (K/V, fill, page and token summaries,
        key codes)."""
        ts = [self.k_pages, self.v_pages, self.page_fill, *self.summaries.values(),
              *self.token_summaries.values()]
        for c in self.key_codes.values():
            ts += [t for t in (c.packed, c.scale, c.zero, c.lo, c.hi) if t is not None]
        return list({id(t): t for t in ts}.values())

    def copy_request(self, src: int) -> int:
        """A new request holding a copy of request ``src``: its own pages, with the summaries,
        key codes and running V sum copied, so appending to one never changes the other (beam
        search)."""
        self._check_ids([src])
        rid, n = self.add_request(), self._host_lengths[src]
        if self.v_sum is not None:
            self.v_sum[rid] = self.v_sum[src]
        if n:
            self._reserve([rid], [n])
            cols = self._num_pages[src]
            dst = self.page_table[rid, :cols].to(torch.int64)
            from_ = self.page_table[src, :cols].to(torch.int64)
            for t in self._page_tensors():
                t[dst] = t[from_]
            self.lengths[rid] = n
            self.advance([rid], n)
        return rid

    def _check_ids(self, ids: Sequence[int]) -> None:
        for r in ids:
            if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < len(self._live) \
                    or not self._live[r]:
                raise InputError(f"unknown request id {r!r}; live ids are {self.request_ids}")

    def longest(self, ids: Sequence[int]) -> int:
        """The longest length among requests ``ids``, from host bookkeeping (never a device
        read, so a decode step can be captured in a CUDA graph)."""
        return max((self._host_lengths[r] for r in ids), default=0)

    def length(self, rid: int) -> int:
        """Tokens of request ``rid``, from the host bookkeeping (no read of ``lengths``)."""
        return self._host_lengths[rid]

    def reserve(self, ids: Sequence[int], n: int = 1) -> None:
        """Make room for ``n`` more tokens of each request in ``ids`` (pages, page-table
        columns), from the host bookkeeping alone: what a generated append kernel needs before it
        writes them. Pair it with :meth:`advance` once they are written."""
        ps = self.page_size
        if any(-(-(self._host_lengths[r] + n) // ps) > self._num_pages[r] for r in ids):
            self._reserve(list(ids), [self._host_lengths[r] + n for r in ids])

    def advance(self, ids: Sequence[int], n: int = 1) -> None:
        """Record that ``n`` tokens of each request in ``ids`` were written (by ``append``, or
        by a generated append, which also updated ``lengths``, ``page_fill``, summaries and
        codes)."""
        for r in ids:
            self._host_lengths[r] += n

    def appends_on_host(self) -> bool:
        """Does the next append need the torch path (smoothing factors not fitted yet)?"""
        return not all(self.smoothing_fitted.values())

    def resolve_ids(self, req: int | Sequence[int] | None) -> list[int]:
        """Request ids as a list of ints: ``None`` means every live request, in id order; an
        id may be any integer (numpy's, a 0-d tensor), and ``req`` one, a sequence of them, or
        a 1-d integer array or tensor."""
        if req is None:
            return self.request_ids
        if getattr(req, "ndim", None) == 1 and hasattr(req, "tolist"):  # numpy, torch
            req = req.tolist()
        one = not isinstance(req, Sequence | range) or isinstance(req, str | bytes)
        ids = [as_request_id(r) for r in ([req] if one else req)]
        self._check_ids(ids)
        return ids

    # ---- append ----------------------------------------------------------------------------

    def _check_kv(self, name: str, t: Tensor, req: int | Sequence[int]) -> Tensor:
        if not isinstance(t, Tensor):
            raise InputError(f"{name}: expected a tensor, got {type(t).__name__}")
        h, d = self.num_kv_heads, self.head_dim
        batched = not isinstance(as_request_id(req, None), int)
        ok = t.dim() == (4 if batched else 3) and t.shape[-3] == h and t.shape[-1] == d
        if ok and batched and t.shape[0] != len(req):
            ok = False
        if not ok:
            want = (
                f"[B={len(req)}, {h}, n, {d}]"
                if batched
                else f"[num_kv_heads={h}, n, head_dim={d}]"
            )
            alt = "" if batched else f" or [B, {h}, n, {d}] with a sequence of B request ids"
            raise InputError(f"{name}: expected shape {want}{alt}, got {tuple(t.shape)}")
        if t.dtype != self.dtype:
            raise InputError(
                f"{name}: expected dtype {self.dtype} (the cache dtype), got {t.dtype}"
            )
        if t.device != self.device:
            raise InputError(f"{name}: expected device {self.device}, got {t.device}")
        return t if batched else t[None]

    def _reserve(self, ids: list[int], new_len: list[int]) -> None:
        """Give every request enough pages for ``new_len`` tokens (a loop over requests only)."""
        want = [math.ceil(n / self.page_size) for n in new_len]
        short = sum(w - self._num_pages[r] for r, w in zip(ids, want, strict=True))
        if short > len(self._free_pages):
            self._grow_pages(short - len(self._free_pages))
        if max(want, default=0) > self.page_table.shape[1]:
            cols = max(2 * self.page_table.shape[1], max(want))
            pad = self.page_table.new_full(
                (self.page_table.shape[0], cols - self.page_table.shape[1]), -1
            )
            self.page_table = torch.cat([self.page_table, pad], dim=1)
            self.generation += 1
        for r, w in zip(ids, want, strict=True):
            have = self._num_pages[r]
            if w > have:
                got = self._free_pages[len(self._free_pages) - (w - have) :][::-1]
                del self._free_pages[len(self._free_pages) - (w - have) :]
                self.page_table[r, have:w] = torch.tensor(
                    got, dtype=torch.int32, device=self.device
                )
                self._num_pages[r] = w

    def append(self, k: Tensor, v: Tensor, req: int | Sequence[int]) -> None:
        """Append ``k``, ``v`` ``[Hkv, n, D]`` to request ``req``, or ``[B, Hkv, n, D]`` to the B
        distinct requests in ``req``; both in the cache dtype. Updates summaries and key codes."""
        kb, vb = self._check_kv("k", k, req), self._check_kv("v", v, req)
        if kb.shape != vb.shape:
            raise InputError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        ids = self.resolve_ids(req)
        if len(set(ids)) != len(ids):
            raise InputError(f"req: a batched append needs distinct request ids, got {ids}")
        n = kb.shape[2]
        if n == 0 or not ids:
            return
        idx = torch.tensor(ids, dtype=torch.int64, device=self.device)
        old = self.lengths[idx]
        old_host = [self._host_lengths[r] for r in ids]
        if max(old_host) + n > MAX_TOKENS:
            raise InputError(f"append: a request would exceed {MAX_TOKENS} tokens (int32 "
                             "positions)")
        refuse_non_finite_kv(kb, vb, ids, old)
        self._reserve(ids, [o + n for o in old_host])
        pos = old[:, None] + torch.arange(n, device=self.device)  # [B, n]
        phys = self.page_table[idx].to(torch.int64).gather(1, pos // self.page_size).flatten()
        slot = (pos % self.page_size).flatten()
        k_tok = kb.transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim)  # [B*n, Hkv, D]
        self.k_pages[phys, :, slot] = k_tok
        self.v_pages[phys, :, slot] = vb.transpose(1, 2).reshape_as(k_tok)
        self.page_fill.index_add_(0, phys, torch.ones_like(phys))
        self.lengths[idx] = old + n
        self.advance(ids, n)
        for spec, fitted in self.smoothing_fitted.items():
            if not fitted:  # the first append sets the factors (a prefill, in practice)
                self.key_codes[spec].smooth.copy_(fit_smoothing(k_tok.transpose(0, 1), spec.smooth))
                self.smoothing_fitted[spec] = True
        if self.v_sum is not None:
            self.v_sum[idx] += vb.float().sum(2)
        self._refresh_side(k_tok, ids, old_host, n, phys, slot)
