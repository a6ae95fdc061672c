"""The append kernels (summaries from the summary expressions, quantized keys) against what
``PagedKVCache.append`` computed with torch: bit-exact."""

from __future__ import annotations

import pytest
import torch

import twilight as tw
from twilight.compiler import ir
from twilight.compiler.backend import Target, get_backend
from twilight.compiler.keycodes import KeyCodeSpec


@tw.page_summary
def stats(k):
    return dict(kabsmax=tw.absmax(k, axis=0), kmid=(tw.max(k, axis=0) + tw.min(k, axis=0)) * 0.5,
                kmean=tw.mean(k[:, [0, 3, 7, 9]], axis=0))


@tw.score(per="page", summary=stats)
def stats_score(q, page):
    return tw.sum(tw.abs(q) * page.kabsmax) + tw.sum(q * page.kmid)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("gran", ["token", "page"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_append_kernels_match_cache(bits, gran, dtype, fill_cache):
    pipe = tw.Pipeline(select=tw.top_k(stats_score, tw.tokens(32)),
                       prune=tw.top_p(0.9, estimate=tw.quantized_keys(bits, gran)))
    f = fill_cache(pipe, 2, 64, [70, 5, 33], dtype=dtype)
    c = f.cache
    k = get_backend("tvm").lower(pipe.ir, ir.Shape(4, 2, 64, 16, str(dtype)[6:]), {},
                                 Target.parse("llvm"))
    want = {n: t.clone() for n, t in c.summaries.items()}
    codes = c.key_codes[KeyCodeSpec(bits, gran)]
    want_codes = [t.clone() for t in codes.tensors()]
    for t in (*c.summaries.values(), *codes.tensors()):
        t.fill_(3)  # stale side data the kernels must overwrite
    used = torch.nonzero(c.page_fill > 0).flatten()
    k.refresh_pages(c, used)
    phys = used.repeat_interleave(c.page_size)
    slot = torch.arange(c.page_size).repeat(len(used))
    live = slot < c.page_fill[phys]
    k.refresh_tokens(c, phys[live], slot[live])
    for n, t in c.summaries.items():
        assert torch.equal(t[used], want[n][used]), n
    if gran == "page":
        for got, exp in zip(codes.tensors(), want_codes, strict=True):
            assert torch.equal(got[used], exp[used])
    else:
        for got, exp in zip(codes.tensors(), want_codes, strict=True):
            assert torch.equal(got[phys[live], :, slot[live]], exp[phys[live], :, slot[live]])
