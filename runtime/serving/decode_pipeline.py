"""``DecodePipeline``: a loaded pipeline's serving object — plan once per batch shape, then
``run`` (or ``step``: append the step's token, then run) every decode step.

A step is one compiled call where the backend fuses the pipeline (TVM on the CPU:
``compiler.tvm.fused``), the stage kernels one call each elsewhere (``run_stages``), and dense
attention below ``dense_below`` (``.dense``). :func:`twilight.load` (``.load``) builds it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ... import knobs
from ...compiler import ir
from ...compiler.backend import StageKernels, Target
from ...compiler.stages import StageInputs, run_stages
from ...errors import InputError
from .checks import (
    allocating,
    batch_ids,
    check_cache,
    check_query_finite,
    refuse_non_finite_kv,
    whole,
)
from .paged_cache import DTYPES, PagedKVCache
from .pipeline_cache import make_cache

__all__ = ["DecodePipeline", "in_model_threads"]


def in_model_threads(cpu_threads: int | None) -> int:
    """The CPU threads a pipeline's kernels run on inside a model (``hf_attention.install``,
    the torch op; the ``CPU_THREADS`` they set around a call): ``cpu_threads`` as given (0: the
    tuned schedule's, the whole pool by default), or by default half of
    ``torch.get_num_threads()``, at least one. Between the model's own ops torch's OpenMP
    workers spin on the cores, and a kernel worker sharing a core with one waits on it
    (measured: ``hf_attention.install``)."""
    threads = max(1, torch.get_num_threads() // 2) if cpu_threads is None else int(cpu_threads)
    if threads < 0:
        raise ValueError(f"cpu_threads={cpu_threads}: a count of threads, or 0 for the schedule's")
    return threads


@dataclass
class _Plan:
    batch: int
    context: int
    q: torch.Tensor  # [B, Hq, D] aligned staging copy of the query
    rows: torch.Tensor  # int64 [B] request ids (page-table rows)
    page_table: torch.Tensor  # int32 [B, NP]
    lengths64: torch.Tensor
    lengths: torch.Tensor  # int32 [B]
    ids: list[int] | None = None
    table_width: int = -1  # cache.page_table columns at the last copy


class DecodePipeline:
    """A loaded decode pipeline: ``plan(batch, max_context)`` once per batch shape, then
    ``run(q, cache, req)`` each step (``[B, Hq, D]`` in, ``[B, Hq, D]`` out).

    Attributes: ``ir``, ``shape``, ``backend``, ``target``, ``schedule`` (complete),
    ``schedule_source`` (a tuning log's bucket, or ``"default"``), ``key`` (the kernel-cache
    key, None where the backend is not disk-cached yet) and ``origin`` (``"memory"``,
    ``"disk"``, ``"built"`` or ``"lowered"``). Create with :func:`load`.

    ``dense_below`` (tokens; 0 = never): a step whose longest request is shorter runs
    ``dense`` (:mod:`.dense`: the backend's dense kernels or torch SDPA, whichever the tuner
    measured faster) instead of the sparse stages, because there dense attention is faster.
    The tuner measures it per device, pipeline, head layout and shape bucket (and per layer on
    a snapshot: ``dense_below_layers``, model layer → tokens) and ``load`` reads it from the
    tuning log; ``load(..., layer=i)`` takes layer ``i``'s figure where one was measured."""

    def __init__(self, p: ir.PipelineIR, shape: ir.Shape, backend: str, target: Target,
                 schedule: dict, schedule_source: str, compiled: StageKernels, origin: str, key,
                 *, dense_below: int = 0, dense=None,
                 dense_below_layers: dict[int, int] | None = None):
        self.ir, self.shape, self.backend, self.target = p, shape, backend, target
        self.schedule, self.schedule_source = schedule, schedule_source
        self.compiled, self.origin, self.key = compiled, origin, key
        self.dtype = DTYPES[shape.dtype]
        if dense_below < 0 or (dense_below and dense is None):
            raise InputError(f"dense_below={dense_below}: expected 0, or a positive token count "
                             "with a dense implementation to run below it")
        self.dense_below, self.dense = int(dense_below), dense
        self.dense_below_layers = dict(dense_below_layers or {})
        self._plan: _Plan | None = None
        self._fits: weakref.ref | None = None  # the last cache check_cache passed

    def __repr__(self) -> str:
        dense = f", dense below {self.dense_below} tokens ({self.dense!r})" \
            if self.dense_below else ""
        return (f"DecodePipeline({self.ir.name!r}, {self.shape}, backend={self.backend!r}, "
                f"target='{self.target}', schedule from {self.schedule_source}, "
                f"{self.origin}{dense})")

    def make_cache(self, *, initial_pages: int = 64, device: str | torch.device = "cpu",
                   generated_append: bool | None = None) -> PagedKVCache:
        """An empty paged cache that keeps what this pipeline reads (its page summaries and
        quantized keys), in the pipeline's dtype and KV layout. ``generated_append``: keep them
        with this pipeline's generated append kernels (``refresh_*``, bit-exact with torch)
        instead of torch; default: wherever those kernels run on ``device``."""
        dev = torch.device(device)
        runs_here = (self.target.kind == "cuda") == (dev.type == "cuda")
        if generated_append and not runs_here:
            raise InputError(f"make_cache: the {self.backend} kernels ({self.target}) cannot "
                             f"append to a cache on {dev}")
        use = runs_here if generated_append is None else generated_append
        return make_cache(self.ir, self.shape.kv_heads, self.shape.head_dim, dtype=self.dtype,
                          device=dev, initial_pages=initial_pages,
                          appender=self.compiled if use else None)

    def plan(self, batch: int, max_context: int, device: str | torch.device = "cpu") \
            -> DecodePipeline:
        """Size every buffer ``run`` needs for ``batch`` requests of up to ``max_context``
        tokens: query staging, page-table rows, lengths, and the kernels' scratch. A later
        ``run`` with another batch size, or a longer context, plans again by itself."""
        try:
            batch, max_context = whole("batch", batch), whole("max_context", max_context)
        except InputError:
            raise InputError(f"plan: batch and max_context must be whole numbers from 1 to "
                             f"{ir.MAX_TOKENS}, got {batch!r}, {max_context!r}") from None
        s, i32 = self.shape, dict(dtype=torch.int32, device=device)
        pages = math.ceil(max_context / self.ir.page_size)
        with allocating(f"plan: buffers for {batch} requests of {max_context} tokens",
                        "plan a smaller batch or max_context"):
            self._plan = _Plan(batch, max_context,
                               torch.empty(batch, s.q_heads, s.head_dim, dtype=self.dtype,
                                           device=device),
                               torch.empty(batch, dtype=torch.int64, device=device),
                               torch.full((batch, pages), -1, **i32),
                               torch.empty(batch, dtype=torch.int64, device=device),
                               torch.empty(batch, **i32))
            self.compiled.plan(batch, max_context)
        return self

    def _fit_cache(self, cache: PagedKVCache) -> None:
        """``check_cache`` once per cache object (a cache's layout never changes)."""
        if self._fits is not None and self._fits() is cache:
            return
        check_cache(self.ir, cache, self.shape)
        self._fits = weakref.ref(cache)

    def _inputs(self, q: torch.Tensor, cache: PagedKVCache, req) -> tuple[StageInputs, int]:
        """The planned stage inputs and the longest request's length, which the cache's own
        bookkeeping knows on the host: no device read (a CUDA graph can capture a step)."""
        ids = batch_ids(cache, req)
        self._fit_cache(cache)
        self._check_query(q, ids, cache)
        pl = self._plan
        if pl is None or pl.batch != len(ids):
            pl = self.plan(len(ids), pl.context if pl else 4096, q.device)._plan
        if pl.ids != ids:
            pl.rows.copy_(torch.tensor(ids, dtype=torch.int64))
            pl.ids, pl.table_width = list(ids), -1
        longest = cache.longest(ids)
        if longest > pl.context:  # grow by doubling: a growing context re-plans rarely
            pl = self.plan(pl.batch, max(longest, 2 * pl.context), q.device)._plan
            return self._inputs(q, cache, req)
        torch.index_select(cache.lengths, 0, pl.rows, out=pl.lengths64)
        pl.lengths.copy_(pl.lengths64)
        self._copy_table(pl, cache)
        pl.q.copy_(q)
        return StageInputs(pl.q, pl.page_table, pl.lengths, cache, ids), longest

    def stage_inputs(self, q: torch.Tensor, cache: PagedKVCache, req=None) -> StageInputs:
        """The planned, aligned stage inputs ``run`` would use (to time one stage alone)."""
        return self._inputs(q, cache, req)[0]

    @staticmethod
    def _copy_table(pl: _Plan, cache: PagedKVCache) -> None:
        width = min(cache.page_table.shape[1], pl.page_table.shape[1])
        if width == pl.page_table.shape[1]:
            torch.index_select(cache.page_table[:, :width], 0, pl.rows, out=pl.page_table)
            return
        if width != pl.table_width:
            pl.page_table.fill_(-1)
        pl.page_table[:, :width] = cache.page_table.index_select(0, pl.rows)
        pl.table_width = width

    def run(self, q: torch.Tensor, cache: PagedKVCache,
            req: int | Sequence[int] | None = None, return_lists: bool = False, *,
            out: torch.Tensor | None = None):
        """Attention output ``[B, Hq, D]`` for queries ``q [B, Hq, D]`` of requests ``req``
        (default: every live request, by id) over ``cache``. Where the backend fuses the
        pipeline (TVM on the CPU, ``compiler.tvm.fused.fusable``) this is one compiled call;
        elsewhere every stage is one kernel call over all requests and heads (``run_stages``).
        Once planned only the output is allocated (none with ``out=``). With ``return_lists``
        also the kept tokens ``(kept_idx, kept_cnt)`` (the stage ABI's; every token when the
        step ran dense: see ``dense_below``).
        A query holding NaN or inf raises ``NonFiniteInputError`` (``TWILIGHT_CHECK_FINITE=0``
        skips that check, the one host read of a step; see ``twilight.runtime.serving.checks``)."""
        ids = batch_ids(cache, req)
        self._check_query(q, ids, cache)  # shape, dtype and device before the values
        if knobs.check_finite():
            check_query_finite(q, cache, ids)
        return self._run(q, cache, ids, return_lists, out)

    __call__ = run

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache,
             req: int | Sequence[int] | None = None, *, out: torch.Tensor | None = None):
        """One decode step: append each request's new key and value ``k``, ``v``
        (``[B, Hkv, D]`` or ``[B, Hkv, 1, D]``, the cache dtype) to ``cache``, then ``run``.
        Where the backend fuses the pipeline the append (K/V row, page summaries and key codes
        of the touched page, bit-exact with ``PagedKVCache.append``) and the pipeline are one
        compiled call; elsewhere (and where the step runs dense) ``cache.append`` then ``run``.
        The checks are ``append``'s and ``run``'s, made before anything is appended."""
        ids = batch_ids(cache, req)
        self._fit_cache(cache)
        self._check_query(q, ids, cache)
        if knobs.check_finite():
            check_query_finite(q, cache, ids)
        want = (len(ids), self.shape.kv_heads, self.shape.head_dim)
        kv = []
        for name, t in (("k", k), ("v", v)):
            t3 = t.squeeze(2) if isinstance(t, torch.Tensor) and t.dim() == 4 \
                and t.shape[2] == 1 else t
            if not isinstance(t3, torch.Tensor) or tuple(t3.shape) != want \
                    or t3.dtype != cache.dtype or t3.device != cache.device:
                raise InputError(f"{name}: expected {list(want)} (or with a token axis of 1) "
                                 f"{cache.dtype} on {cache.device}, got "
                                 f"{tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', type(t))}")
            kv.append(t3)
        if not self._fuses(cache, ids, 1) or cache.appends_on_host():
            cache.append(kv[0][:, :, None], kv[1][:, :, None], ids)
            return self._run(q, cache, ids, False, out)
        old = [cache.length(r) for r in ids]
        if max(old) + 1 > ir.MAX_TOKENS:
            raise InputError(f"append: a request would exceed {ir.MAX_TOKENS} tokens (int32 "
                             "positions)")
        refuse_non_finite_kv(kv[0][:, :, None], kv[1][:, :, None], ids, old)
        k3, v3 = (_aligned(t) for t in kv)
        return self.compiled.call_fused(self._query(q, ids, cache), cache, ids, k3, v3, out=out)

    def run_stages(self, q: torch.Tensor, cache: PagedKVCache,
                   req: int | Sequence[int] | None = None, return_lists: bool = False):
        """``run`` stage by stage (select, estimate, prune, attend: one kernel call each; dense
        below ``dense_below``), the path every backend has: to time or check one stage, or to
        compare with the reference."""
        x, longest = self._inputs(q, cache, req)  # shape, dtype and device before the values
        if knobs.check_finite():
            check_query_finite(q, cache, req)
        if longest < self.dense_below:
            return self.dense(x, longest, return_lists)
        return run_stages(self.compiled, x, len(self.ir.prune), return_lists)

    def _run(self, q: torch.Tensor, cache: PagedKVCache, ids: list[int], return_lists: bool,
             out: torch.Tensor | None):
        """``run`` after the query's finite check: fused where it can, else stage by stage
        (or dense); the result lands in ``out`` when given."""
        if self._fuses(cache, ids, 0):
            self._fit_cache(cache)
            return self.compiled.call_fused(self._query(q, ids, cache), cache, ids, out=out,
                                            return_lists=return_lists)
        x, longest = self._inputs(q, cache, ids)
        if longest < self.dense_below:
            res = self.dense(x, longest, return_lists)
        else:
            res = run_stages(self.compiled, x, len(self.ir.prune), return_lists)
        if out is None:
            return res
        out.copy_(res[0] if return_lists else res)
        return (out, res[1]) if return_lists else out

    def _fuses(self, cache: PagedKVCache, ids: list[int], grow: int) -> bool:
        """Does this step run as one compiled call (``compiler.backend.FusedStep``: the kernels
        fuse this pipeline, the cache is on the CPU, and the step, ``grow`` tokens longer, is
        not below ``dense_below``)?"""
        return bool(getattr(self.compiled, "fused", False)) and cache.device.type == "cpu" \
            and cache.longest(ids) + grow >= self.dense_below

    def _check_query(self, q: torch.Tensor, ids: list[int], cache: PagedKVCache) -> None:
        if not isinstance(q, torch.Tensor) or q.dim() != 3 \
                or tuple(q.shape[1:]) != (self.shape.q_heads, self.shape.head_dim) \
                or q.shape[0] != len(ids) or q.dtype != self.dtype:
            raise InputError(f"q: expected [{len(ids)}, {self.shape.q_heads}, "
                             f"{self.shape.head_dim}] {self.dtype} (one row per request), got "
                             f"{tuple(getattr(q, 'shape', ()))} {getattr(q, 'dtype', type(q))}")
        if q.device != cache.device:
            raise InputError(f"q: expected device {cache.device} (the cache's), got {q.device}")

    def _query(self, q: torch.Tensor, ids: list[int], cache: PagedKVCache) -> torch.Tensor:
        """``q`` checked, and aligned for the fused call (a copy only when it is not)."""
        self._check_query(q, ids, cache)
        return _aligned(q)

    def runs_dense(self, context: int) -> bool:
        """Whether a step whose longest request holds ``context`` tokens runs dense."""
        return context < self.dense_below


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` when a compiled kernel may read it in place (compact, 64-byte aligned), else an
    aligned copy."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)  # torch's CPU allocations: 64 B
