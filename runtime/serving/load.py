"""``twilight.load``: a tuned, compiled decode pipeline in one call.

``load(pipeline, device, shape, backend)`` picks the schedule from the tuning logs (the user's
over the shipped ones, nearest shape bucket; the backend's default where none matches, said
once), gets the kernels through the :class:`~twilight.runtime.store.kernel_cache.KernelCache` (built
on a miss, under a per-key file lock, so many processes asking at once build once) and returns a
:class:`DecodePipeline` with ``plan()`` (once per batch shape), ``run()`` (every step) and
``step()`` (append the step's token, then run).

How each backend's kernels live in the cache:

* **tvm** (llvm target): one entry per (pipeline, shape, schedule, target): one shared library
  (``export_library``) holding every kernel — each stage, the append kernels and the fused
  ``run``/``step`` entry points (``twilight.compiler.tvm.fused``) — and an index of the TVMScript
  each was built from (``twilight.compiler.tvm.artifacts``). A warm load opens the library with
  ``tvm_ffi``: no TVMScript parse, no ``tvm.compile``, not even ``import tvm``.
* a backend that does not export for its target (Triton today) is lowered in process (Triton
  keeps its own compiled-kernel cache).

The runtime never branches on a backend's name: ``Backend.exports/export/load_exported``
(``compiler.backend``) say whether and how kernels live in the cache.

An entry that fails its checksums is rebuilt with a warning (``KernelCache``); one whose
libraries do not match the pipeline's generated sources, or do not load, likewise. With
``TWILIGHT_DISABLE_COMPILE=1`` a miss raises ``CacheMissError``.

Example::

    >>> import torch, twilight as tw
    >>> pipe = tw.load(tw.builtins.quest_twilight(budget=64), shape=tw.Shape(8, 2, 64, 16,
    ...                "float32"), backend="tvm")                     # doctest: +SKIP
    >>> cache = pipe.make_cache()                                      # doctest: +SKIP
    >>> rid = cache.add_request()                                      # doctest: +SKIP
    >>> cache.append(torch.randn(2, 300, 64), torch.randn(2, 300, 64), rid)  # doctest: +SKIP
    >>> pipe.plan(batch=1, max_context=4096)                           # doctest: +SKIP
    >>> pipe.run(torch.randn(1, 8, 64), cache).shape                   # doctest: +SKIP
    torch.Size([1, 8, 64])
    >>> pipe.step(torch.randn(1, 8, 64), torch.randn(1, 2, 64), torch.randn(1, 2, 64),
    ...           cache).shape                                         # doctest: +SKIP
    torch.Size([1, 8, 64])
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ... import knobs
from ...compiler import ir
from ...compiler.backend import (
    Backend,
    ExportMismatch,
    StageKernels,
    Target,
    backend_for,
    get_backend,
)
from ...compiler.stages import StageInputs, run_stages
from ...compiler.verify import verify
from ...errors import InputError
from ...frontend.builtins import Calibrated
from ...frontend.resolve import resolve_pipeline
from ...schedules.devices import DeviceProfile, resolve_device
from ..store import tuning_log
from ..store.estimator_choice import calibrated
from ..store.kernel_cache import CorruptEntryWarning, KernelCache, cache_key, default_cache
from ..store.tuning_log import ShapeBucket
from .checks import (
    allocating,
    batch_ids,
    check_cache,
    check_query_finite,
    refuse_non_finite_kv,
    whole,
)
from .dense import KernelDense, dense_ir, parse_kind, sdpa_dense, supports
from .paged_cache import DTYPES, PagedKVCache
from .pipeline_cache import make_cache

__all__ = ["DecodePipeline", "DefaultScheduleWarning", "dense_fallback", "kernel_key", "load",
           "pick_schedule"]

log = logging.getLogger("twilight.load")


class DefaultScheduleWarning(UserWarning):
    """No tuning log matched: the backend's default schedule is used (said once per pipeline)."""


_TOLD: set[tuple] = set()


def pick_schedule(p: ir.PipelineIR, device: DeviceProfile, shape: ir.Shape, bucket: ShapeBucket,
                  backend: str) -> tuple[dict, str]:
    """``(schedule, where it came from)``: the nearest bucket of a tuning log (user logs first,
    then shipped ones), else ``{}`` — the backend's defaults — with a one-time warning."""
    schedule, source, _ = _pick(p, device, shape, bucket, backend)
    return schedule, source


def _pick(p, device, shape, bucket, backend) -> tuple[dict, str, dict | None]:
    """:func:`pick_schedule` and the tuning-log bucket record it came from (None: default)."""
    found = tuning_log.find_schedule(p, device.name, shape, bucket, backend)
    if found is not None:
        rec, _ = found
        where = f"tuning log {device.name}/{p.name} bucket {rec.get('bucket', '?')}"
        try:
            get_backend(backend).complete(rec["schedule"])
        except ValueError as e:  # hand-edited, or from an older space: not worth a crash
            warnings.warn(f"twilight.load: {where}: {e}; using the default schedule",
                          tuning_log.TuningLogWarning, stacklevel=3)
            return {}, "default", None
        return dict(rec["schedule"]), where, rec
    told = (p.key(), device.name, shape, backend)
    if told not in _TOLD:
        _TOLD.add(told)
        msg = (f"twilight.load: no tuning log for pipeline {p.name!r} on {device.name} "
               f"({backend}, {shape}); using the default schedule. 'twilightc tune' writes one.")
        log.info(msg)
        warnings.warn(msg, DefaultScheduleWarning, stacklevel=3)
    return {}, "default", None


