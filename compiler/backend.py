"""The written backend interface: ``Backend`` (one per code generator) and ``StageKernels``
(what a backend's ``lower`` returns), a registry, and the ``Target`` they build for.

A backend turns a pipeline IR, a problem ``Shape``, a schedule (a dict drawn from the
backend's declared space in ``twilight.schedules``) and a ``Target`` into ``StageKernels``: one
kernel (or a fused one) per stage of the stage ABI (``compiler.stages``), the append kernels
that keep the cache's side data, and the artifacts for ``twilightc compile --dump``. The runtime
dispatches through :func:`get_backend` / :func:`backend_for` only — never on a backend's name —
and keys cached kernels on :meth:`Backend.version_stamp` (a hash of the backend's own generator
sources) and :meth:`Backend.toolchain_stamps`.

Every registered backend passes one conformance test (``tests/compiler/test_backend_protocol``).
"""

from __future__ import annotations

import abc
import importlib
import re
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import TwilightError
from . import ir

__all__ = ["CPU_THREADS", "Artifact", "Backend", "BackendUnavailableError", "ExportMismatch",
           "StageKernels", "Target", "UnknownBackendError", "backend_for", "backends", "get_backend",
           "register_backend"]


CPU_THREADS: ContextVar[int] = ContextVar("twilight_cpu_threads", default=0)
"""Threads the CPU kernels called in this context run on, over a schedule's own ``threads``
(0: the schedule's; a backend without CPU threads ignores it). The transformers attention
backend sets it around its decode calls (``runtime/serving/hf_attention.py``: ``install``)."""


@dataclass(frozen=True)
class Target:
    """Where kernels run: ``cuda:sm_90``, ``cuda:sm_80``, ``llvm`` (CPU), ``interpret``
    (Triton's interpreter on CPU tensors)."""

    kind: str  # "cuda" | "llvm" | "interpret"
    arch: str = ""  # "sm_90" for cuda; an LLVM mcpu for llvm ("" = the host)

    @classmethod
    def parse(cls, text: str) -> Target:
        kind, _, arch = text.partition(":")
        kind = {"cpu": "llvm"}.get(kind, kind)
        if kind not in ("cuda", "llvm", "interpret"):
            raise ValueError(f"unknown target {text!r}: use cuda:sm_80, cuda:sm_90, llvm or "
                             "interpret")
        if kind == "cuda" and not re.fullmatch(r"sm_[1-9][0-9]{1,2}a?", arch):
            raise ValueError(f"target {text!r}: name the CUDA arch, e.g. cuda:sm_90")
        if kind != "cuda" and arch:
            raise ValueError(f"target {text!r}: {kind} takes no arch (write {kind})")
        return cls(kind, arch)

    @property
    def sm(self) -> int:
        return int(self.arch[3:].rstrip("a")) if self.kind == "cuda" else 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.arch}" if self.arch else self.kind


@dataclass
class Artifact:
    """One generated kernel: its source and whatever the toolchain produced from it."""

    stage: str
    name: str
    source: str
    files: dict[str, bytes | str] = field(default_factory=dict)  # "ptx", "cubin", "so", "tir"…
    metadata: dict[str, Any] = field(default_factory=dict)  # registers, spills, shared, …


class ExportMismatch(RuntimeError):
    """An exported entry does not hold the kernels of the pipeline asked for (rebuild it)."""


