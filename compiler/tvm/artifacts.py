"""Exported libraries: a lowered pipeline's kernels as shared objects in a kernel-cache entry,
and loaded back with no TVMScript parse, no ``tvm.compile`` and no import of the ``tvm`` Python
package (1.2–4 s): ``libtvm_runtime.so`` is opened with ``ctypes`` (it provides the thread pool
the kernels' ``T.parallel`` loops call into) and each library with ``tvm_ffi.load_module``.

An entry holds one ``<kernel>.<build tag>.so`` per compiled module (``export_library``) —
on llvm one, ``fused``, whose functions are every kernel of the pipeline — and
``kernels.json``: each kernel's stage, file and the sha256 of the TVMScript it was built from.
``load_pipeline`` regenerates the TVMScript (text only, about a millisecond) and refuses an entry
whose kernels differ in name or source (``LibraryMismatch``), so a key collision or a stale entry
can never hand back a wrong kernel. The build tag makes every build's file names unique, so a
rebuilt entry is never mistaken by the dynamic loader for a library it opened before.

Example::

    import twilight as tw
    from twilight.compiler.backend import Target, get_backend
    from twilight.compiler.tvm import artifacts
    from twilight.runtime.store.kernel_cache import KernelCache, cache_key

    pipe, shape, llvm = tw.builtins.quest_twilight(budget=64), tw.Shape(8, 2, 64), Target("llvm")
    cache = KernelCache("/tmp/tw-cache")
    key = cache_key(pipe.ir.key(), {}, llvm, "tvm", {}, extra={"shape": shape})
    entry = cache.get_or_build(key, lambda out: artifacts.export_pipeline(
        get_backend("tvm").lower(pipe.ir, shape, {}, llvm), out))
    compiled = artifacts.load_pipeline(pipe.ir, shape, {}, llvm, entry)   # a TVMCompiled
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import json
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ...schedules.tvm import TVM
from .. import ir
from ..backend import ExportMismatch, Target
from .build import Kernel, has_vnni
from .context import StageCtx
from .dialect import Dialect
from .pipeline import TVMCompiled, pipeline_sources

INDEX = "kernels.json"
FORMAT = 1


class LibraryMismatch(ExportMismatch):
    """An entry's libraries are not those of the pipeline asked for (names, sources, format)."""


def stage_ctx(p: ir.PipelineIR, shape: ir.Shape, schedule: dict, target: Target) -> StageCtx:
    """The codegen context ``TVMBackend.lower`` builds for the same arguments."""
    sched = TVM.complete(dict(schedule))
    return StageCtx(p, shape, sched, Dialect(target.kind, int(sched["cuda_threads"]),
                                             vnni=has_vnni(target)))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def export_pipeline(compiled: TVMCompiled, out: Path) -> None:
    """Write every kernel of ``compiled`` (llvm target) as a shared library into ``out``,
    with the ``kernels.json`` index. Links run in parallel (each is a C compiler call)."""
    if compiled.target.kind != "llvm":
        raise ValueError(f"exporting {compiled.target} libraries is not supported (llvm only)")
    tag = uuid.uuid4().hex[:8]
    out = Path(out)
    # kernels that are functions of one module (llvm: the fused one) share its library
    files = {name: f"{k.member_of or name}.{tag}.so" for name, k in compiled.kernels.items()}
    owners = {f: compiled.kernels[n] for n, f in files.items()
              if not compiled.kernels[n].member_of}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda f: owners[f].executable.export_library(str(out / f)), owners))
    index = {"format": FORMAT, "target": str(compiled.target), "kernels": {
        name: {"stage": k.source.stage, "file": files[name], "source_sha256": _sha(k.source.text)}
        for name, k in compiled.kernels.items()}}
    (out / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))


def load_pipeline(p: ir.PipelineIR, shape: ir.Shape, schedule: dict, target: Target,
                  entry) -> TVMCompiled:
    """The pipeline whose libraries ``entry`` (a ``KernelCache`` entry) holds, loaded without
    compiling; ``LibraryMismatch`` if they are not exactly the kernels it needs."""
    ctx = stage_ctx(p, shape, schedule, target)
    want = {src.name: src for src in pipeline_sources(ctx)}
    try:
        index = json.loads(entry.read(INDEX))
        have = index["kernels"]
        ok = index.get("format") == FORMAT and index.get("target") == str(target) \
            and set(have) == set(want) \
            and all(have[n]["source_sha256"] == _sha(want[n].text) for n in want)
    except (KeyError, TypeError, ValueError) as e:
        raise LibraryMismatch(f"unreadable {INDEX}: {type(e).__name__}: {e}") from None
    if not ok:
        raise LibraryMismatch(f"entry {entry.key[:16]} holds kernels {sorted(have)} built from "
                              "other sources than this pipeline's")
    ensure_runtime()
    import tvm_ffi  # noqa: PLC0415 - light (the FFI only); torch is imported already

    kernels, mods = {}, {}
    shared = have.get("fused", {}).get("file")
    for name, src in want.items():
        file = have[name]["file"]
        if file not in mods:
            try:
                mods[file] = tvm_ffi.load_module(str(entry.path / file))
            except Exception as e:  # a library that passed its checksum but does not load
                raise LibraryMismatch(f"{file} does not load: {e}") from e
        kernels[name] = Kernel(src, target, None, mods[file],
                               "fused" if name != "fused" and file == shared else "")
    return TVMCompiled(ctx, target, kernels)


@functools.cache
def ensure_runtime() -> None:
    """Make TVM's runtime library (thread pool, workspace allocator) visible to the kernels
    without importing ``tvm``: a library loaded without it crashes in its first parallel loop."""
    import tvm_ffi  # noqa: F401, PLC0415 - loads libtvm_ffi.so, which libtvm_runtime needs

    if "tvm" in sys.modules:
        return
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("apache-tvm is not installed: its runtime library runs TVM kernels")
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libtvm_runtime.so"
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
