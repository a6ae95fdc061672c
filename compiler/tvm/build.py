"""Targets, compilation, the in-process module cache, and DLPack calls with alignment checks.

Kernels are generated as TVMScript text (``twilight.compiler.tvm.dialect``), parsed with
TVM's own parser and compiled by ``tvm.compile``. A kernel is cached in-process by the sha256 of
its source and target, so pipelines that share a stage (every pipeline's attention, say) compile
it once, and one compiled function serves every batch, context and candidate count (those are
symbolic ``T.int32`` vars).
"""

from __future__ import annotations

import functools
import hashlib
import os
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


@cache
def has_vnni(target: Target) -> bool:
    """Does the llvm ``target`` have AVX-512 VNNI (and VL), which the estimate's integer tile
    path needs (``estimate_int8``)? The host CPU (no arch) by its flags in /proc/cpuinfo, so
    that a warm process still imports no TVM; else, or off Linux, as LLVM sees the CPU."""
    if target.kind != "llvm":
        return False
    if not target.arch:
        flags = _host_cpu_flags()
        if flags is not None:
            return {"avx512_vnni", "avx512vl"} <= flags
    tvm, _ = _tvm()
    from tvm.target import codegen
    return bool(codegen.llvm_cpu_has_features(["avx512vnni", "avx512vl"], tvm_target(target)))


def _host_cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def is_module(src: KernelSource) -> bool:
    """Is ``src`` a whole IRModule (the fused step) rather than one PrimFunc?"""
    return src.text.startswith("@I.ir_module")


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
    entries: dict = field(default_factory=dict, compare=False, repr=False)  # a module's
    # public functions → their buffers' names, in argument order (the fused module)

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
    member_of: str = ""  # the module kernel whose executable this one is a function of
    _fn: object = field(default=None, repr=False)

    def __call__(self, *args):
        if self._fn is None:
            self._fn = self.executable[self.source.name]
        for a in args:
            if isinstance(a, torch.Tensor):
                check_aligned(a, self.source.name)
        self._fn(*args)

    def entry(self, name: str):
        """The raw function ``name`` of the compiled module (no alignment checks: the caller
        checks what it did not allocate itself)."""
        return self.executable[name]

    def artifact(self) -> Artifact:
        if self.prim_func is None:  # loaded from an exported library: only the source is here
            return Artifact(self.source.stage, self.source.name, self.source.text,
                            files={"tir": self.source.text},
                            metadata={"target": str(self.target), "loaded": True})
        meta = {"target": str(self.target)} | ({"module": self.member_of} if self.member_of
                                                else {})
        return Artifact(self.source.stage, self.source.name, self.source.text,
                        files=artifact_files(self), metadata=meta)


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
    from tvm.script import ir as I  # noqa: E741, N812, PLC0415 - TVMScript's own name
    try:
        func = tvm.script.from_source(src.text, extra_vars={"T": T, "I": I})
    except Exception as e:  # the generated text is ours: show it with the error
        raise RuntimeError(f"TVMScript of kernel {src.name} failed to parse: {e}\n"
                           f"{_numbered(src.text)}") from e
    if is_module(src):
        mod = func
    else:
        func = func.with_attr("global_symbol", src.name)
        mod = tvm.IRModule({src.name: func})
    ex = tvm.compile(mod, target=tvm_target(target, threads))
    kern = Kernel(src, target, func, ex)
    with _LOCK:
        STATS["builds"] += 1
        _CACHE[key] = kern
    return kern


def member(src: KernelSource, module: Kernel) -> Kernel:
    """Kernel ``src`` as the function of the same name in ``module``'s executable."""
    return Kernel(src, module.target, module.prim_func, module.executable, module.source.name)


def _numbered(text: str) -> str:
    return "\n".join(f"{i + 1:4d} {line}" for i, line in enumerate(text.splitlines()))


def artifact_files(k: Kernel) -> dict[str, str]:
    """TVMScript (``tir``), the lowered TIR (``lowered``) and the generated source: LLVM IR and
    assembly for llvm, CUDA C for cuda."""
    tvm, _ = _tvm()
    files = {"tir": k.source.text}
    if k.member_of:  # a function of a module: its own subroutine, lowered with the module
        try:
            impl = f"{k.source.name}_impl"
            files["lowered"] = (f"# {impl}, lowered with module {k.member_of}\n"
                                + _lowered_module(k.prim_func, k.target)[impl].script())
        except Exception as e:  # a dump must not fail a build
            files["lowered"] = f"# lowering for the dump failed: {e}"
        return files  # the module's own artifact holds the LLVM IR and assembly
    mod = k.prim_func if is_module(k.source) else tvm.IRModule({k.source.name: k.prim_func})
    try:
        files["lowered"] = _lowered_module(mod, k.target).script()
    except Exception as e:  # a dump must not fail a build
        files["lowered"] = f"# lowering for the dump failed: {e}"
    rt = k.executable.mod
    if k.target.kind == "cuda":
        files["cuda"] = rt.imports[0].inspect_source()
    else:
        files["llvm"] = rt.inspect_source("ll")
        files["asm"] = rt.inspect_source("asm")
    return files


