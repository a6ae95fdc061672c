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
import warnings
import weakref

from ...compiler import ir
from ...compiler.backend import (
    Backend,
    ExportMismatch,
    StageKernels,
    Target,
    backend_for,
    get_backend,
)
from ...compiler.verify import verify
from ...errors import InputError
from ...frontend.builtins import Calibrated
from ...frontend.resolve import resolve_pipeline
from ...schedules.devices import DeviceProfile, resolve_device
from ..store import tuning_log
from ..store.estimator_choice import calibrated
from ..store.kernel_cache import CorruptEntryWarning, KernelCache, cache_key, default_cache
from ..store.tuning_log import ShapeBucket
from .checks import whole
from .decode_pipeline import DecodePipeline
from .dense import KernelDense, dense_ir, parse_kind, sdpa_dense, supports

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

