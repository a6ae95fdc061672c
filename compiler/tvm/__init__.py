"""The TVM backend: pipeline IR → TIR (TVM 0.27) → llvm (runs here) or CUDA source.

``get_backend("tvm").lower(ir, shape, schedule, Target.parse("llvm"))`` returns a
:class:`~twilight.compiler.tvm.pipeline.TVMCompiled`; lowered pipelines are cached in-process by
(IR key, shape, schedule, target), kernels by their source and target (``build.py``).

Example::

    import torch, twilight as tw
    from twilight.compiler.backend import Target, get_backend
    from twilight.runtime.serving.pipeline_cache import make_cache

    pipe = tw.builtins.quest_twilight(budget=64)
    cache = make_cache(pipe, num_kv_heads=2, head_dim=64)
    rid = cache.add_request()
    cache.append(torch.randn(2, 300, 64).half(), torch.randn(2, 300, 64).half(), rid)
    k = get_backend("tvm").lower(pipe.ir, tw.Shape(8, 2, 64), {}, Target.parse("llvm"))
    out = k.run(torch.randn(1, 8, 64).half(), cache)   # [1, 8, 64], no copy of the cache
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from ...schedules.tvm import TVM
from ...schedules.tvm import space as tvm_space
from ...version import dist_version, nvcc_version, source_stamp
from .. import ir
from ..backend import Backend, Target, register_backend
from ..verify import verify
from . import artifacts, nvcc
from .build import has_vnni
from .context import StageCtx
from .dialect import Dialect
from .pipeline import TVMCompiled

_LOWERED: dict[tuple, object] = {}
_LOCK = threading.Lock()


_TOLD: set[str] = set()


def _tell_once(msg: str) -> None:
    if msg not in _TOLD:
        _TOLD.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


@register_backend
class TVMBackend(Backend):
    name = "tvm"
    source_ext = "tvmscript.py"  # what the generated source is, for --dump

    def supports(self, target: Target) -> bool:
        return target.kind in ("llvm", "cuda")

    def lower(self, p: ir.PipelineIR, shape: ir.Shape, schedule: dict, target: Target):
        if not self.supports(target):
            raise ValueError(f"the tvm backend builds for llvm and cuda, not {target}")
        verify(p, shape, stage="tvm.lower")
        sched = TVM.complete(dict(schedule))
        key = (p.key(), shape, tuple(sorted(sched.items())), str(target))
        with _LOCK:
            hit = _LOWERED.get(key)
        if hit is not None:
            return hit
        if sched["estimate_query"] == "int8" and target.kind == "llvm" and not has_vnni(target):
            _tell_once(f"twilight: estimate_query='int8' needs AVX-512 VNNI, which {target} "
                       "lacks: the estimate keeps its float32 query (exact, slower)")
        dialect = Dialect(target.kind, int(sched["cuda_threads"]),
                          vnni=has_vnni(target))
        out = TVMCompiled(StageCtx(p, shape, sched, dialect), target)
        with _LOCK:
            _LOWERED[key] = out
        return out

    def space(self, p: ir.PipelineIR, shape: ir.Shape, target: Target):
        """``schedules.tvm.space``, told whether the target has AVX-512 VNNI."""
        return tvm_space(p, shape, target, vnni=has_vnni(target))

    preference = 1  # on a GPU Triton serves first; on the CPU only TVM serves

    def serving_target(self, device) -> Target | None:
        return Target("cuda", device.arch) if device.kind == "cuda" else Target("llvm")

    def local_target(self) -> Target:
        return Target("llvm")  # TVM's llvm kernels run on any host

    def version_stamp(self) -> dict[str, str]:
        """TVM's version (from package metadata: no 4 s import) and a hash of this backend's
        own generators, so that editing one invalidates the kernel cache entries it made."""
        return _version_stamp()

    def toolchain_stamps(self, target: Target) -> dict[str, str]:
        return {"nvcc": nvcc_version()} if target.kind == "cuda" else {}

    # ---- shared libraries in the kernel cache (llvm) ----------------------------------------
    def exports(self, target: Target) -> bool:
        return target.kind == "llvm"

    def export(self, kernels, out: Path) -> None:
        artifacts.export_pipeline(kernels, out)

    def load_exported(self, p: ir.PipelineIR, shape: ir.Shape, schedule: dict, target: Target,
                      entry):
        return artifacts.load_pipeline(p, shape, schedule, target, entry)

    def fresh(self, kernels):
        return type(kernels)(kernels.ctx, kernels.target, kernels.kernels)

    def dump_artifacts(self, compiled, target: Target):
        """Every kernel's TIR, lowered TIR and generated source; on a cuda target also its
        cubin from nvcc, when the machine has it, with registers, spills and shared memory
        from ptxas's report (``nvcc.py``)."""
        arts = list(compiled.artifacts)
        if target.kind != "cuda":
            return arts
        path = nvcc.nvcc_path()
        if path is None:
            return [replace(a, metadata=a.metadata | {"cubin": "nvcc not found"}) for a in arts]

        def build(a):
            cubin, usage, log = nvcc.compile_cubin(a.files["cuda"], target.arch, path)
            return replace(a, files=a.files | {"cubin": cubin, "ptxas.log": log},
                           metadata=a.metadata | usage)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return list(pool.map(build, arts))


@functools.cache
def _version_stamp() -> dict[str, str]:
    here = Path(__file__).resolve().parent
    return {"tvm": dist_version("apache-tvm", "tvm"),
            "codegen_sources": source_stamp(here, here.parent / "ir.py")}