@runtime_checkable
class StageKernels(Protocol):
    """A pipeline lowered by one backend for one shape, schedule and target.

    Stage methods take and return exactly the stage ABI's tensors (``compiler.stages``), so
    stages of different backends mix and each is checked against the reference alone. Buffers
    are sized by ``plan`` (and grown by the stage methods themselves when a later call needs
    more); stage outputs are planned buffers, valid until the same stage runs again.
    """

    artifacts: list[Artifact]

    def plan(self, batch: int, tokens: int) -> Any:
        """Size scratch for ``batch`` requests of up to ``tokens`` tokens."""

    def select(self, x) -> tuple[Any, Any]:
        """``(cand_idx int32 [B, Hq, C], cand_cnt int32 [B, Hq])``."""

    def scores(self, x, part: int = 0) -> Any:
        """Scored selector ``part``'s (``PipelineIR.selectors()``) scores ``float32 [B, rows,
        N]`` over pages or tokens, rows per query head (groups ``none``/``union``) or per KV
        head (merged), ``-inf`` on invalid units and NaN scores: a score checked on its own.
        ``select`` computes them as well; ``attend`` reads the latest (``mean_value``)."""

    def estimate(self, stage: int, x, idx, cnt) -> Any:
        """``est_w float32 [B, Hq, C]`` of pruner ``stage`` over the candidates."""

    def prune(self, stage: int, x, w, idx, cnt) -> tuple[Any, Any]:
        """``(kept_idx int32 [B, Hq, K], kept_cnt int32 [B, Hq])`` of pruner ``stage``."""

    def attend(self, x, idx, cnt) -> Any:
        """``out [B, Hq, D]`` in q's dtype: exact attention over the kept lists."""

    def run(self, q, cache, req=None, return_lists: bool = False) -> Any:
        """The stages end to end (``compiler.stages.run_stages``)."""

    def refresh_pages(self, cache, pages) -> None:
        """Recompute summaries and page-granularity codes of physical ``pages`` (int64)."""

    def refresh_tokens(self, cache, phys, slot) -> None:
        """Token summaries of the keys at ``(phys, slot)`` (int64 ``[N]``), and their codes in
        every token format."""

    def refresh_groups(self, cache, gp) -> None:
        """Min/max and codes of the groups ``gp int64 [N, G]`` of every group format."""


class FusedStep(Protocol):
    """What ``StageKernels`` also offer when their backend runs a whole decode step in one call
    (TVM on the CPU): ``DecodePipeline.run``/``step`` use it where ``fused`` is true."""

    fused: bool

    def call_fused(self, q, cache, ids: list[int], k=None, v=None, out=None,
                   return_lists: bool = False) -> Any:
        """``out [B, Hq, D]`` of the requests ``ids`` in one call; with ``k``/``v``
        ``[B, Hkv, D]`` it first appends them (one token each) as ``cache.append`` would."""


