"""The kernel cache's errors and warnings, one class per failure mode (``kernel_cache``
re-exports them)."""

from __future__ import annotations

import errno
from pathlib import Path

from ...errors import TwilightError


class CacheMissError(TwilightError):
    """A kernel is not in the cache and ``TWILIGHT_DISABLE_COMPILE`` forbids building it."""

    def __init__(self, key: str, describe: dict, cache_dir: Path):
        self.key, self.describe, self.cache_dir = key, describe, cache_dir
        inputs = getattr(key, "inputs", None) or {}
        named = {**{k: inputs[k] for k in ("backend", "target") if k in inputs}, **describe}
        what = ", ".join(f"{k}={v}" for k, v in named.items()) or "a kernel"
        super().__init__(
            f"no compiled kernel for {what} (key {key[:16]}) in the kernel cache {cache_dir}, "
            "and TWILIGHT_DISABLE_COMPILE=1 forbids compiling it here.\n"
            "hint: populate the cache ahead of time by running the same pipeline, shapes, "
            "schedule and target once with TWILIGHT_DISABLE_COMPILE unset (twilight and "
            "toolchain versions are part of the key, so use the same ones), or point "
            "TWILIGHT_CACHE_DIR at a cache built that way; 'twilightc cache ls' lists it.")


class CacheDirError(TwilightError):
    """The cache directory cannot be written where it must be: read-only, not a directory,
    full. A hit still loads from a read-only cache; a miss, a removal or a clear cannot."""


def dir_error(path: Path, doing: str, e: OSError) -> CacheDirError:
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the cache dir is read-only"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        why = f"{e.filename or path} is a file where a directory belongs (remove it, or " \
              "point TWILIGHT_CACHE_DIR elsewhere)"
    elif e.errno == errno.ENOSPC:
        why = "the disk is full"
    else:
        why = e.strerror or str(e)
    return CacheDirError(f"kernel cache {path}: cannot {doing}: {why}")


def entry_name(describe: dict, key: str) -> str:
    """A short name of an entry for messages: its kernel or pipeline, backend and target."""
    named = [str(describe[k]) for k in ("pipeline", "kernel", "backend", "target")
             if k in describe]
    return f"{' '.join(named)} (key {key[:16]})" if named else f"key {key[:16]}"


class CacheLookupError(TwilightError, LookupError):
    """``info``: no entry, or more than one, starts with the given key prefix."""


class BuildOutputError(TwilightError):
    """A build function wrote nothing, or wrote something the cache cannot store."""


class CorruptEntryWarning(UserWarning):
    """A cache entry failed its checks; it was moved away and will be rebuilt."""


class CorruptEntry(Exception):
    """Internal: why an entry on disk cannot be used."""
