"""Kernel caches that cannot be written: a read-only cache still loads its hits and says why it
cannot build, verify-fix or clear; a file where the cache needs a directory is one clear error.
(The load/build contract, concurrency and the CLI are in ``test_kernel_cache.py``.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from twilight.cli import main
from twilight.runtime.store.kernel_cache import CacheDirError, KernelCache, cache_key


def key_of(target: str = "cuda:sm_90") -> str:
    return cache_key("a" * 64, {"BLOCK": 64}, target, "triton", stamps={"codegen": "1"})


def build(out: Path) -> None:
    (out / "kernel.bin").write_bytes(bytes(range(256)) * 4)


def _flip_byte(entry_dir: Path) -> None:
    """Damage an entry: its checksum no longer matches."""
    blob = bytearray((entry_dir / "kernel.bin").read_bytes())
    blob[7] ^= 0xFF
    (entry_dir / "kernel.bin").write_bytes(bytes(blob))


READ_ONLY = r"""
import json, sys, warnings
from twilight.cli import main
from twilight.runtime.store.kernel_cache import CacheDirError, KernelCache, cache_key
good, bad, root = sys.argv[1:4]
cache = KernelCache(root)
result = {"hit": cache.try_load(good) is not None}
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    result["corrupt"] = cache.try_load(bad)
result["warning"] = str(seen[0].message)
try:
    cache.get_or_build(cache_key("b" * 64, {}, "llvm", "tvm", stamps={}), lambda out: None,
                       {"kernel": "new"})
except CacheDirError as e:
    result["miss"] = str(e)
result["verify_fix"] = main(["cache", "verify", "--fix", "--cache-dir", root])
result["clear"] = main(["cache", "clear", "--yes", "--cache-dir", root])
print(json.dumps(result))
"""


def _run(code: str, *argv: str, **kw):
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=120, **kw)


def _as_reader_only(code: str, root: Path, *argv: str):
    """Run ``code`` where nothing under ``root`` can be written. Not root: directory
    permissions bind. Root ignores them, so: the immutable attribute (``chattr +i``, which
    binds root too) where the file system has it, else drop to ``nobody``."""
    if os.geteuid() != 0:
        return _run(code, *argv)
    if subprocess.run(["chattr", "-R", "+i", str(root)], capture_output=True).returncode == 0:
        try:
            return _run(code, *argv)
        finally:
            subprocess.run(["chattr", "-R", "-i", str(root)], capture_output=True)
    import pwd
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root, no chattr +i here and no 'nobody' user to drop to")

    def drop():
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
    try:
        probe = _run("import twilight", preexec_fn=drop, cwd="/")
    except OSError:  # the interpreter itself lies in a folder 'nobody' may not enter
        probe = None
    if probe is None or probe.returncode:
        pytest.skip("running as root, no chattr +i here, and 'nobody' cannot run this "
                    "checkout's Python")
    return _run(code, *argv, preexec_fn=drop, cwd="/")


def test_read_only_cache_loads_hits_and_says_why_it_cannot_do_more(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="tw-ro-"))  # world-traversable, unlike tmp_path
    try:
        cache = KernelCache(root / "c")
        good, bad = key_of(), key_of(target="cuda:sm_80")
        cache.get_or_build(good, build)
        _flip_byte(cache.get_or_build(bad, build).path)
        for p in [root, *root.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        done = _as_reader_only(READ_ONLY, root, good, bad, str(root / "c"))
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.splitlines()[-1])
        assert result["hit"] and result["corrupt"] is None
        assert "it stays: the cache dir is read-only" in result["warning"]
        assert "cannot build new (key" in result["miss"] and "read-only" in result["miss"]
        assert result["verify_fix"] == 1 and result["clear"] == 1
        assert "removed 0 of 1 damaged entries" in done.stdout
        assert "cannot remove entry" in done.stderr and "Traceback" not in done.stderr
        assert len(KernelCache(root / "c").ls()) == 2  # and nothing was removed
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(0o755)
        shutil.rmtree(root)


def test_a_file_where_the_cache_needs_a_directory_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheDirError, match="is a file, not a directory"):
        KernelCache(tmp_path / "file")
    assert main(["cache", "ls", "--cache-dir", str(tmp_path / "file")]) == 1
    assert "is a file, not a directory" in capsys.readouterr().err
    (tmp_path / "c" / "kernels").mkdir(parents=True)
    (tmp_path / "c" / "kernels" / ".locks").write_text("x")
    with pytest.raises(CacheDirError, match=r"\.locks is a file where a directory belongs"):
        KernelCache(tmp_path / "c").get_or_build(key_of(), build)
