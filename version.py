"""twilight's version, and version stamps of what generates and compiles its kernels.

Part of the ground floor: any layer may import it. ``source_stamp`` hashes code generators so a
backend's cache entries change when its generators do; ``dist_version`` reads an installed
distribution's version from its metadata (importing the module only as a fallback: TVM takes
seconds to import).

    >>> from pathlib import Path
    >>> len(source_stamp(Path(__file__)))
    16
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

__version__ = "0.1.0"

__all__ = ["__version__", "dist_version", "nvcc_version", "source_stamp"]


def source_stamp(*paths: str | os.PathLike[str]) -> str:
    """sha256 (16 hex digits) of the ``.py`` files at ``paths`` (files, or directories taken
    non-recursively), by relative name and content: a backend keys its entries on its own
    code generators with it, so editing a generator invalidates what it generated."""
    h = hashlib.sha256()
    for base in map(Path, paths):
        files = sorted(base.glob("*.py")) if base.is_dir() else [base]
        for f in files:
            h.update(f"{f.parent.name}/{f.name}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def dist_version(dist: str, module: str) -> str:
    """The installed version of distribution ``dist`` (import name ``module``), ``"absent"``
    when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    if importlib.util.find_spec(module) is None:
        return "absent"
    return str(getattr(importlib.import_module(module), "__version__", "unknown"))


def nvcc_version() -> str:
    """The release and build lines of ``nvcc --version`` (``$CUDA_HOME/bin/nvcc`` or the one on
    ``PATH``), ``"absent"`` without one; run once per nvcc per process."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    exe = Path(home, "bin", "nvcc") if home and Path(home, "bin", "nvcc").exists() \
        else shutil.which("nvcc")
    return _run_nvcc(str(exe)) if exe else "absent"


@functools.cache
def _run_nvcc(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"unusable ({type(e).__name__})"
    lines = [s.strip() for s in out.splitlines() if "release" in s or s.startswith("Build")]
    return " / ".join(lines) or out.strip()[-200:]


