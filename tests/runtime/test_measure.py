"""The one dense baseline (every SDPA variant it times computes exact attention; the fastest
wins and says how it ran), snapshot problems as eval builds them, and the served-path timer."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

import twilight as tw
from twilight.runtime.evaluation.measure import (
    DenseBaseline,
    dense_baseline,
    fastest_sdpa,
    make_problem,
    median_time,
    sdpa_variants,
    snapshot_problem,
)
from twilight.runtime.evaluation.problems import SINK_SHARE
from twilight.runtime.evaluation.snapshot import Snapshot
from twilight.runtime.store.tuning_log import ShapeBucket

PIPE = tw.builtins.quest_twilight(budget=64, p=0.9)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4)])
def test_every_variant_is_exact_attention_over_ragged_lengths(fill_cache, dense_attention,
                                                              hq, hkv):
    f = fill_cache(PIPE, hkv, 32, (40, 17, 1), seed=1)
    q = f.query(hq, seed=2)
    k, v, valid = f.cache.gather(f.ids)
    want = dense_attention(q, f.keys, f.values)
    seen = []
    for dtype, folded, fn in sdpa_variants(q, k, v, valid):
        tol = 1e-5 if dtype == "float32" else 3e-2
        torch.testing.assert_close(fn().double(), want, atol=tol, rtol=tol)
        seen.append((dtype, folded))
    layouts = (False, True) if hq != hkv else (False,)
    assert seen == list(itertools.product(("float32", "bfloat16", "float16"), layouts))


def test_the_fastest_variant_wins_and_says_how_it_ran():
    q, k, v = torch.randn(2, 8, 16), torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16)
    order = iter([5.0, 4.0, 3.0, 1.5, 2.0, 6.0])  # fp32, fp32 folded, bf16, bf16 folded, ...
    base = fastest_sdpa(q.half(), k.half(), v.half(), timer=lambda fn: next(order))
    assert base == DenseBaseline(1.5, "bfloat16", True)
    assert str(base) == "torch SDPA bfloat16, GQA group as query rows"


def test_dense_baseline_times_the_problems_own_kv(fill_cache):
    f = fill_cache(PIPE, 2, 32, (64, 30))
    from twilight.runtime.evaluation.problems import Problem
    base = dense_baseline(Problem(f.query(8), f.cache, f.ids), repeats=2)
    assert base.ms > 0 and base.dtype in ("float32", "bfloat16", "float16")


def _snapshot(layers=2, nq=3, t=70, hq=4, hkv=2, d=16, seed=0) -> Snapshot:
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen).half()  # noqa: E731
    return Snapshot(rnd(layers, nq, hq, d), rnd(layers, hkv, t, d), rnd(layers, hkv, t, d),
                    torch.arange(t - nq, t), torch.full((layers,), d ** -0.5), "toy",
                    (5, 9), "/x/toy.npz")


def test_snapshot_problem_is_each_querys_causal_context():
    snap = _snapshot()
    prob = snapshot_problem(PIPE.ir, snap, 1)
    assert prob.layer == 9 and prob.label == "toy.npz layer 9" and prob.batch == 3
    assert prob.cache.lengths[prob.ids].tolist() == [68, 69, 70]
    k, _, _ = prob.cache.gather(prob.ids)
    assert torch.equal(k[2], snap.k[1])
    assert torch.equal(prob.q, snap.q[1])
    short = snapshot_problem(PIPE.ir, snap, 0, context=32)
    assert short.cache.lengths[short.ids].tolist() == [32, 32, 32]
    assert short.max_context == 32 and "(sink + last tokens, 32)" in short.label
    k, v, _ = short.cache.gather(short.ids)
    for j, pos in enumerate(snap.q_pos.tolist()):  # the sink, then the tokens just before it
        want = torch.cat([torch.arange(4), torch.arange(pos + 1 - 28, pos + 1)])
        assert torch.equal(k[j], snap.k[0][:, want]) and torch.equal(v[j], snap.v[0][:, want])
    assert snapshot_problem(PIPE.ir, snap, 0, context=70).cache.lengths.tolist()[:3] == \
        [68, 69, 70]  # requests within the context keep all of it


def test_median_time_warms_up_for_a_while_and_a_few_calls():
    """Untimed calls first: at least ``warmup``, then up to 8 — no more than it times — within
    50 ms (the slow calls right after other work on a shared machine stay out of the median),
    and in any case for ``SETTLE_S`` (torch's OpenMP workers spinning after a parallel op slow
    a short step's first calls for ~15 ms), up to ``SETTLE_CALLS`` calls."""
    from twilight.runtime.evaluation.measure import SETTLE_CALLS, SETTLE_S
    calls = []
    median_time(lambda: calls.append(1), repeats=3)
    assert len(calls) == SETTLE_CALLS + 3  # instant calls: the call cap ends the settling
    starts, t0 = [], time.perf_counter()
    median_time(lambda: (starts.append(time.perf_counter()), time.sleep(0.001)), repeats=3)
    assert starts[-3] - t0 >= SETTLE_S  # the timed calls began after 20 ms of warm-up (the
    # old rule: 3 calls, ~3 ms)
    slow = []
    median_time(lambda: (slow.append(1), time.sleep(0.03)), repeats=10)
    assert len(slow) == 2 + 10  # two calls pass 50 ms: the warm-up stops at its minimum


def _mass_90(prob, shape):
    """Per query head: the tokens holding 90% of its exact attention mass, and the sink's
    share."""
    k, _, _ = prob.cache.gather(prob.ids)
    q = prob.q.float().reshape(prob.batch, shape.kv_heads, -1, shape.head_dim)
    w = torch.softmax(q @ k.float().transpose(-1, -2) / shape.head_dim ** 0.5, -1)
    s, _ = w.sort(-1, descending=True)
    return ((s.cumsum(-1) < 0.9).sum(-1) + 1).float(), w[..., 0]


def test_synthetic_attention_keeps_about_as_many_tokens_at_8k_as_at_1k():
    """Real attention's heavy tokens barely grow in number with the context (SmolLM2's 8k
    snapshot: 86 at 1k, 130 at 8k, median over 30 layers), so their fraction falls; the
    synthetic problem follows that, with a sink, instead of keeping a fixed fraction (which
    grew 8x from 1k to 8k) or one token."""
    shape = tw.Shape(8, 2, 64, 16, "float32")
    (n1, sink1), (n8, sink8) = (_mass_90(make_problem(PIPE.ir, shape, ShapeBucket(2, t)), shape)
                                for t in (1024, 8192))
    assert 8 <= n1.median() and n8.median() < 3 * n1.median()
    assert n8.median() / 8192 < n1.median() / 1024 / 3  # the fraction falls
    for sink in (sink1, sink8):  # SINK_SHARE is the group's mean query's; each head's varies
        assert SINK_SHARE / 3 < sink.median() < 2 * SINK_SHARE
