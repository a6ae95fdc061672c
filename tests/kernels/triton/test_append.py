"""Append kernels (summaries from the summary expressions, token/page key codes) vs
``PagedKVCache``'s own torch results."""

from __future__ import annotations

import pytest
import torch

import twilight as tw
from twilight.compiler.keycodes import KeyCodeSpec
from twilight.frontend import builtins as B


@tw.page_summary
def stats(k):
    return dict(amax=tw.absmax(k, axis=0), mean=tw.mean(k, axis=0),
                spread=tw.max(k, axis=0) - tw.min(k, axis=0),
                sub=tw.sum(k[:, [1, 3, 4]], axis=0))


@tw.score(per="page", summary=stats)
def stats_score(q, page):
    return tw.sum(tw.abs(q) * page.amax) + tw.sum(q * page.mean)


def _pipes(bits: int, page_size: int):
    return [B.quest_twilight(budget=32, bits=bits, granularity="token", page_size=page_size),
            tw.Pipeline(select=tw.top_k(stats_score, tw.tokens(16)), page_size=page_size,
                        prune=tw.top_p(0.9, estimate=tw.quantized_keys(bits, "page")))]


@pytest.mark.parametrize("bits,page_size,d,dtype", [(4, 16, 32, torch.float16),
                                                     (2, 16, 24, torch.float32),
                                                     (8, 32, 20, torch.bfloat16),
                                                     (4, 1, 16, torch.float32)])
def test_append_kernels_match_cache(bits, page_size, d, dtype, fill_cache, lower):
    for pipe in _pipes(bits, page_size):
        f = fill_cache(pipe, 2, d, [37, 5, 70], dtype=dtype, scale=2.0)
        c = f.cache
        comp = lower(pipe, 2, 2, d, dtype)
        pages, page_valid = c.gather_pages()
        pages = pages[page_valid > 0].flatten()
        want_sum = {n: t.clone() for n, t in c.summaries.items()}
        want_codes = {s: [t.clone() for t in k.tensors()] for s, k in c.key_codes.items()}
        for t in list(c.summaries.values()) + [t for k in c.key_codes.values()
                                               for t in k.tensors()]:
            t.zero_()
        comp.refresh_pages(c, pages)
        fill = c.page_fill[pages]
        phys = pages.repeat_interleave(fill)
        slot = torch.cat([torch.arange(int(n)) for n in fill])
        comp.refresh_tokens(c, phys, slot)
        for n, t in want_sum.items():
            rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
            torch.testing.assert_close(c.summaries[n][pages].float(), t[pages].float(),
                                       atol=1e-5, rtol=rtol)  # one ulp of the cache dtype
        for spec, ts in want_codes.items():
            got = c.key_codes[spec].tensors()
            assert torch.equal(got[0][pages], ts[0][pages]), spec
            for g, w in zip(got[1:], ts[1:], strict=True):
                torch.testing.assert_close(g[pages], w[pages], atol=0, rtol=0)
        assert spec in (KeyCodeSpec(bits, "token"), KeyCodeSpec(bits, "page"))
