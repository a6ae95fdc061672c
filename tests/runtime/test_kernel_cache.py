"""The kernel cache: keys, the load/build contract, concurrency, corruption and the CLI (caches
that cannot be written: ``test_kernel_cache_unwritable.py``)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from twilight import knobs
from twilight.cli import main
from twilight.runtime.store import kernel_key
from twilight.runtime.store.filelock import FileLock
from twilight.runtime.store.kernel_cache import (
    BuildOutputError,
    CacheLookupError,
    CacheMissError,
    CorruptEntryWarning,
    KernelCache,
    cache_key,
    toolchain_stamps,
)

PAYLOAD = bytes(range(256)) * 64  # 16 KiB
BASE = dict(ir_key="a" * 64, schedule={"BLOCK": 64, "num_warps": 4}, target="cuda:sm_90",
            backend="triton", stamps={"codegen": "1"}, extra={"shape": [2, 32, 8, 128]})


@pytest.fixture
def cache_dir(tmp_path):
    """A fresh cache directory for each test, with compiling allowed."""
    with knobs.scope(cache_dir=tmp_path / "cache", disable_compile=None):
        yield tmp_path / "cache"


def key_of(**changes):
    return cache_key(**{**BASE, **changes})


class Builder:
    """A build function that counts its calls."""

    def __init__(self, payload: bytes = PAYLOAD):
        self.calls, self.payload = 0, payload

    def __call__(self, out: Path) -> None:
        self.calls += 1
        (out / "kernel.bin").write_bytes(self.payload)
        (out / "lib").mkdir()
        (out / "lib" / "source.py").write_text("# generated\n")


def never(out: Path) -> None:
    raise AssertionError("build must not be called on a hit")


# ------------------------------------------------------------------------------------ keys


def test_same_inputs_same_key_and_dict_order_is_irrelevant():
    assert key_of() == key_of(schedule={"num_warps": 4, "BLOCK": 64})
    assert len(key_of()) == 64 and int(key_of(), 16) >= 0


@pytest.mark.parametrize("change", [
    dict(stamps={"codegen": "2"}), dict(stamps={"codegen": "1", "new": "x"}),
    dict(schedule={"BLOCK": 128, "num_warps": 4}), dict(schedule={"BLOCK": 64.0, "num_warps": 4}),
    dict(target="cuda:sm_80"), dict(backend="tvm"), dict(ir_key="b" * 64),
    dict(extra={"shape": [2, 32, 8, 64]}), dict(extra={"shape": [2, 32, 8, 128], "dtype": "f16"}),
    dict(extra=None),
])
def test_every_input_changes_the_key(change):
    assert key_of(**change) != key_of()


def test_toolchain_and_codegen_knobs_feed_the_key(monkeypatch):
    base = key_of()
    real = toolchain_stamps
    monkeypatch.setattr(kernel_key, "toolchain_stamps",
                        lambda b, t=None: {**real(b, t), "triton": "9.9.9"})
    assert key_of() != base
    monkeypatch.undo()
    fake = knobs.Knob("fake", "TWILIGHT_FAKE_CODEGEN", "bool", lambda: False, "", codegen=True)
    monkeypatch.setitem(knobs.KNOBS, "fake", fake)
    monkeypatch.setenv("TWILIGHT_FAKE_CODEGEN", "1")
    assert key_of() != base


def test_toolchain_stamps_by_backend_and_target():
    assert {"twilight", "python", "torch", "triton", "codegen_sources"} == \
        set(toolchain_stamps("triton", "interpret"))
    assert "nvcc" in toolchain_stamps("tvm", "cuda:sm_90")
    assert "nvcc" not in toolchain_stamps("triton", "cuda:sm_90")  # Triton ships its ptxas
    assert "machine" in toolchain_stamps("tvm", "llvm") and "tvm" in toolchain_stamps("tvm")


def test_key_inputs_must_be_plain_data():
    with pytest.raises(TypeError, match=r"inputs.extra.fn is a function"):
        key_of(extra={"fn": lambda: 0})
    assert key_of().inputs["schedule"] == {"BLOCK": 64, "num_warps": 4}


# ------------------------------------------------------------------------- load and build


def test_build_once_then_memory_hit_then_disk_hit(cache_dir):
    key, build = key_of(), Builder()
    cache = KernelCache()
    entry = cache.get_or_build(key, build, {"kernel": "quest_score"})
    assert build.calls == 1 and entry.read("kernel.bin") == PAYLOAD
    assert cache.get_or_build(key, never) is entry
    fresh = KernelCache()
    again = fresh.get_or_build(key, never)
    assert again.read("kernel.bin") == PAYLOAD
    assert again.files["lib/source.py"].read_text() == "# generated\n"
    assert again.path == cache_dir / "kernels" / key[:2] / key
    m = again.manifest
    assert m["key"] == key and m["describe"] == {"kernel": "quest_score"}
    assert m["inputs"]["target"] == "cuda:sm_90" and m["twilight_version"]
    assert m["files"]["kernel.bin"] == {"sha256": hashlib.sha256(PAYLOAD).hexdigest(),
                                        "size": len(PAYLOAD)}


def test_missing_entry_is_none_without_warning(cache_dir, recwarn):
    assert KernelCache().try_load(key_of()) is None
    assert not recwarn.list


def _truncate(entry_dir: Path) -> None:
    (entry_dir / "kernel.bin").write_bytes(PAYLOAD[:100])


def _flip_byte(entry_dir: Path) -> None:
    blob = bytearray((entry_dir / "kernel.bin").read_bytes())
    blob[7] ^= 0xFF
    (entry_dir / "kernel.bin").write_bytes(bytes(blob))


CORRUPTIONS = {
    "truncated": (_truncate, "100 bytes, manifest says 16384"),
    "checksum": (_flip_byte, "sha256 does not match"),
    "garbled_manifest": (lambda d: (d / "manifest.json").write_text('{"key": "ab'), "unreadable"),
    "missing_manifest": (lambda d: (d / "manifest.json").unlink(), "manifest.json missing"),
    "missing_file": (lambda d: (d / "lib" / "source.py").unlink(), "lib/source.py: unreadable"),
    "other_key": (lambda d: _edit_manifest(d, key="0" * 64), "for another key"),
    "bad_size": (lambda d: _edit_manifest(d, files={"kernel.bin": {"size": "1"}}), "bad file"),
}


def _edit_manifest(entry_dir: Path, **changes) -> None:
    m = json.loads((entry_dir / "manifest.json").read_text())
    (entry_dir / "manifest.json").write_text(json.dumps({**m, **changes}))


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_entry_is_detected_removed_and_rebuilt(cache_dir, kind):
    corrupt, message = CORRUPTIONS[kind]
    key = key_of()
    entry = KernelCache().get_or_build(key, Builder())
    corrupt(entry.path)
    with pytest.warns(CorruptEntryWarning, match=message):
        assert KernelCache().try_load(key) is None
    assert not entry.path.exists()  # moved away so that it is rebuilt
    corrupt(KernelCache().get_or_build(key, Builder()).path)
    build = Builder()
    with pytest.warns(CorruptEntryWarning):
        rebuilt = KernelCache().get_or_build(key, build)
    assert build.calls == 1 and rebuilt.read("kernel.bin") == PAYLOAD
    assert KernelCache().verify() == []


def test_verify_finds_and_fixes_a_corrupt_entry(cache_dir):
    good, bad = key_of(), key_of(target="cuda:sm_80")
    cache = KernelCache()
    cache.get_or_build(good, Builder())
    _flip_byte(cache.get_or_build(bad, Builder()).path)
    problems = cache.verify()
    assert [k for k, _ in problems] == [bad] and "sha256" in problems[0][1]
    assert cache.verify(fix=True) == problems
    assert cache.verify() == [] and [e.key for e in cache.ls()] == [good]


def test_disable_compile_turns_a_miss_into_an_error_but_a_hit_loads(cache_dir):
    key = key_of()
    with knobs.scope(disable_compile=True), pytest.raises(CacheMissError) as err:
        KernelCache().get_or_build(key, never, {"kernel": "quest_score", "pipeline": "quest"})
    text = str(err.value)
    assert "kernel=quest_score" in text and key[:16] in text and str(cache_dir) in text
    assert "TWILIGHT_DISABLE_COMPILE" in text and "hint:" in text
    KernelCache().get_or_build(key, Builder())
    with knobs.scope(disable_compile=True):
        assert KernelCache().get_or_build(key, never).read("kernel.bin") == PAYLOAD


def test_failed_build_leaves_no_entry_and_no_lock(cache_dir):
    key = key_of()

    def crash(out: Path) -> None:
        (out / "kernel.bin").write_bytes(b"half")
        raise RuntimeError("nvcc exploded")

    with pytest.raises(RuntimeError, match="nvcc exploded") as err:
        KernelCache().get_or_build(key, crash, {"kernel": "k"})
    assert any(key[:16] in note for note in err.value.__notes__)
    assert KernelCache().try_load(key) is None
    assert not list((cache_dir / "kernels" / ".tmp").iterdir())
    lock = FileLock(cache_dir / "kernels" / ".locks" / f"{key}.lock")
    assert lock.acquire(blocking=False)
    lock.release()
    assert KernelCache().get_or_build(key, Builder()).read("kernel.bin") == PAYLOAD


@pytest.mark.parametrize("bad_build,match", [
    (lambda out: None, "wrote no files"),
    (lambda out: (out / "manifest.json").write_text("{}"), "none named manifest.json"),
])
def test_bad_build_output_is_an_error(cache_dir, bad_build, match):
    with pytest.raises(BuildOutputError, match=match):
        KernelCache().get_or_build(key_of(), bad_build)
    assert KernelCache().try_load(key_of()) is None


def test_discarding_a_bad_entry_spares_a_good_one_that_replaced_it(cache_dir):
    cache = KernelCache()
    entry = cache.get_or_build(key_of(), Builder())
    cache._discard(entry.path, expect_inode=entry.path.stat().st_ino + 1)  # it saw another
    assert KernelCache().try_load(key_of()) is not None


def test_file_lock_survives_its_file_being_deleted(tmp_path):
    path = tmp_path / "k.lock"
    first, second = FileLock(path), FileLock(path)
    first.acquire()
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (second.acquire(), got.set()))
    waiter.start()
    time.sleep(0.1)
    assert not got.is_set()
    first.unlink_and_release()  # the waiter held the old file open: it must lock anew
    assert got.wait(10) and second.held
    assert not FileLock(path).acquire(blocking=False)
    second.release()
    waiter.join()
    third = FileLock(path)
    assert third.acquire(blocking=False)
    third.release()


# ------------------------------------------------------------------ several processes at once

WORKER = """\
import hashlib, os, sys, time
from pathlib import Path
from twilight.runtime.store.kernel_cache import KernelCache, cache_key

