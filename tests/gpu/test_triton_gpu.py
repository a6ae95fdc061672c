"""The Triton backend on a real GPU: every built-in pipeline vs the reference (skipped
without CUDA). The benchmark (``benchmarks/gpu_bench.py``) runs the same check first."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CH = tuple(tuple(range(h, 128, 8)) for h in range(8))


def _pipes():
    from twilight.frontend import builtins as B
    return [B.dense(), B.quest_top_k(256), B.quest_twilight(512), B.oracle_top_k(256),
            B.streaming(4, 64), B.double_sparsity(CH, 256), B.ds_twilight(CH, 512)]


@pytest.mark.parametrize("strategy", ["sort", "bisect", "radix"])
def test_builtins_on_gpu(strategy):
    import twilight as tw
    from twilight.compiler.backend import Target
    from twilight.compiler.stages import lists_to_mask
    from twilight.compiler.triton import TritonBackend
    from twilight.runtime.serving.pipeline_cache import make_cache
    major, minor = torch.cuda.get_device_capability()
    for pipe in _pipes():
        cache = make_cache(pipe, 8, 128, device="cuda")
        ids = cache.add_requests(3)
        gen = torch.Generator(device="cuda").manual_seed(0)
        for rid, n in zip(ids, (1500, 700, 33), strict=True):
            k, v = (torch.randn(8, n, 128, generator=gen, device="cuda").half() for _ in "kv")
            cache.append(k, v, rid)
        q = torch.randn(3, 32, 128, generator=gen, device="cuda").half()
        comp = TritonBackend().lower(pipe.ir, tw.Shape(32, 8, 128, 16, "float16"),
                                     {"top_p_strategy": strategy}, Target("cuda", f"sm_{major}{minor}"))
        out, (idx, cnt) = comp.run(q, cache, return_lists=True)
        ref, kept = tw.reference(pipe).run(q, cache, return_kept=True)
        mask = lists_to_mask(idx, cnt, kept.mask.shape[-1])
        if strategy == "bisect":
            assert (mask | kept.mask).equal(mask)
        else:
            assert (mask == kept.mask).float().mean() > 0.999, pipe.name
            torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
