"""Whole pipelines on the TVM backend (llvm) against ``twilight.reference``: built-ins, selectors
written here (formulas the backend has never seen), random shapes and the edges."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import twilight as tw
from twilight.compiler import ir
from twilight.compiler.backend import Target, get_backend
from twilight.compiler.stages import lists_to_mask

LLVM = Target.parse("llvm")
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


@tw.page_summary
def magnitude(k):
    return dict(kabsmax=tw.absmax(k, axis=0), kmean=tw.mean(k, axis=0))


@tw.score(per="page", summary=magnitude)
def abs_bound(q, page):
    return tw.sum(tw.abs(q) * page.kabsmax) + 0.5 * tw.max(q * page.kmean)


@tw.score(per="token")
def soft_token(q, k):
    return tw.sum(tw.exp(tw.minimum(q * k, 1.0)) / (2.0 + tw.abs(k))) - tw.mean(q)


def user_pipelines():
    return {
        "abs_bound": tw.Pipeline(select=tw.top_k(abs_bound, tw.tokens(48)), name="abs_bound"),
        "soft_token": tw.Pipeline(select=tw.top_k(soft_token, tw.fraction(0.3)),
                                  prune=tw.top_p(0.8, estimate=tw.quantized_keys(8)),
                                  keep=tw.sink(2) | tw.window(5), name="soft_token"),
        "abs_threshold": tw.Pipeline(select=tw.threshold(abs_bound, 3.0, group="union"),
                                     name="abs_threshold"),
    }


def builtins(hkv: int):
    chans = tuple(tuple(range(h, 64, 8))[:6] for h in range(hkv))
    b = tw.builtins
    return {"dense": b.dense(), "quest_top_k": b.quest_top_k(48, sink_tokens=3, window_tokens=4),
            "quest_twilight": b.quest_twilight(64, p=0.9), "oracle_top_k": b.oracle_top_k(40),
            "streaming": b.streaming(4, 20), "double_sparsity": b.double_sparsity(chans, 40),
            "ds_twilight": b.ds_twilight(chans, 64, p=0.85, granularity="page")}


def check(pipe, f, hq: int, dtype: str, seed: int = 0, **sched):
    sched.setdefault("top_p_strategy", "sort")
    d = f.cache.head_dim
    k = get_backend("tvm").lower(pipe.ir, ir.Shape(hq, f.cache.num_kv_heads, d,
                                                   pipe.ir.page_size, dtype), sched, LLVM)
    q = f.query(hq, seed=seed)
    out, (idx, cnt) = k.run(q, f.cache, return_lists=True)
    ref, kept = tw.reference(pipe).run(q, f.cache, return_kept=True)
    assert torch.equal(lists_to_mask(idx, cnt, kept.mask.shape[-1]), kept.mask)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", list(builtins(2)) + list(user_pipelines()))
def test_pipeline_matches_reference(name, fill_cache):
    pipe = {**builtins(2), **user_pipelines()}[name]
    f = fill_cache(pipe, 2, 64, [150, 33, 1, 16], grid=True)
    check(pipe, f, 8, "float32")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["quest_twilight", "double_sparsity", "soft_token", "abs_bound"]),
       lengths=st.lists(st.integers(1, 260), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_random_shapes(name, lengths, seed, fill_cache):
    pipe = {**builtins(2), **user_pipelines()}[name]
    f = fill_cache(pipe, 2, 64, lengths, grid=True, seed=seed)
    check(pipe, f, 8, "float32", seed=seed)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("mode", ["max", "union", "none", "kv", "mean"])
def test_gqa_group_modes(group, mode, fill_cache):
    pipe = tw.Pipeline(select=tw.top_k(tw.builtins.quest, tw.tokens(32), group=mode),
                       prune=tw.top_p(0.9, estimate=tw.quantized_keys(4),
                                      group=mode if mode != "none" else "none"))
    f = fill_cache(pipe, 2, 64, [90, 40], grid=True)
    check(pipe, f, 2 * group, "float32")


@pytest.mark.parametrize("page_size", [1, 16, 32])
def test_page_sizes(page_size, fill_cache):
    pipe = tw.builtins.quest_twilight(budget=40, page_size=page_size)
    f = fill_cache(pipe, 2, 64, [70, 1, 33], grid=True)
    check(pipe, f, 4, "float32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", [64, 128, 80])
def test_dtypes_and_head_dims(dtype, d, fill_cache):
    pipe = tw.builtins.quest_twilight(budget=48, bits=8)
    f = fill_cache(pipe, 2, d, [77, 20], dtype=getattr(torch, dtype), grid=True)
    check(pipe, f, 4, dtype)


@pytest.mark.parametrize("lengths", [[1], [16], [1, 1], [5, 300]])
def test_budget_beyond_context(lengths, fill_cache):
    pipe = tw.builtins.quest_twilight(budget=4096)
    f = fill_cache(pipe, 2, 64, lengths, grid=True)
    check(pipe, f, 4, "float32")


def test_ties_all_equal_keys():
    """All-equal keys: every score ties, the lower index wins, top-p keeps the first ones."""
    pipe = tw.Pipeline(select=tw.top_k(tw.builtins.oracle, tw.tokens(10)),
                       prune=tw.top_p(0.5, estimate=tw.exact_keys(), group="none"),
                       keep=tw.window(2))
    cache = tw.runtime.serving.pipeline_cache.make_cache(pipe, 2, 64, dtype=torch.float32)
    rid = cache.add_request()
    cache.append(torch.ones(2, 50, 64), torch.randn(2, 50, 64), rid)

    class F:  # the fill_cache interface `check` reads
        pass
    f = F()
    f.cache = cache
    f.query = lambda hq, seed=0: torch.ones(1, hq, 64)
    for strategy in ("sort", "radix"):
        check(pipe, f, 4, "float32", top_p_strategy=strategy)


@pytest.mark.parametrize("lengths", [[150, 33, 1, 16], [1], [16, 5]])
@pytest.mark.parametrize("group", [None, "kv"])
def test_key_code_formats(lengths, group, fill_cache):
    """Group, page and smoothed codes in one pipeline (each pruner reads its own format, the
    page one sharing Quest's min/max), one token, one page of 16, ragged: kept sets equal."""
    q = tw.quantized_keys
    pipe = tw.Pipeline(select=tw.top_k(tw.builtins.quest, tw.tokens(96), group="max"),
                       prune=[tw.top_p(0.97, estimate=q(2, "group", pages=2), group=group),
                              tw.top_p(0.97, estimate=q(8, "page"), group=group),
                              tw.top_p(0.95, estimate=q(4, smooth=True), group=group)])
    f = fill_cache(pipe, 2, 64, lengths, grid=True)
    check(pipe, f, 8, "float32")
