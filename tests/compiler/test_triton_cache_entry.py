"""Triton kernels live in the kernel cache like TVM's: the generated module (interpreter) and,
for a GPU arch, every kernel compiled ahead of time — so that ``TWILIGHT_DISABLE_COMPILE=1``
holds: a warm load compiles nothing (checked with ``triton.compile`` made to fail) and a cold
one is refused."""

from __future__ import annotations

import os
import sys
import warnings

if "triton" not in sys.modules:  # lets this file share a session with the interpreter tests
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

import twilight as tw  # noqa: E402
from twilight import knobs  # noqa: E402
from twilight.compiler.triton.export import variants  # noqa: E402
from twilight.runtime.serving.load import DefaultScheduleWarning  # noqa: E402
from twilight.runtime.store.kernel_cache import CacheMissError, KernelCache  # noqa: E402

PIPE = tw.builtins.quest_twilight(budget=64, p=0.9)
SHAPE = tw.Shape(4, 2, 32, 16, "float16")


@pytest.fixture
def cache_dir(tmp_path):
    with knobs.scope(cache_dir=tmp_path / "cache", tuning_logs=tmp_path / "logs",
                     disable_compile=None):
        yield tmp_path / "cache"


def load(cache_dir, target, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefaultScheduleWarning)
        return tw.load(PIPE, shape=SHAPE, backend="triton", target=target,
                       cache=KernelCache(cache_dir), **kw)


@pytest.fixture
def no_compile(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("triton.compile called on a warm load")
    monkeypatch.setattr(triton, "compile", refuse)


def test_interpreter_kernels_come_from_the_entry(cache_dir, fill_cache, no_compile):
    first = load(cache_dir, "interpret")
    assert first.origin == "built" and first.key
    f = fill_cache(PIPE, 2, 32, (70, 33), dtype=torch.float16)
    q = f.query(4)
    want = first.plan(2, 128).run(q, f.cache, f.ids)
    with knobs.scope(disable_compile=True):
        warm = load(cache_dir, "interpret")  # a new KernelCache: from disk, not memory
        assert warm.origin == "disk"
        assert warm.compiled.module_path.parent.parent.parent.name == "kernels"
        torch.testing.assert_close(warm.plan(2, 128).run(q, f.cache, f.ids), want)
        torch.testing.assert_close(want, tw.reference(PIPE).run(q, f.cache, f.ids),
                                   atol=2e-3, rtol=2e-3)
        with pytest.raises(CacheMissError, match="backend=triton"):
            load(cache_dir, "interpret", schedule={"attend_splits": 2})


@pytest.mark.parametrize("strategy", ["bisect", "sort"])
def test_gpu_kernels_are_compiled_ahead_into_the_entry(cache_dir, monkeypatch, strategy):
    """What ``load`` does for a cuda target (refused on this machine: the kernels could not
    run), step by step: build the entry, then load it back with compiling forbidden."""
    from twilight.compiler.backend import Target, get_backend
    from twilight.runtime.serving.load import kernel_key
    backend, target = get_backend("triton"), Target("cuda", "sm_90")
    schedule = backend.complete({"top_p_strategy": strategy})
    key = kernel_key(PIPE.ir, SHAPE, schedule, target, backend)
    built = backend.lower(PIPE.ir, SHAPE, schedule, target)
    entry = KernelCache(cache_dir).get_or_build(key, lambda out: backend.export(built, out))
    want = variants(built)
    assert set(want) == {p.name for p in (entry.path / "aot").iterdir()}
    assert any(".ROWB" in v for v in want) == (strategy == "sort")
    for var in want:
        assert any(p.suffix == ".cubin" for p in (entry.path / "aot" / var).iterdir()), var

    def refuse(*a, **k):
        raise AssertionError("triton.compile called on a warm load")
    monkeypatch.setattr(triton, "compile", refuse)
    with knobs.scope(disable_compile=True):
        entry = KernelCache(cache_dir).get_or_build(key, lambda out: None)  # a hit, or raises
        warm = backend.load_exported(PIPE.ir, SHAPE, schedule, target, entry)
        assert set(warm.aot) == set(want) and warm.module_path == entry.path / "kernels.py"
        for var, kernel in warm.aot.items():
            assert kernel.name == var.split(".")[0] and kernel.kernel[:4] == b"\x7fELF"
        with pytest.raises(CacheMissError):
            other = kernel_key(PIPE.ir, SHAPE, backend.complete({}), Target("cuda", "sm_80"),
                               backend)
            KernelCache(cache_dir).get_or_build(other, lambda out: None)
