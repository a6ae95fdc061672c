"""Where the fused step (one compiled call) does not apply, a served step still gives the right
answer: pipelines the fused module does not cover (top-p and combined selectors, token summaries,
mean-value attention, scores over key codes or projections, budget algebra) run stage by stage
through ``run`` and ``step``; a fused pipeline still runs dense below ``dense_below``; and a
pipeline it covers with the DSL's newer score pieces matches the stage path and the reference."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import twilight as tw
from twilight.compiler.tvm.fused import fusable
from twilight.runtime.serving.load import DefaultScheduleWarning

HQ, HKV, D, PS = 4, 2, 32, 16
SHAPE = tw.Shape(HQ, HKV, D, PS, "float32")
P = torch.randn(HKV, D, 6, generator=torch.Generator().manual_seed(11))
LENGTHS = (150, 33, 1)


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


@tw.page_summary
def rotated_bounds(k):
    return dict(lo=tw.min(k @ P[0], axis=0), hi=tw.max(k @ P[0], axis=0))


@tw.score(per="page", summary=rotated_bounds)
def rotated_quest(q, page):
    qp = q @ P[0]
    return tw.sum(tw.maximum(qp * page.lo, qp * page.hi))


def staged() -> dict[str, tw.Pipeline]:
    """Pipelines the fused module leaves to the stage path."""
    q4 = tw.quantized_keys
    return {
        "top_p_selector": tw.Pipeline(select=tw.top_p(channels_now, 0.8, group="max")),
        "union": tw.Pipeline(select=tw.top_k(channels_now, 32) | tw.top_p(channels_now, 0.5),
                             group="none"),
        "token_summary": tw.Pipeline(select=tw.top_k(projected, 24)),
        "mean_value": tw.Pipeline(select=tw.top_k(channels_now, 16, group="mean"),
                                  attend=tw.attention(mean_value=True)),
        "codes_in_score": tw.Pipeline(select=tw.top_k(channels_now, 24, estimate=q4(4, "page"))),
        "projected_summary": tw.Pipeline(select=tw.top_k(rotated_quest, 32)),
        "budget_algebra": tw.Pipeline(select=tw.top_k(channels_now,
                                                      tw.tokens(20) | tw.fraction(0.3))),
    }


def load(pipe, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefaultScheduleWarning)
        return tw.load(pipe, shape=SHAPE, backend="tvm", **kw)


def filled(dp, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = dp.make_cache(initial_pages=4)
    ids = cache.add_requests(len(LENGTHS))
    for rid, n in zip(ids, LENGTHS, strict=True):
        cache.append(torch.randn(HKV, n, D, generator=gen), torch.randn(HKV, n, D, generator=gen),
                     rid)
    return cache, ids, gen


def count_fused(dp, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = dp.compiled.call_fused
    monkeypatch.setattr(dp.compiled, "call_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("name", list(staged()))
def test_unfused_pipelines_run_and_step_stage_by_stage(name, monkeypatch):
    pipe = staged()[name]
    assert not fusable(pipe.ir)
    dp = load(pipe).plan(len(LENGTHS), 256)
    assert not dp.compiled.fused
    cache, ids, gen = filled(dp)
    q = torch.randn(len(ids), HQ, D, generator=gen)
    out = dp.run(q, cache, ids)
    assert torch.equal(out, dp.run_stages(q, cache, ids))
    torch.testing.assert_close(out, tw.reference(pipe).run(q, cache, ids), atol=2e-5, rtol=2e-5)
    twin = copy.deepcopy(cache)
    k1, v1 = (torch.randn(len(ids), HKV, D, generator=gen) for _ in range(2))
    got = dp.step(q, k1, v1, cache, ids)
    twin.append(k1[:, :, None], v1[:, :, None], ids)
    assert torch.equal(got, dp.run_stages(q, twin, ids))
    assert torch.equal(cache.k_pages, twin.k_pages) and torch.equal(cache.lengths, twin.lengths)
    for n, t in twin.token_summaries.items():
        assert torch.equal(cache.token_summaries[n], t), n
    if twin.v_sum is not None:
        assert torch.equal(cache.v_sum, twin.v_sum)


def test_newer_score_pieces_fuse_and_match_the_stages():
    """top_channels, head_dim and distance in a plain top-k score: the fused module's case."""
    pipe = tw.Pipeline(select=tw.top_k(channels_now, 24, group="max"),
                       prune=tw.top_p(0.9, estimate=tw.quantized_keys(4, "page")))
    assert fusable(pipe.ir)
    dp = load(pipe).plan(len(LENGTHS), 256)
    assert dp.compiled.fused
    cache, ids, gen = filled(dp, seed=3)
    q = torch.randn(len(ids), HQ, D, generator=gen)
    out, (idx, cnt) = dp.run(q, cache, ids, return_lists=True)
    want, (widx, wcnt) = dp.run_stages(q, cache, ids, return_lists=True)
    assert torch.equal(out, want) and torch.equal(idx, widx) and torch.equal(cnt, wcnt)


def test_a_fused_pipeline_runs_dense_below_the_crossover(monkeypatch, dense_attention):
    pipe = tw.builtins.quest_twilight(budget=32, p=0.9)
    longest = max(LENGTHS)
    dp = load(pipe, dense_below=longest + 2, dense="sdpa:float32").plan(len(LENGTHS), 256)
    assert dp.compiled.fused
    calls = count_fused(dp, monkeypatch)
    cache, ids, gen = filled(dp, seed=5)
    q = torch.randn(len(ids), HQ, D, generator=gen)
    keys, values = cache.gather(ids)[:2]
    exact = dense_attention(q, [keys[b, :, :n] for b, n in enumerate(LENGTHS)],
                            [values[b, :, :n] for b, n in enumerate(LENGTHS)])
    torch.testing.assert_close(dp.run(q, cache, ids).double(), exact, atol=1e-5, rtol=1e-5)
    assert calls == []  # dense: no fused call
    k1, v1 = (torch.randn(len(ids), HKV, D, generator=gen) for _ in range(2))
    dp.step(q, k1, v1, cache, ids)  # longest + 1 tokens: still dense
    assert calls == [] and cache.longest(ids) == longest + 1
    twin = copy.deepcopy(cache)
    got = dp.step(q, k1, v1, cache, ids)  # longest + 2: the sparse pipeline, fused
    assert calls == [1]
    twin.append(k1[:, :, None], v1[:, :, None], ids)
    assert torch.equal(got, dp.run_stages(q, twin, ids))