class Backend(abc.ABC):
    """One code generator. Subclasses set ``name`` and ``source_ext`` and register with
    :func:`register_backend`."""

    name: str = ""
    source_ext: str = "src"  # the generated source's file extension, for --dump

    # ---- targets ---------------------------------------------------------------------------
    @abc.abstractmethod
    def supports(self, target: Target) -> bool: ...

    @abc.abstractmethod
    def serving_target(self, device) -> Target | None:
        """The target this backend serves on ``device`` (a ``DeviceProfile``), or None if it
        does not serve there (Triton's interpreter is for tests, not for serving a CPU)."""

    def local_target(self) -> Target | None:
        """A target whose kernels run in this process now (for checks and tests), or None."""
        return None

    preference: int = 100
    """Lower is preferred when several backends serve one device (``backend_for``)."""

    # ---- lowering --------------------------------------------------------------------------
    @abc.abstractmethod
    def lower(self, p: ir.PipelineIR, shape: ir.Shape, schedule: dict, target: Target) \
            -> StageKernels: ...

    def space(self, p: ir.PipelineIR, shape: ir.Shape, target: Target):
        """The schedule space (``schedules.space.Space``) the tuner searches for ``p``: by
        default ``twilight.schedules.<name>.space(p, shape, target)`` if the module defines
        it, else its constant ``<NAME>`` (e.g. ``schedules.tvm.TVM``)."""
        mod = importlib.import_module(f"twilight.schedules.{self.name}")
        if hasattr(mod, "space"):
            return mod.space(p, shape, target)
        return getattr(mod, self.name.upper())

    def complete(self, schedule: dict) -> dict:
        """``schedule`` with the backend's defaults filled in (what its kernels are built
        from; a cache key must name the complete schedule)."""
        mod = importlib.import_module(f"twilight.schedules.{self.name}")
        return getattr(mod, self.name.upper()).complete(dict(schedule))

    def check_schedule(self, p: ir.PipelineIR, shape: ir.Shape, schedule: dict,
                       device) -> str | None:
        """Why ``schedule`` cannot run on ``device`` (a ``DeviceProfile``: shared memory,
        threads, registers), or None. Called before compiling, so it must be cheap."""
        return None

    # ---- identity (cache keys) -------------------------------------------------------------
    @abc.abstractmethod
    def version_stamp(self) -> dict[str, str]:
        """What changes generated code: the backend's own generator sources (hashed) and the
        version of the toolchain that compiles them."""

    def toolchain_stamps(self, target: Target) -> dict[str, str]:
        """Versions of external tools this backend calls for ``target`` (e.g. nvcc)."""
        return {}

    # ---- artifacts on disk -----------------------------------------------------------------
    def exports(self, target: Target) -> bool:
        """Whether :meth:`export` / :meth:`load_exported` work for ``target`` (then the
        runtime keeps compiled kernels in its ``KernelCache``)."""
        return False

    def export(self, kernels: StageKernels, out: Path) -> None:
        """Write ``kernels`` into the empty directory ``out`` (a cache entry being built)."""
        raise NotImplementedError(f"the {self.name} backend does not export kernels")

    def load_exported(self, p: ir.PipelineIR, shape: ir.Shape, schedule: dict, target: Target,
                      entry) -> StageKernels:
        """Kernels from an exported entry; raises :class:`ExportMismatch` when the entry does
        not hold this pipeline's kernels."""
        raise NotImplementedError(f"the {self.name} backend does not export kernels")

    def fresh(self, kernels: StageKernels) -> StageKernels:
        """Another ``StageKernels`` over the same compiled kernels with its own plan state
        (each ``twilight.load`` gets its own)."""
        return kernels

    def dump_artifacts(self, kernels: StageKernels, target: Target) -> list[Artifact]:
        """Every kernel of ``kernels`` with all its intermediates, for ``twilightc compile
        --dump`` (a backend that compiles lazily does the work here)."""
        return list(kernels.artifacts)


_REGISTRY: dict[str, Backend] = {}
_BUILTIN = ("twilight.compiler.triton", "twilight.compiler.tvm")


def register_backend(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.name] = cls()
    return cls


class BackendUnavailableError(TwilightError):
    """A backend that cannot run here as asked (Triton on a CPU without its interpreter)."""


class UnknownBackendError(TwilightError, KeyError):
    """No backend by that name here, or none that serves a device (a ``KeyError`` too)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def get_backend(name: str) -> Backend:
    """The backend called ``name``, importing only that built-in one (importing triton costs
    0.2 s, tvm's kernels more)."""
    if name not in _REGISTRY:
        mod = f"twilight.compiler.{name}"
        if mod in _BUILTIN:
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise UnknownBackendError(f"backend {name!r} is not available here: {e}") \
                    from None
    if name not in _REGISTRY:
        raise UnknownBackendError(f"unknown backend {name!r}; known: "
                                  f"{', '.join(sorted(backends()))}")
    return _REGISTRY[name]


def backends() -> dict[str, Backend]:
    """Every backend that imports on this machine, by name."""
    for mod in _BUILTIN:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    return dict(_REGISTRY)


def backend_for(device, names: Sequence[str] | None = None) -> tuple[Backend, Target]:
    """The preferred backend that serves ``device`` (a ``DeviceProfile``) and its target;
    ``names`` limits the choice."""
    found = []
    for b in backends().values():
        t = b.serving_target(device)
        if t is not None and (names is None or b.name in names):
            found.append((b.preference, b.name, b, t))
    if not found:
        raise UnknownBackendError(f"no backend serves {device.name} ({device.kind})")
    _, _, b, t = min(found, key=lambda x: x[:2])
    return b, t