def kernel_key(p: ir.PipelineIR, shape: ir.Shape, schedule: dict, target: Target,
               backend: Backend):
    """The kernel-cache key of a whole pipeline: IR key, complete schedule, target, backend and
    its version stamp (which hashes its own generators), toolchain stamps, and the shape."""
    return cache_key(p.key(), backend.complete(schedule), target, backend.name,
                     backend.version_stamp(), extra={"shape": shape})


def _backend_and_target(name: str, dev: DeviceProfile, target) -> tuple[Backend, Target]:
    """The backend (``"auto"``: the preferred one that serves ``dev``) and its target."""
    if name == "auto":
        backend, tgt = backend_for(dev)
    else:
        try:
            backend = get_backend(name)
        except KeyError as e:
            raise InputError(f"load: {e.args[0]}") from None
        tgt = backend.serving_target(dev)
    if target is not None:
        try:
            tgt = Target.parse(target) if isinstance(target, str) else target
        except ValueError as e:
            raise InputError(f"load: target={target!r}: {e}") from None
        if tgt.kind == "cuda" and dev.kind != "cuda":  # load returns kernels to run here
            raise InputError(f"load: target {tgt} needs a CUDA GPU and this machine has none; "
                             "'twilightc compile' builds kernels for a GPU without one")
    if tgt is None or not backend.supports(tgt):
        raise InputError(f"load: the {backend.name} backend does not run on {dev.name}"
                         + (f" ({tgt})" if tgt else "") + "; pass target= (e.g. 'interpret' "
                         "for Triton's interpreter) or another backend")
    return backend, tgt


# ---- the kernels: memory, then disk, then a build --------------------------------------------

_MEMO: weakref.WeakKeyDictionary[KernelCache, dict[str, StageKernels]] = \
    weakref.WeakKeyDictionary()


def _from_cache(p, shape, schedule, target, backend: Backend, cache: KernelCache, key) \
        -> tuple[StageKernels, str]:
    """Kernels from the disk cache (built and exported there on a miss), and their origin."""
    built: dict[str, StageKernels] = {}

    def build(out) -> None:
        built["k"] = backend.lower(p, shape, schedule, target)
        backend.export(built["k"], out)

    describe = {"pipeline": p.name, "shape": str(shape), "backend": backend.name,
                "target": str(target)}
    for attempt in (0, 1):
        entry = cache.get_or_build(key, build, describe)
        if "k" in built:
            return built["k"], "built"
        try:
            return backend.load_exported(p, shape, schedule, target, entry), "disk"
        except ExportMismatch as e:
            if attempt:
                raise
            warnings.warn(f"twilight kernel cache: entry {key[:16]} at {entry.path} does not "
                          f"hold this pipeline's kernels ({e}); rebuilding it",
                          CorruptEntryWarning, stacklevel=4)
            cache.remove(key)
    raise AssertionError("unreachable")


def _compiled(p, shape, schedule, target, backend: Backend, cache: KernelCache) \
        -> tuple[StageKernels, str, str | None]:
    """``(kernels, origin, key)``; origin is memory, disk, built or lowered (a backend that
    does not export for ``target`` lowers in process; None key)."""
    if not backend.exports(target):
        return backend.lower(p, shape, schedule, target), "lowered", None
    key = kernel_key(p, shape, schedule, target, backend)
    memo = _MEMO.setdefault(cache, {})
    if key in memo:
        return backend.fresh(memo[key]), "memory", key
    kernels, origin = _from_cache(p, shape, schedule, target, backend, cache, key)
    memo[key] = kernels
    return backend.fresh(kernels), origin, key


# ---- the user-facing object ------------------------------------------------------------------


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
        if knobs.check_finite():
            check_query_finite(q, cache, req)
        return self._run(q, cache, batch_ids(cache, req), return_lists, out)

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
        if knobs.check_finite():
            check_query_finite(q, cache, req)
        x, longest = self._inputs(q, cache, req)
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


def _bucket(batch: int, context: int) -> ShapeBucket:
    try:
        return ShapeBucket(batch, context)
    except ValueError as e:
        raise InputError(f"load: {e}") from None


