"""Selectors built from the DSL's newer pieces — score math, query-dependent channels,
projections and token summaries, positions, key codes in a score, top-p as a selector, combined
budgets and selectors, mean-value attention — written here as a user would, run whole on both
backends (TVM llvm; Triton's interpreter) and compared with the reference: the same kept
tokens, the same output. Then the append kernels of token summaries against the torch cache.
"""

from __future__ import annotations

import pytest
import torch

import twilight as tw
from twilight.compiler import ir
from twilight.compiler.backend import Target, get_backend
from twilight.compiler.stages import lists_to_mask
from twilight.runtime.serving.pipeline_cache import make_cache

HQ, HKV, D, PS = 4, 2, 32, 16
P = torch.randn(HKV, D, 6, generator=torch.Generator().manual_seed(11))
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


@tw.token_summary
def low(k):
    return dict(kp=k @ P)


@tw.score(per="token", summary=low)
def projected(q, tok):
    return tw.dot(q @ P, tok.kp)


@tw.score(per="token")
def channels_now(q, k):
    i = tw.top_channels(q, 8)
    return tw.dot(q[i], k) / tw.sqrt(tw.head_dim()) - 0.02 * tw.distance()


@tw.score(per="token")
def shaped(q, k):
    x = q[0:16] * k
    return tw.sum(tw.where(x > 0, tw.sqrt(x), -tw.tanh(x) ** 2)) + tw.log(1.0 + tw.abs(tw.sum(k)))


@tw.page_summary
def rotated_bounds(k):
    return dict(lo=tw.min(k @ P[0], axis=0), hi=tw.max(k @ P[0], axis=0))


@tw.score(per="page", summary=rotated_bounds)
def rotated_quest(q, page):
    qp = q @ P[0]
    return tw.sum(tw.maximum(qp * page.lo, qp * page.hi)) + 0.1 * tw.position()


def user_pipelines() -> dict[str, tw.Pipeline]:
    q4 = tw.quantized_keys
    return {
        "projected": tw.Pipeline(select=tw.top_k(projected, tw.tokens(20) | tw.fraction(0.3))),
        "channels_now_codes": tw.Pipeline(
            select=tw.top_k(channels_now, 24, estimate=q4(4, "page"), group="union"),
            prune=tw.top_p(0.9, estimate=q4(4, "page")), keep=tw.sink(2) + tw.window(3)),
        "shaped_top_p": tw.Pipeline(select=tw.top_p(shaped, 0.8, group="max")),
        "union": tw.Pipeline(select=tw.top_k(rotated_quest, 32) | tw.top_p(channels_now, 0.5,
                                                                             group="none"),
                             group="none"),
        "intersect": tw.Pipeline(select=tw.top_k(projected, tw.fraction(0.5))
                                 & tw.threshold(shaped, 0.0), group="max"),
        "mean_value": tw.Pipeline(select=tw.top_k(channels_now, 16, group="mean"),
                                  attend=tw.attention(mean_value=True)),
        "smooth_codes": tw.Pipeline(select=tw.top_k(channels_now, 16, group="kv",
                                                    estimate=q4(8, smooth=True))),
    }


def _targets():
    out = [("tvm", Target.parse("llvm"))]
    from twilight.compiler.triton import loader
    if loader.interpreter_ready():
        out.append(("triton", Target("interpret")))
    return out


def _fill(pipe, dtype, seed=0, lengths=(90, 33, 1)):
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache(pipe, HKV, D, dtype=dtype, initial_pages=2)
    ids = cache.add_requests(len(lengths))
    for rid, n in zip(ids, lengths, strict=True):
        cache.append(torch.randn(HKV, n, D, generator=gen).to(dtype),
                     torch.randn(HKV, n, D, generator=gen).to(dtype), rid)
    return cache, torch.randn(len(ids), HQ, D, generator=gen).to(dtype)


@pytest.mark.parametrize("backend,target", _targets(), ids=lambda x: str(x))
@pytest.mark.parametrize("name", sorted(user_pipelines()))
def test_user_selector_agrees_with_the_reference(name, backend, target):
    pipe = user_pipelines()[name]
    for dtype in (torch.float32, torch.float16):
        cache, q = _fill(pipe, dtype)
        kern = get_backend(backend).lower(pipe.ir, ir.Shape(HQ, HKV, D, PS, str(dtype)[6:]),
                                          {"top_p_strategy": "sort"}, target)
        out, (idx, cnt) = kern.run(q, cache, return_lists=True)
        ref, kept = tw.reference(pipe).run(q, cache, return_kept=True)
        assert torch.equal(lists_to_mask(idx, cnt, kept.mask.shape[-1]), kept.mask), dtype
        torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend,target", _targets(), ids=lambda x: str(x))
def test_token_summary_append_kernels_match_the_torch_cache(backend, target):
    @tw.token_summary
    def both(k):
        return dict(kp=k @ P, few=k[[3, 0, 31]] * 2.0)

    @tw.score(per="token", summary=both)
    def s(q, tok):
        return tw.dot(q @ P, tok.kp) + tw.sum(q[[3, 0, 31]] * tok.few)
    pipe = tw.Pipeline(select=tw.top_k(s, 8), page_size=PS)
    cache, _ = _fill(pipe, torch.float16, seed=3, lengths=(40, 7))
    kern = get_backend(backend).lower(pipe.ir, ir.Shape(HQ, HKV, D, PS, "float16"), {}, target)
    pages = torch.nonzero(cache.page_fill > 0).flatten()
    fill = cache.page_fill[pages]
    phys = pages.repeat_interleave(fill)
    slot = torch.cat([torch.arange(int(n)) for n in fill])
    want = {n: t[phys, :, slot].clone() for n, t in cache.token_summaries.items()}
    for t in cache.token_summaries.values():
        t.zero_()
    kern.refresh_tokens(cache, phys, slot)
    assert torch.equal(cache.token_summaries["both.few"][phys, :, slot], want["both.few"])
    # a projection sums D products in its own order: within the cache dtype's rounding
    torch.testing.assert_close(cache.token_summaries["both.kp"][phys, :, slot].float(),
                               want["both.kp"].float(), atol=4e-3, rtol=2e-3)


@pytest.mark.parametrize("backend,target", _targets(), ids=lambda x: str(x))
def test_mean_value_needs_the_running_sum(backend, target):
    pipe = user_pipelines()["mean_value"]
    other = tw.Pipeline(select=tw.top_k(channels_now, 16, group="mean"))
    cache, q = _fill(other, torch.float32)  # made for a pipeline that keeps no sum of V
    kern = get_backend(backend).lower(pipe.ir, ir.Shape(HQ, HKV, D, PS, "float32"), {}, target)
    with pytest.raises(tw.InputError, match="running sum of V"):
        kern.run(q, cache)
