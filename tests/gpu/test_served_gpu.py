"""The served Triton path on a real GPU (skipped without CUDA): kernels from the kernel cache
launched ahead-of-time compiled under ``TWILIGHT_DISABLE_COMPILE=1``, the generated append
kernels, the dense fallback, and a whole decode step captured in a CUDA graph and replayed."""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = (32, 8, 128)


@pytest.fixture
def env(tmp_path):
    from twilight import knobs
    with knobs.scope(cache_dir=tmp_path / "cache", tuning_logs=tmp_path / "logs",
                     disable_compile=None):
        yield tmp_path


def _load(**kw):
    import twilight as tw
    from twilight import knobs
    from twilight.runtime.serving.load import DefaultScheduleWarning
    from twilight.runtime.store.kernel_cache import KernelCache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefaultScheduleWarning)
        return tw.load(tw.builtins.quest_twilight(1024), shape=tw.Shape(*SHAPE, 16, "float16"),
                       backend="triton", cache=KernelCache(knobs.cache_dir()), **kw)


def _filled(dp, lengths=(3000, 700, 33)):
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = dp.make_cache(device="cuda", initial_pages=512)
    ids = cache.add_requests(len(lengths))
    for rid, n in zip(ids, lengths, strict=True):
        k, v = (torch.randn(SHAPE[1], n, SHAPE[2], generator=gen, device="cuda").half()
                for _ in "kv")
        cache.append(k, v, rid)
    q = torch.randn(len(lengths), SHAPE[0], SHAPE[2], generator=gen, device="cuda").half()
    return cache, ids, q


def test_cached_aot_kernels_serve_without_compiling(env, monkeypatch):
    import triton

    import twilight as tw
    from twilight import knobs
    built = _load()
    assert built.origin == "built" and built.compiled.aot is None  # built in process: JIT
    cache, ids, q = _filled(built)
    assert cache.appender is built.compiled  # generated append kernels on the GPU
    want = tw.reference(built.ir).run(q, cache, ids)
    monkeypatch.setattr(triton, "compile", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("compiled while serving")))
    with knobs.scope(disable_compile=True):
        warm = _load()
        assert warm.origin == "disk" and warm.compiled.aot  # launched from the entry's cubins
        out = warm.plan(3, 4096).run(q, cache, ids)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dense", [None, "kernels", "sdpa:float16"])
def test_a_decode_step_replays_from_a_cuda_graph(env, dense):
    dp = _load(dense_below=1 << 20 if dense else 0, dense=dense)
    cache, ids, q = _filled(dp)
    dp.plan(3, 4096, "cuda")
    eager = dp.run(q, cache, ids).clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on the capture stream, as torch recommends
        dp.run(q, cache, ids)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    from twilight import knobs
    with knobs.scope(check_finite=False), torch.cuda.graph(graph):  # the check reads q back
        out = dp.run(q, cache, ids)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager)