def load(pipeline, device: str = "auto", shape: ir.Shape | None = None, backend: str = "auto",
         *, batch: int = 1, context: int = 4096, schedule: dict | None = None,
         target: str | Target | None = None, cache: KernelCache | None = None,
         model: str | None = None, layer: int | None = None, dense_below: int | None = None,
         dense: str | None = None) -> DecodePipeline:
    """A tuned, compiled ``pipeline`` (a ``tw.Pipeline`` or its IR) for ``shape`` on ``device``.

    * ``device``: ``"auto"`` (the GPU present, else the CPU) or a profile name (``"cpu"``,
      ``"h100"``, …; it must be present).
    * ``backend``: ``"auto"`` (triton on a GPU, tvm on the CPU), ``"tvm"`` or ``"triton"``.
    * ``batch``/``context``: the shape bucket whose tuned schedule to prefer (nearest wins);
      ``schedule`` overrides the logs; ``target`` overrides the device's target;
      ``cache``: a ``KernelCache`` (default: the one of ``TWILIGHT_CACHE_DIR``);
      ``model``: apply the key estimator ``twilightc calibrate`` chose for this model.
    * ``dense_below`` (tokens, 0 = never) and ``dense`` (``"kernels"``, ``"sdpa:float32"``, …):
      where the pipeline runs dense attention, and how (:class:`DecodePipeline`); default: what
      the tuning log measured for the picked bucket — for model layer ``layer`` where it
      measured one — and 0 where it measured nothing (a given ``schedule``, no log).

    Example::

        pipe = tw.load(tw.builtins.quest_twilight(budget=1024),
                       shape=tw.Shape(9, 3, 64, 16, "float32"))
        kv = pipe.make_cache()
        out = pipe.plan(1, 8192).run(q, kv)
    """
    if not isinstance(shape, ir.Shape):
        raise InputError("load: pass shape=tw.Shape(q_heads, kv_heads, head_dim, page_size, "
                         "dtype): kernels are specialized on the head layout")
    if isinstance(pipeline, str):  # named as on the command line: 'quest_twilight(p=0.9)'
        pipeline = resolve_pipeline(pipeline)
    if isinstance(pipeline, Calibrated):
        raise InputError(f"load: {pipeline.name} needs calibration data first: pass "
                         f"{pipeline.name}.make(q, k) (sample queries and keys of the layer)")
    p = ir.as_ir(pipeline)
    if model is not None:  # the key estimator 'twilightc calibrate' chose for this model
        p, est = calibrated(p, model)
        if est:
            log.info("load: %s uses the %s estimator calibrated for %s", p.name, est, model)
    if shape.page_size != p.page_size:
        raise InputError(f"load: shape.page_size={shape.page_size} but pipeline {p.name!r} "
                         f"pages by {p.page_size}")
    verify(p, shape, stage="load")
    dev = resolve_device(device)
    b, tgt = _backend_and_target(backend, dev, target)
    if dense_below is not None:
        dense_below = whole("dense_below", dense_below, 0)
    bucket, rec = _bucket(batch, context), None
    if schedule is None:
        schedule, source, rec = _pick(p, dev, shape, bucket, b.name)
    else:
        source = "given"
    full = b.complete(schedule)
    kcache = cache or default_cache()
    compiled, origin, key = _compiled(p, shape, full, tgt, b, kcache)
    log.debug("loaded %s (%s, %s): %s", p.name, b.name, tgt, origin)
    layers = {int(k): int(v) for k, v in ((rec or {}).get("dense_below_layers") or {}).items()}
    below = dense_below if dense_below is not None else \
        layers.get(layer, int((rec or {}).get("dense_below") or 0))
    kind = dense or (rec or {}).get("dense_impl") or "kernels"
    fallback = dense_fallback(p, shape, b, tgt, kind, device=dev, bucket=bucket,
                              cache=kcache) if below else None
    return DecodePipeline(p, shape, b.name, tgt, full, source, compiled, origin, key,
                          dense_below=below, dense=fallback, dense_below_layers=layers)


def dense_fallback(p: ir.PipelineIR, shape: ir.Shape, backend: Backend | str, target: Target,
                   kind: str, *, device: DeviceProfile | None = None,
                   bucket: ShapeBucket | None = None, cache: KernelCache | None = None,
                   schedule: dict | None = None):
    """The dense attention ``p`` falls back to (:mod:`.dense`): ``"sdpa:<dtype>"``, or
    ``"kernels"`` — the backend's dense pipeline with ``p``'s attention, its schedule from the
    tuning logs (or ``schedule``; the backend's default where none), its kernels through the
    kernel cache (so ``TWILIGHT_DISABLE_COMPILE=1`` holds for it too). SDPA cannot softcap:
    such a pipeline falls back to the kernels."""
    name, _ = parse_kind(kind)
    if name == "sdpa" and supports(p, kind):
        return sdpa_dense(p, kind)
    b = get_backend(backend) if isinstance(backend, str) else backend
    d = dense_ir(p)
    if schedule is None:
        found = tuning_log.find_schedule(d, device.name, shape, bucket, b.name) \
            if device is not None and bucket is not None else None
        schedule = dict(found[0]["schedule"]) if found else {}
    compiled, _, _ = _compiled(d, shape, b.complete(schedule), target, b,
                               cache or default_cache())
    return KernelDense(compiled)

