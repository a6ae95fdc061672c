"""Backends behind one small interface and a registry (Triton, TVM, ...).

A backend turns a pipeline IR, a problem ``Shape``, a schedule (a dict drawn from the
backend's declared space in ``twilight.schedules``) and a ``Target`` into a ``Compiled``
pipeline: its artifacts (generated source, PTX, libraries, resource reports) and a ``run``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from . import ir


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
        if kind == "cuda" and not arch.startswith("sm_"):
            raise ValueError(f"target {text!r}: name the CUDA arch, e.g. cuda:sm_90")
        return cls(kind, arch)

    @property
    def sm(self) -> int:
        return int(self.arch[3:]) if self.kind == "cuda" else 0

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


class Compiled(abc.ABC):
    """A pipeline lowered by one backend for one shape, schedule and target."""

    artifacts: list[Artifact]

    @abc.abstractmethod
    def run(self, q, cache, req=None, return_lists: bool = False):
        """The stage ABI end to end (``twilight.compiler.stages``): output ``[B, Hq, D]``;
        with ``return_lists`` also ``(kept_idx, kept_cnt)``."""


class Backend(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def supports(self, target: Target) -> bool: ...

    @abc.abstractmethod
    def lower(self, p: ir.PipelineIR, shape: ir.Shape, schedule: dict, target: Target) \
            -> Compiled: ...

    @abc.abstractmethod
    def version_stamp(self) -> dict[str, str]:
        """Versions that change generated code (for cache keys)."""

    def space(self, p: ir.PipelineIR, shape: ir.Shape, target: Target):
        """The schedule space (``schedules.space.Space``) the tuner searches for ``p``: by
        default ``twilight.schedules.<name>.space(p, shape, target)`` if the module defines
        it, else its constant ``<NAME>`` (e.g. ``schedules.tvm.TVM``)."""
        import importlib
        mod = importlib.import_module(f"twilight.schedules.{self.name}")
        if hasattr(mod, "space"):
            return mod.space(p, shape, target)
        return getattr(mod, self.name.upper())

    def dump_artifacts(self, compiled: Compiled, target: Target) -> list[Artifact]:
        """Every kernel of ``compiled`` with all its intermediates, for ``twilightc compile
        --dump`` (a backend that compiles lazily does the work here)."""
        return list(compiled.artifacts)

    def check_schedule(self, p: ir.PipelineIR, shape: ir.Shape, schedule: dict,
                       device) -> str | None:
        """Why ``schedule`` cannot run on ``device`` (a ``DeviceProfile``: shared memory,
        threads, registers), or None. Called before compiling, so it must be cheap."""
        return None


_REGISTRY: dict[str, Backend] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.name] = cls()
    return cls


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        _load_builtin_backends()
    if name not in _REGISTRY:
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def backends() -> dict[str, Backend]:
    _load_builtin_backends()
    return dict(_REGISTRY)


def _load_builtin_backends() -> None:
    import importlib
    for mod in ("twilight.compiler.triton", "twilight.compiler.tvm"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