_LOWERED: dict[tuple[int, str], tuple] = {}  # (id, target) -> (module, lowered): kept alive


def _lowered_module(mod, target: Target):
    """``mod`` through TVM's default TIR pipeline (memoized: a module's kernels share it)."""
    key = (id(mod), str(target))
    if key not in _LOWERED:
        tvm, _ = _tvm()
        pipe = tvm.tirx.get_default_tir_pipeline(tvm_target(target))
        if isinstance(pipe, tuple):  # TVM 0.27: (pipeline, host finalizer, device finalizer)
            pipe = pipe[0]
        tgt = tvm_target(target)
        with tgt:  # bound as tvm.tirx.build binds it (with its host), or the pipeline refuses
            low = pipe(tvm.tirx.transform.BindTarget(tgt.with_host(tgt))(mod))
        _LOWERED[key] = (mod, low)
    return _LOWERED[key][1]


def cuda_source(k: Kernel) -> str:
    return k.executable.mod.imports[0].inspect_source()


def pool_threads() -> int:
    """The workers of TVM's CPU thread pool, as TVM reads them: ``TVM_NUM_THREADS``, else
    ``OMP_NUM_THREADS``, else (``size_pool`` sets the first) torch's intra-op thread count."""
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").strip().isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    return torch.get_num_threads()


SPIN_COUNT = 3000  # sched_yield calls a TVM worker makes before it sleeps (see size_pool)


def size_pool() -> None:
    """Give TVM's thread pool ``pool_threads()`` workers; called when this module is imported,
    before any TVM kernel runs.

    TVM sizes a thread's pool once, at its first parallel loop, from ``TVM_NUM_THREADS`` or
    ``OMP_NUM_THREADS``, else *half* the logical CPUs on x86 (it assumes two hyper-threads a
    core). On a machine without SMT that halves the cores: on this project's 2-vCPU CI machine
    every TVM kernel ran on one thread while torch's SDPA ran on two. So, without either
    variable, ``TVM_NUM_THREADS`` is set to torch's thread count. The pool never grows after
    its first loop; ``runtime.config_threadpool`` only uses fewer of its workers.

    TVM's workers also spin after each task before they sleep: 300,000 ``sched_yield`` calls
    by default, long enough to slow whatever torch runs next on those cores (SDPA timed right
    after a block of twilight calls took 5.5 ms a call instead of 1.6 over its first ten
    calls: a slowed baseline flatters twilight). Sleeping at once (0) costs a fused step a
    wake-up per parallel phase (the main job's 3 layers: 3.4–3.7 ms instead of 2.8–2.9). So,
    unless the user set ``TVM_THREAD_POOL_SPIN_COUNT``, they spin ``SPIN_COUNT`` times: through
    the gaps between a step's phases, asleep before the next torch op. 300 was too short for
    the gap that ``run()``'s finite check of the query (a torch op) and Python leave before a
    step: the served step at 9/3 heads × 64, 1×8k took 0.285 ms against 0.207 ms with 3000
    (32/8 × 128, 1×8k: 0.89 against 0.79 ms); SDPA's first calls right after twilight took
    0.46–0.47 ms at 9/3 × 64 either way, and 1.97 against 1.86 ms at 32/8 × 128 (settled
    1.56–1.60):
    ``python benchmarks/pool_spin.py``, 2 cores, 2026-12-01."""
    if not any(os.environ.get(v) for v in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")):
        os.environ["TVM_NUM_THREADS"] = str(torch.get_num_threads())
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(SPIN_COUNT))


@functools.cache
def _pool_size() -> int:
    """``pool_threads()`` once: TVM sizes its pool once, at its first parallel loop."""
    return pool_threads()


_used = threading.local()  # .n: the workers set_threads last asked for in this thread (TVM's
# pools, and their configurations, are per calling thread)


def set_threads(n: int) -> None:
    """Run TVM's parallel loops on ``n`` of the pool's workers (a schedule's ``threads``; more
    than the pool runs on the pool), or on the whole pool (0). Called before every kernel call:
    it costs a comparison unless ``n`` changes (a reconfiguration sets every worker's
    affinity). ``n`` at or past the pool is the whole pool, 0: a model whose layers alternate
    a schedule of ``threads=4`` and one of 0 on a 2-worker pool reconfigured it on every call."""
    if n >= _pool_size():
        n = 0
    if n != getattr(_used, "n", 0):
        import tvm_ffi
        tvm_ffi.get_global_func("runtime.config_threadpool")(1, n)
        _used.n = n


size_pool()
