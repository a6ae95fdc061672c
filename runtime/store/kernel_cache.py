"""The kernel cache: compiled kernels in memory and on disk, keyed by everything that made them.

Backends hand the cache opaque files (Triton source, PTX, cubins, TVM ``.so`` libraries); the
cache knows nothing of their contents. The contract (FlashInfer's JitSpec, Triton's
``FileCacheManager``):

* ``cache_key(...)`` is the one place a key is made: a sha256 of the canonical JSON of the IR
  key, schedule, target, backend, version stamps, toolchain versions and codegen knobs;
* ``try_load(key)`` returns an ``Entry`` or ``None``; a missing, truncated, garbled or
  checksum-mismatched entry is a warning and ``None`` (the bad entry is moved away), never an
  exception;
* ``get_or_build(key, build)`` builds a miss under an exclusive per-key file lock, checks again
  once it holds the lock, builds into a temp dir and publishes it with one ``os.replace``;
  readers therefore see a whole entry or none. With ``TWILIGHT_DISABLE_COMPILE=1`` a miss
  raises ``CacheMissError`` instead.

On disk (under ``TWILIGHT_CACHE_DIR``)::

    kernels/<key[:2]>/<key>/          one entry: the build's files + manifest.json
    kernels/.locks/<key>.lock         flock per key (dropped by the kernel if a builder dies)
    kernels/.tmp/<key>.<pid>.<rand>/  builds in progress (a dead builder's are swept)
    kernels/.trash/                   entries being deleted (renamed here first, then removed)

Example::

    >>> import tempfile
    >>> cache = KernelCache(tempfile.mkdtemp())
    >>> key = cache_key("ir0", {"BLOCK": 64}, "interpret", "triton", stamps={})
    >>> def build(out):
    ...     (out / "kernel.py").write_text("# generated")
    >>> cache.get_or_build(key, build, {"kernel": "demo"}).read("kernel.py")
    b'# generated'
    >>> cache.try_load(key) is not None
    True
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ... import knobs
from .cache_errors import (
    BuildOutputError,
    CacheDirError,
    CacheLookupError,
    CacheMissError,
    CorruptEntry,
    CorruptEntryWarning,
    dir_error,
    entry_name,
)
from .filelock import FileLock
from .kernel_key import KEY_FORMAT, CacheKey, cache_key, toolchain_stamps, twilight_version

__all__ = ["BuildOutputError", "CacheDirError", "CacheKey", "CacheLookupError", "CacheMissError",
           "CorruptEntryWarning", "Entry", "KernelCache", "cache_key", "default_cache",
           "toolchain_stamps"]

MANIFEST = "manifest.json"
_KEY_RE = re.compile(r"[0-9a-f]{64}")


# -------------------------------------------------------------------------------- the entries


@dataclass
class Entry:
    """One cache entry: its directory, its manifest and (once loaded) its verified bytes.

    ``problem`` is set only on entries listed by ``ls``/``info`` that failed a check."""

    key: str
    path: Path
    manifest: dict[str, Any]
    problem: str | None = None
    data: dict[str, bytes] | None = field(default=None, repr=False)

    @property
    def files(self) -> dict[str, Path]:
        """File name → path on disk (e.g. to hand a ``.so`` to a loader)."""
        return {name: self.path / name for name in self.manifest.get("files", {})}

    def read(self, name: str) -> bytes:
        """The bytes of one file, as verified when the entry was loaded."""
        if self.data is not None:
            return self.data[name]
        return (self.path / name).read_bytes()

    def text(self, name: str) -> str:
        return self.read(name).decode()

    @property
    def size(self) -> int:
        return sum(int(m.get("size", 0)) for m in self.manifest.get("files", {}).values())

    @property
    def describe(self) -> dict[str, Any]:
        return self.manifest.get("describe") or {}

    @property
    def created(self) -> float:
        return float(self.manifest.get("created") or _mtime(self.path))


def _read_entry(path: Path, key: str, check_files: bool = True) -> Entry:
    """Load and check an entry directory; ``CorruptEntry`` says what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CorruptEntry("manifest.json missing") from None
    except (OSError, ValueError) as e:
        raise CorruptEntry(f"manifest.json unreadable ({type(e).__name__}: {e})") from None
    m = manifest if isinstance(manifest, dict) else {}
    files = m.get("files")
    if m.get("key") != key or m.get("format") != KEY_FORMAT or not isinstance(files, dict) \
            or not isinstance(m.get("created"), int | float) \
            or not isinstance(m.get("describe"), dict):
        raise CorruptEntry("manifest.json malformed, of another format, or for another key")
    data: dict[str, bytes] = {}
    for name, meta in files.items():
        if not _safe_name(name) or not isinstance(meta, dict) \
                or not isinstance(meta.get("size"), int) or not isinstance(meta.get("sha256"), str):
            raise CorruptEntry(f"manifest.json lists a bad file entry {name!r}")
        if not check_files:
            continue
        try:
            blob = (path / name).read_bytes()
        except OSError as e:
            raise CorruptEntry(f"{name}: unreadable ({type(e).__name__})") from None
        if len(blob) != meta.get("size"):
            raise CorruptEntry(f"{name}: {len(blob)} bytes, manifest says {meta.get('size')}")
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            raise CorruptEntry(f"{name}: sha256 does not match the manifest")
        data[name] = blob
    return Entry(key, path, manifest, data=data if check_files else None)


