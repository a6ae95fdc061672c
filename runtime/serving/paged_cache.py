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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ...compiler.ir import MAX_HEAD_DIM, MAX_HEADS, MAX_TOKENS, page_size_problem
from ...compiler.keycodes import (
    KeyCodeSpec,
    channel_extreme,
    codes_from_minmax,
    fit_smoothing,
    packed_bytes,
    quantize_page,
    quantize_token,
)
from ...errors import InputError
from .checks import as_request_id, cache_pages, refuse_non_finite_kv, whole

__all__ = ["Appender", "KeyCodes", "PagedKVCache", "SummaryFn", "TokenSummaryFn"]

SummaryFn = Callable[[Tensor, Tensor], Tensor]
"""``(keys float32 [P, Hkv, ps, D], valid bool [P, ps]) -> [P, Hkv, C]``."""

TokenSummaryFn = Callable[[Tensor], Tensor]
"""``(keys float32 [N, Hkv, D]) -> [N, Hkv, C]``: a map of each key."""


class Appender(Protocol):
    """Generated kernels that keep a cache's side data on append, in place of the torch code
    here (a backend's ``StageKernels`` is one: ``compiler.backend``). They must write exactly
    what the torch code writes, and cover every summary and key-code format of the cache (a
    cache from ``make_cache`` for the same pipeline)."""

    def refresh_pages(self, cache, pages: Tensor) -> None: ...

    def refresh_tokens(self, cache, phys: Tensor, slot: Tensor) -> None: ...

    def refresh_groups(self, cache, gp: Tensor) -> None: ...


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
"""The cache (and query) dtypes, by the names ``Shape.dtype`` uses."""
_DTYPES = tuple(DTYPES.values())


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


class PagedKVCache:
    """Paged K/V storage of one layer, with page summaries and quantized keys kept beside it.

    See the module docstring for the layout and an example.
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

    def __deepcopy__(self, memo: dict) -> PagedKVCache:
        """A copy of every tensor and list (aliases kept: a page format's ``lo``/``hi`` stay
        its min/max summaries); the ``appender`` — compiled kernels, no state — is shared."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            setattr(new, name, value if name == "appender" else copy.deepcopy(value, memo))
        return new

    # ---- side-data allocation -------------------------------------------------------------

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
            raise ValueError(f"token summary {name!r}: expected [N, num_kv_heads="
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

    def _check_ids(self, ids: Sequence[int]) -> None:
        for r in ids:
            if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < len(self._live) \
                    or not self._live[r]:
                raise InputError(f"unknown request id {r!r}; live ids are {self.request_ids}")

    def longest(self, ids: Sequence[int]) -> int:
        """The longest length among requests ``ids``, from host bookkeeping (never a device
        read, so a decode step can be captured in a CUDA graph)."""
        return max((self._host_lengths[r] for r in ids), default=0)

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
        for r in ids:
            self._host_lengths[r] += n
        for spec, fitted in self.smoothing_fitted.items():
            if not fitted:  # the first append sets the factors (a prefill, in practice)
                self.key_codes[spec].smooth.copy_(fit_smoothing(k_tok.transpose(0, 1), spec.smooth))
                self.smoothing_fitted[spec] = True
        if self.v_sum is not None:
            self.v_sum[idx] += vb.float().sum(2)
        if self.appender is not None:  # the backend's generated append kernels
            self._refresh_generated(ids, old_host, n, phys, slot)
            return
        for name, fn in self.token_summary_fns.items():
            self.token_summaries[name][phys, :, slot] = fn(k_tok.float()).to(self.dtype)
        self._update_token_codes(k_tok, phys, slot)
        self._update_pages(torch.unique(phys))
        if any(sp.granularity == "group" for sp in self.key_code_specs):
            self._update_groups(ids, old_host, n)

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

    # ---- read ------------------------------------------------------------------------------

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
