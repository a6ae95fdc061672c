"""CUDA source from the TVM backend → a cubin, with nvcc when the machine has it (no GPU needed).

``twilightc compile --backend tvm --target cuda:sm_XX --dump DIR`` calls
:func:`compile_cubin` on each kernel's CUDA source: ``nvcc -cubin -arch=sm_XX -Xptxas -v``.
Registers, stack, spills and shared memory come from ptxas's report (``-v``), summed or maxed
over the module's ``__global__`` functions (TVM may split a kernel in several): ``registers``
the most any function uses, ``spills`` the spill stores' bytes, ``shared`` the most static
shared memory. Without nvcc the dump holds the source only and says so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["NvccError", "compile_cubin", "nvcc_path", "ptxas_usage"]


class NvccError(RuntimeError):
    """nvcc failed on generated CUDA source (the message carries its diagnostics)."""


def nvcc_path() -> str | None:
    """nvcc on ``PATH``, else under ``$CUDA_HOME`` or ``/usr/local/cuda``; None if absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and Path(root, "bin", "nvcc").is_file():
            return str(Path(root, "bin", "nvcc"))
    return None


_FN = re.compile(r"Compiling entry function '([^']+)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_usage(log: str) -> dict[str, int]:
    """``registers``, ``stack``, ``spills`` (spill store bytes), ``spill_loads``, ``shared`` and
    ``functions`` from ptxas's ``-v`` report of one module."""
    out = {"registers": 0, "stack": 0, "spills": 0, "spill_loads": 0, "shared": 0,
           "functions": len(_FN.findall(log))}
    for st, ss, sl in _STACK.findall(log):
        out["stack"] = max(out["stack"], int(st))
        out["spills"] += int(ss)
        out["spill_loads"] += int(sl)
    for r in _REGS.findall(log):
        out["registers"] = max(out["registers"], int(r))
    for m in _SMEM.findall(log):
        out["shared"] = max(out["shared"], int(m))
    return out


def compile_cubin(source: str, arch: str, nvcc: str | None = None) -> tuple[bytes, dict, str]:
    """``(cubin, usage, ptxas log)`` of CUDA ``source`` for ``arch`` (``sm_90``)."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise NvccError("nvcc is not installed (set CUDA_HOME or put nvcc on PATH)")
    with tempfile.TemporaryDirectory(prefix="twilight-nvcc-") as tmp:
        src, out = Path(tmp, "kernel.cu"), Path(tmp, "kernel.cubin")
        src.write_text(source)
        res = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-o", str(out),
                              str(src)], capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise NvccError(f"nvcc -arch={arch} failed ({res.returncode}):\n{res.stderr[-4000:]}")
        log = res.stdout + res.stderr
        return out.read_bytes(), ptxas_usage(log), log
