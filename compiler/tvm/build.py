"""Targets, compilation, the in-process module cache, and DLPack calls with alignment checks.

Kernels are generated as TVMScript text (``twilight.compiler.tvm.dialect``), parsed with
TVM's own parser and compiled by ``tvm.compile``. A kernel is cached in-process by the sha256 of
its source and target, so pipelines that share a stage (every pipeline's attention, say) compile
it once, and one compiled function serves every batch, context and candidate count (those are
symbolic ``T.int32`` vars).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from functools import cache

import torch

from ..backend import Artifact, Target

ALIGN = 64  # bytes TVM's llvm codegen assumes for every buffer it is handed


class AlignmentError(ValueError):
    """A tensor handed to a TVM kernel is not 64-byte aligned or not contiguous."""


@cache
def _tvm():
    import tvm  # 4 s import: only when a kernel is first built
    from tvm.script import tirx as T
    return tvm, T


def tvm_target(target: Target, threads: int = 0):
    """A ``tvm.target.Target`` for a twilight ``Target``.

    ``mcpu: native`` silently falls back to a generic CPU in TVM 0.27, so the host CPU is asked
    for with ``Target.from_device``; a CUDA target always names its arch (sm_50 otherwise)."""
    tvm, _ = _tvm()
    if target.kind == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": target.arch})
    if target.kind != "llvm":
        raise ValueError(f"the tvm backend builds for llvm and cuda targets, not {target}")
    if target.arch:
        return tvm.target.Target({"kind": "llvm", "mcpu": target.arch})
    host = dict(tvm.target.Target.from_device(tvm.cpu()).export())
    conf = {k: host[k] for k in ("kind", "mtriple", "mcpu") if host.get(k)}
    if threads:
        conf["num-cores"] = threads
    return tvm.target.Target(conf)


@dataclass
class KernelSource:
    """One generated kernel: its stage, its function name and its TVMScript text."""

    stage: str
    name: str
    text: str
    params: tuple = field(default=(), compare=False, repr=False)  # (name, shape, dtype) each
    sym: tuple = field(default=(), compare=False, repr=False)  # symbolic dims, in call order

    def key(self, target: Target) -> str:
        return hashlib.sha256(f"{target}\n{self.text}".encode()).hexdigest()


@dataclass
class Kernel:
    """A compiled kernel: call it with torch tensors (zero copy through DLPack).

    ``executable`` is a ``tvm.runtime.Executable`` when built here, or a ``tvm_ffi`` module
    loaded from an exported library (``artifacts.py``; then ``prim_func`` is None)."""

    source: KernelSource
    target: Target
    prim_func: object
    executable: object
    _fn: object = field(default=None, repr=False)

    def __call__(self, *args):
        if self._fn is None:
            self._fn = self.executable[self.source.name]
        for a in args:
            if isinstance(a, torch.Tensor):
                check_aligned(a, self.source.name)
        self._fn(*args)

    def artifact(self) -> Artifact:
        if self.prim_func is None:  # loaded from an exported library: only the source is here
            return Artifact(self.source.stage, self.source.name, self.source.text,
                            files={"tir": self.source.text},
                            metadata={"target": str(self.target), "loaded": True})
        return Artifact(self.source.stage, self.source.name, self.source.text,
                        files=artifact_files(self), metadata={"target": str(self.target)})


def check_aligned(t: torch.Tensor, kernel: str) -> None:
    """TVM assumes 64-byte aligned, compact buffers; a misaligned one can segfault the process,
    so it is refused here with a message instead."""
    if not t.is_contiguous() or t.data_ptr() % ALIGN:
        raise AlignmentError(f"kernel {kernel}: tensor {tuple(t.shape)} {t.dtype} must be "
                             f"contiguous and {ALIGN}-byte aligned (got offset "
                             f"{t.data_ptr() % ALIGN}, contiguous={t.is_contiguous()}); pass "
                             "t.contiguous().clone() or allocate it with torch.empty")


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when TVM may read it in place, else an aligned compact copy (inputs only)."""
    if t.is_contiguous() and t.data_ptr() % ALIGN == 0:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return out.copy_(t)


_CACHE: dict[str, Kernel] = {}
_LOCK = threading.Lock()
STATS = {"builds": 0, "hits": 0}


def build(src: KernelSource, target: Target, threads: int = 0) -> Kernel:
    """Compile ``src`` for ``target`` (cached in-process by source and target)."""
    key = src.key(target)
    with _LOCK:
        if key in _CACHE:
            STATS["hits"] += 1
            return _CACHE[key]
    tvm, T = _tvm()
    try:
        func = tvm.script.from_source(src.text, extra_vars={"T": T})
    except Exception as e:  # the generated text is ours: show it with the error
        raise RuntimeError(f"TVMScript of kernel {src.name} failed to parse: {e}\n"
                           f"{_numbered(src.text)}") from e
    func = func.with_attr("global_symbol", src.name)
    mod = tvm.IRModule({src.name: func})
    ex = tvm.compile(mod, target=tvm_target(target, threads))
    kern = Kernel(src, target, func, ex)
    with _LOCK:
        STATS["builds"] += 1
        _CACHE[key] = kern
    return kern


def _numbered(text: str) -> str:
    return "\n".join(f"{i + 1:4d} {line}" for i, line in enumerate(text.splitlines()))


def artifact_files(k: Kernel) -> dict[str, str]:
    """TVMScript (``tir``), the lowered TIR (``lowered``) and the generated source: LLVM IR and
    assembly for llvm, CUDA C for cuda."""
    tvm, _ = _tvm()
    files = {"tir": k.source.text}
    mod = tvm.IRModule({k.source.name: k.prim_func})
    try:
        files["lowered"] = _lowered(mod, k.target)
    except Exception as e:  # a dump must not fail a build
        files["lowered"] = f"# lowering for the dump failed: {e}"
    rt = k.executable.mod
    if k.target.kind == "cuda":
        files["cuda"] = rt.imports[0].inspect_source()
    else:
        files["llvm"] = rt.inspect_source("ll")
        files["asm"] = rt.inspect_source("asm")
    return files


def _lowered(mod, target: Target) -> str:
    tvm, _ = _tvm()
    pipe = tvm.tirx.get_default_tir_pipeline(tvm_target(target))
    with tvm_target(target):
        return pipe(mod).script()


def cuda_source(k: Kernel) -> str:
    return k.executable.mod.imports[0].inspect_source()


def set_threads(n: int) -> None:
    """Size TVM's CPU thread pool (0: leave it as TVM chose)."""
    if n:
        import tvm_ffi
        tvm_ffi.get_global_func("runtime.config_threadpool")(1, n)