def _safe_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and name != MANIFEST \
        and not name.startswith("/") and ".." not in name.split("/")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- the cache


class KernelCache:
    """Compiled kernels in memory and under ``cache_dir`` (default: ``TWILIGHT_CACHE_DIR``)."""

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else knobs.cache_dir()
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise CacheDirError(f"kernel cache {self.cache_dir}: is a file, not a directory "
                                "(point TWILIGHT_CACHE_DIR or --cache-dir at a directory)")
        self.root = self.cache_dir / "kernels"
        self._memory: dict[str, Entry] = {}

    def try_load(self, key: str) -> Entry | None:
        """The entry of ``key`` from memory or disk, or ``None``. Never raises for a missing or
        bad entry: a bad one is reported (``CorruptEntryWarning``) and moved away."""
        if key in self._memory:
            return self._memory[key]
        path = self._entry_dir(key)
        try:
            inode = path.stat().st_ino
        except OSError:
            return None
        try:
            entry = _read_entry(path, key)
        except CorruptEntry as e:
            gone = self._discard(path, inode)
            then = "removed it so that it is rebuilt" if gone else \
                "it stays: the cache dir is read-only (rebuild it where the cache is writable)"
            warnings.warn(f"twilight kernel cache: entry {key[:16]} at {path} is corrupt ({e}); "
                          f"{then}", CorruptEntryWarning, stacklevel=2)
            return None
        self._memory[key] = entry
        return entry

    def get_or_build(self, key: str, build: Callable[[Path], None],
                     describe: dict | None = None) -> Entry:
        """The entry of ``key``; on a miss, ``build(dir)`` writes the kernel's files into
        ``dir`` (an empty temp directory) and the result is published atomically. Across
        processes, one builds and the others wait for it and load its entry.

        Raises ``CacheMissError`` on a miss under ``TWILIGHT_DISABLE_COMPILE=1``; an exception
        of ``build`` propagates and leaves no entry behind."""
        describe = dict(describe or {})
        entry = self.try_load(key)
        if entry is not None:
            return entry
        if knobs.disable_compile():
            raise CacheMissError(key, describe, self.cache_dir)
        lock = self._lock(key, f"build {entry_name(describe, key)}")
        try:
            entry = self.try_load(key)  # second check: another process may have built it
            if entry is None:
                entry = self._build(key, build, describe)
        finally:
            lock.release()
        self._memory[key] = entry
        return entry

    def _build(self, key: str, build: Callable[[Path], None], describe: dict) -> Entry:
        tmp_root = self.root / ".tmp"
        for stale in tmp_root.glob(f"{key}.*"):  # we hold the key's lock: these are orphans
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tmp_root / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            raise dir_error(self.cache_dir, f"build {entry_name(describe, key)}", e) from None
        try:
            try:
                build(tmp)
            except BaseException as e:
                e.add_note(f"(while building kernel cache entry {key[:16]} {describe})")
                raise
            self._write_manifest(tmp, key, describe)
            final = self._entry_dir(key)
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():
                    self._discard(final)
                os.replace(tmp, final)
            except OSError as e:
                raise dir_error(self.cache_dir, f"store {entry_name(describe, key)}", e) from None
            _fsync(final.parent, directory=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _read_entry(final, key)

    def _write_manifest(self, tmp: Path, key: str, describe: dict) -> None:
        files = {}
        for p in sorted(tmp.rglob("*")):
            name = p.relative_to(tmp).as_posix()
            if p.is_symlink() or not (p.is_file() or p.is_dir()) or name == MANIFEST:
                raise BuildOutputError(f"build for {key[:16]} wrote {name!r}: write regular "
                                       f"files only, and none named {MANIFEST}")
            if p.is_file():
                blob = p.read_bytes()
                files[name] = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
                _fsync(p)
        if not files:
            raise BuildOutputError(f"build for {key[:16]} {describe} wrote no files")
        manifest = {"format": KEY_FORMAT, "key": str(key),
                    "inputs": getattr(key, "inputs", None), "describe": describe,
                    "files": files, "created": time.time(),
                    "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "twilight_version": twilight_version()}
        with open(tmp / MANIFEST, "w") as f:  # last: an entry without it is incomplete
            json.dump(manifest, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            _fsync(d, directory=True)

    # ------------------------------------------------------------------ inspection, cleaning

    def ls(self) -> list[Entry]:
        """Every entry, oldest first, from manifests only (files unchecked); an entry whose
        manifest cannot be read is listed with ``problem`` set."""
        out = []
        for key, path in self._scan():
            try:
                out.append(_read_entry(path, key, check_files=False))
            except CorruptEntry as e:
                out.append(Entry(key, path, {}, problem=str(e)))
        return sorted(out, key=lambda e: (e.created, e.key))

    def info(self, key_prefix: str) -> Entry:
        """The entry whose key starts with ``key_prefix``, files checked (``problem`` says what
        failed); ``CacheLookupError`` if none or several match."""
        prefix = key_prefix.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{1,64}", prefix):
            raise CacheLookupError(f"{key_prefix!r} is not a key prefix (hex digits)")
        found = [(k, p) for k, p in self._scan(prefix[:2]) if k.startswith(prefix)]
        if len(found) != 1:
            detail = "no entry" if not found else f"{len(found)} entries"
            raise CacheLookupError(f"{detail} in {self.root} with a key starting {prefix!r}")
        key, path = found[0]
        try:
            return _read_entry(path, key)
        except CorruptEntry as e:
            try:
                return Entry(key, path, _read_entry(path, key, False).manifest, problem=str(e))
            except CorruptEntry:
                return Entry(key, path, {}, problem=str(e))

    def verify(self, fix: bool = False) -> list[tuple[str, str]]:
        """``(key, problem)`` for every entry that fails a check (manifest, sizes, sha256);
        ``fix=True`` removes those entries (``CacheDirError`` if one cannot be removed)."""
        problems = []
        for key, path in self._scan():
            try:
                _read_entry(path, key)
            except CorruptEntry as e:
                problems.append((key, str(e)))
        for key, _ in problems if fix else ():
            self.remove(key)
        return problems

    def remove(self, key: str) -> bool:
        """Delete one entry (from memory and disk); ``False`` if it was not there,
        ``CacheDirError`` if it is there and cannot be deleted (a read-only cache)."""
        self._memory.pop(key, None)
        path = self._entry_dir(key)
        if not path.exists():
            return False
        if not self._discard(path) and path.exists():
            raise dir_error(self.cache_dir, f"remove entry {key[:16]}",
                             OSError(errno.EACCES, "read-only"))
        return True

    def clear(self, older_than: timedelta | None = None) -> int:
        """Delete every entry (or those created more than ``older_than`` ago, ≥ 0) and the
        debris of dead builds; returns how many entries went. Builds in progress are left
        alone. ``CacheDirError`` if an entry cannot be deleted."""
        if older_than is not None and older_than.total_seconds() < 0:
            raise ValueError(f"older_than={older_than}: expected a duration ≥ 0")
        cutoff = time.time() - older_than.total_seconds() if older_than is not None else None
        removed = 0
        for entry in self.ls():
            if cutoff is None or entry.created < cutoff:
                removed += self.remove(entry.key)
        if cutoff is None:
            self._sweep_locks_and_tmp()
        return removed

    def size_bytes(self) -> int:
        """Bytes on disk under the cache's ``kernels/`` directory."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()) \
            if self.root.exists() else 0

    # ---------------------------------------------------------------------------- helpers

    def _entry_dir(self, key: str) -> Path:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"not a kernel cache key: {key!r} (make keys with cache_key())")
        return self.root / key[:2] / key

    def _lock(self, key: str, doing: str) -> FileLock:
        """The key's build lock, taken; a cache that cannot hold one is a CacheDirError."""
        lock = FileLock(self.root / ".locks" / f"{key}.lock")
        try:
            lock.acquire()
        except OSError as e:
            raise dir_error(self.cache_dir, doing, e) from None
        return lock

    def _scan(self, shard: str = "") -> Iterator[tuple[str, Path]]:
        if not self.root.exists():
            return
        for shard_dir in sorted(self.root.glob(f"{shard}*" if len(shard) == 2 else "??")):
            for path in sorted(shard_dir.iterdir()) if shard_dir.is_dir() else ():
                if _KEY_RE.fullmatch(path.name) and path.name.startswith(shard_dir.name):
                    yield path.name, path

    def _discard(self, path: Path, expect_inode: int | None = None) -> bool:
        """Rename ``path`` into the trash (readers never see half a deletion), then delete it.
        With ``expect_inode``, an entry that replaced the bad one meanwhile is put back.
        ``False`` if it could not be moved (gone already, or a read-only cache)."""
        trash = self.root / ".trash" / f"{path.name}.{uuid.uuid4().hex[:8]}"
        try:
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, trash)
            moved = trash.stat().st_ino
        except OSError:
            return False  # gone already (another process was first), or a read-only cache
        if expect_inode is not None and moved != expect_inode:
            try:
                os.rename(trash, path)
                return True
            except OSError:
                pass
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
        return True

    def _sweep_locks_and_tmp(self) -> None:
        locks = self.root / ".locks"
        for lock_path in locks.glob("*.lock") if locks.is_dir() else ():
            lock = FileLock(lock_path)
            try:
                if not lock.acquire(blocking=False):  # someone builds this key now
                    continue
            except OSError as e:
                raise dir_error(self.cache_dir, "clear build debris", e) from None
            for stale in (self.root / ".tmp").glob(f"{lock_path.stem}.*"):
                shutil.rmtree(stale, ignore_errors=True)
            lock.unlink_and_release()
        shutil.rmtree(self.root / ".trash", ignore_errors=True)


@functools.cache
def _default_cache(cache_dir: Path) -> KernelCache:
    return KernelCache(cache_dir)


def default_cache() -> KernelCache:
    """The process-wide cache of the current ``TWILIGHT_CACHE_DIR`` (one per directory)."""
    return _default_cache(knobs.cache_dir())