cache_dir, count_file, sync_dir, name, mode = sys.argv[1:6]
key = cache_key(**{base!r})

def build(out):
    with open(count_file, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    with open(out / "kernel.bin", "wb") as f:  # slowly, so that a reader could see half
        f.write({payload!r}[:8192])
        f.flush()
        Path(sync_dir, "building").touch()
        time.sleep(0.3 if mode == "race" else 3600)
        f.write({payload!r}[8192:])

Path(sync_dir, name).touch()
while mode == "race" and not Path(sync_dir, "go").exists():
    time.sleep(0.002)
entry = KernelCache(cache_dir).get_or_build(key, build, {{"kernel": "race"}})
print(key, hashlib.sha256(entry.read("kernel.bin")).hexdigest())
"""


@pytest.fixture
def workers():
    """Worker processes, killed at teardown should a test fail before they end."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _spawn(tmp_path: Path, cache_dir: Path, name: str, mode: str) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    if not script.exists():  # once, and whole: rewriting it could truncate it under a starting worker
        part = tmp_path / "worker.py.part"
        part.write_text(WORKER.format(base=BASE, payload=PAYLOAD))
        os.replace(part, script)
    (tmp_path / "sync").mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-X", "faulthandler", str(script), str(cache_dir),
                             str(tmp_path / "builds.txt"), str(tmp_path / "sync"), name, mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            codes = [p.poll() for p in procs]  # None: still running (hung), <0: killed by a signal
            for p in procs:
                p.kill()
            errs = [p.communicate(timeout=30)[1][-2000:] for p in procs]
            pytest.fail(f"waiting for {path.name}: a worker died or hung; exit codes {codes}; "
                        f"stderr: {errs}")
        time.sleep(0.01)


@pytest.mark.slow  # 8 interpreters import torch (via twilight): ~10-30 s on 2 busy cores
def test_eight_processes_build_a_missing_key_exactly_once(cache_dir, tmp_path, workers):
    procs = [_spawn(tmp_path, cache_dir, f"ready{i}", "race") for i in range(8)]
    workers.extend(procs)
    for i in range(8):
        _wait_for(tmp_path / "sync" / f"ready{i}", procs)
    (tmp_path / "sync" / "go").touch()
    outs = [p.communicate(timeout=300) for p in procs]  # 8 processes on 2 loaded cores
    assert [p.returncode for p in procs] == [0] * 8, outs
    assert len((tmp_path / "builds.txt").read_text().split()) == 1
    expected = f"{key_of()} {hashlib.sha256(PAYLOAD).hexdigest()}"  # same key in every process
    assert [out.strip() for out, _ in outs] == [expected] * 8
    assert not any("Warning" in err for _, err in outs), outs
    assert KernelCache().verify() == []


def test_a_builder_killed_mid_build_leaves_nothing_that_blocks(cache_dir, tmp_path, workers):
    proc = _spawn(tmp_path, cache_dir, "victim", "hang")
    workers.append(proc)
    _wait_for(tmp_path / "sync" / "building", [proc])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    key = key_of()
    assert KernelCache().try_load(key) is None  # no half entry was published
    assert list((cache_dir / "kernels" / ".tmp").iterdir())  # its debris ...
    assert KernelCache().get_or_build(key, Builder()).read("kernel.bin") == PAYLOAD
    assert not list((cache_dir / "kernels" / ".tmp").iterdir())  # ... swept by the next build


# ------------------------------------------------------------------------------------- CLI


def _populate(n: int = 2) -> list[str]:
    keys = [key_of(schedule={"BLOCK": 16 * (i + 1)}) for i in range(n)]
    for k in keys:
        KernelCache().get_or_build(k, Builder(), {"kernel": "quest_score"})
    return keys


def test_cli_ls_and_info(cache_dir, capsys):
    keys = _populate()
    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert all(k[:10] in out for k in keys) and "2 entries" in out and "triton" in out
    assert main(["cache", "ls", "--json"]) == 0
    assert {row["key"] for row in json.loads(capsys.readouterr().out)} == set(keys)
    assert main(["cache", "info", keys[0][:10]]) == 0
    out = capsys.readouterr().out
    assert keys[0] in out and "ok" in out and "kernel.bin" in out and '"BLOCK": 16' in out
    assert main(["cache", "info", "ffff" if not keys[0].startswith("ffff") else "0000"]) == 1
    assert "no entry" in capsys.readouterr().err



def test_info_needs_a_unique_hex_prefix(cache_dir):
    keys = _populate(17)  # two of 17 keys share their first hex digit
    first = [k[0] for k in keys]
    shared = next(c for c in first if first.count(c) > 1)
    with pytest.raises(CacheLookupError, match=f"{first.count(shared)} entries"):
        KernelCache().info(shared)
    with pytest.raises(CacheLookupError, match="not a key prefix"):
        KernelCache().info("../etc")
    assert KernelCache().info(keys[3].upper()).key == keys[3]


def test_cli_verify_and_fix(cache_dir, capsys):
    keys = _populate()
    assert main(["cache", "verify"]) == 0
    assert "all 2 entries ok" in capsys.readouterr().out
    _flip_byte(KernelCache().info(keys[1]).path)
    assert main(["cache", "verify"]) == 1
    assert keys[1][:10] in capsys.readouterr().out
    assert main(["cache", "verify", "--fix"]) == 0
    assert main(["cache", "verify"]) == 0
    assert [e.key for e in KernelCache().ls()] == [keys[0]]


def test_cli_clear(cache_dir, capsys, monkeypatch):
    _populate()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["cache", "clear"]) == 1  # not a terminal and no --yes: refuse
    assert "pass --yes" in capsys.readouterr().err and len(KernelCache().ls()) == 2
    assert main(["cache", "clear", "--older-than", "1", "--yes"]) == 0
    assert len(KernelCache().ls()) == 2  # both are younger than a day
    assert main(["cache", "clear", "--yes"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert KernelCache().ls() == [] and main(["cache", "ls"]) == 0
    assert "is empty" in capsys.readouterr().out


def test_clear_refuses_a_negative_age(cache_dir, capsys):
    _populate()
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "clear", "--older-than", "-5", "--yes"])
    assert exit_.value.code == 2 and "expected a finite number ≥ 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="≥ 0"):
        KernelCache().clear(older_than=timedelta(days=-5))
    assert len(KernelCache().ls()) == 2
