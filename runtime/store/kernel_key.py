"""Kernel cache keys: the one place they are made, from data (STYLE.md habit 5).

A key is the sha256 of the canonical JSON (``twilight.compiler.ir.canonical_json``) of every
input that can change a compiled kernel: the IR key, the schedule, the target, the backend and
its ``version_stamp()``, the toolchain's versions (``toolchain_stamps``), the codegen knobs
(``knobs.codegen_knobs()``) and any ``extra`` plain data a backend keys on. Never a
hand-written string of fields: two kernels could then share a slot.

    >>> key = cache_key("ir0", {"BLOCK": 64}, "cuda:sm_90", "tvm", {"codegen": "3"})
    >>> len(key), key.inputs["schedule"]
    (64, {'BLOCK': 64})
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import platform
import sys
from pathlib import Path
from typing import Any

from ... import knobs
from ...compiler import ir
from ...compiler.backend import Target, get_backend
from ...version import __version__, dist_version

KEY_FORMAT = 1  # bump when the key's fields change meaning


class CacheKey(str):
    """A cache key (64 hex digits) that remembers its inputs, written to the manifest."""

    inputs: dict[str, Any]

    def __new__(cls, digest: str, inputs: dict[str, Any]) -> CacheKey:
        self = super().__new__(cls, digest)
        self.inputs = inputs
        return self


def cache_key(ir_key: str, schedule: dict, target: Any, backend: str, stamps: dict[str, str],
              extra: dict | None = None) -> CacheKey:
    """The key of one compiled kernel: sha256 of the canonical JSON of every input that can
    change its code: the IR key, the schedule, the target, the backend and its
    ``version_stamp()``, ``toolchain_stamps()``, ``knobs.codegen_knobs()`` and ``extra``
    (plain data: anything else a backend keys on, e.g. the problem shape).

    >>> a = cache_key("ir0", {"BLOCK": 64}, "cuda:sm_90", "triton", {"gen": "1"})
    >>> a == cache_key("ir0", {"BLOCK": 64}, "cuda:sm_90", "triton", {"gen": "1"})
    True
    >>> a == cache_key("ir0", {"BLOCK": 128}, "cuda:sm_90", "triton", {"gen": "1"})
    False
    """
    inputs = _plain({
        "format": KEY_FORMAT, "ir_key": ir_key, "schedule": schedule, "target": str(target),
        "backend": backend, "stamps": stamps, "toolchain": toolchain_stamps(backend, target),
        "knobs": knobs.codegen_knobs(), "extra": extra or {},
    }, "inputs")
    return CacheKey(hashlib.sha256(ir.canonical_json(inputs).encode()).hexdigest(), inputs)


def _plain(obj: Any, where: str) -> Any:
    """JSON-able data with str dict keys, or a TypeError naming the offending field."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"cache_key: {where} has non-str keys {bad!r}")
        return {k: _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return ir.to_data(obj)
    raise TypeError(f"cache_key: {where} is a {type(obj).__name__}; pass plain data "
                    "(str, int, float, bool, None, lists, str-keyed dicts) or IR dataclasses")


def toolchain_stamps(backend, target: Any = None) -> dict[str, str]:
    """Versions of what turns generated code into kernels, for ``backend`` (a ``Backend``, or
    its name) on ``target``: twilight, Python and torch always; what the backend says of its
    own toolchain (``Backend.version_stamp``: Triton's or TVM's version, read from package
    metadata; ``Backend.toolchain_stamps``: e.g. ``nvcc --version`` for a CUDA target of a
    backend that calls nvcc); the CPU architecture (and, for "the host", its features) for an
    ``llvm`` target.

    >>> sorted(toolchain_stamps("triton", "interpret"))
    ['codegen_sources', 'python', 'torch', 'triton', 'twilight']
    """
    b = get_backend(backend) if isinstance(backend, str) else backend
    tgt = target if isinstance(target, Target) or target is None else Target.parse(str(target))
    stamps = {"twilight": twilight_version(), "python": "{}.{}".format(*sys.version_info[:2]),
              "torch": dist_version("torch", "torch"), **b.version_stamp()}
    if tgt is not None:
        stamps.update(b.toolchain_stamps(tgt))
        if tgt.kind == "llvm":
            stamps["machine"] = platform.machine()
            if not tgt.arch:  # code for "the host CPU": key on its features
                stamps["host_cpu"] = host_cpu_stamp()
    return stamps


@functools.cache
def host_cpu_stamp() -> str:
    """A short hash of this CPU's model and instruction-set flags (``/proc/cpuinfo``), so a
    cache shared between machines never hands AVX-512 code to a CPU without it; without
    ``/proc/cpuinfo``, the platform's processor string."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    lines = sorted({line.split(":", 1)[1].strip() for line in text.splitlines()
                    if line.split(":", 1)[0].strip() in ("model name", "flags", "Features",
                                                         "CPU part")})
    basis = "\n".join(lines) or f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(basis.encode()).hexdigest()[:16]


def twilight_version() -> str:
    """twilight's version, as keys record it (a function, so a test can pretend an upgrade)."""
    return __version__
