"""The fused step (one compiled call: append, then every stage) against the stage-by-stage path,
the torch reference, and the torch cache's own append (bit-exact)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import twilight as tw
from twilight.compiler import ir
from twilight.compiler.backend import Target, get_backend
from twilight.compiler.stages import lists_to_mask
from twilight.runtime.serving.pipeline_cache import make_cache

LLVM = Target.parse("llvm")
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
FIXTURE = [HealthCheck.function_scoped_fixture]


def lower(pipe, hq, hkv, d, dtype="float32", **sched):
    sched.setdefault("top_p_strategy", "sort")  # the reference's own arithmetic: same sets
    return get_backend("tvm").lower(pipe.ir, ir.Shape(hq, hkv, d, pipe.ir.page_size, dtype),
                                    sched, LLVM)


def pipelines():
    b = tw.builtins
    chans = tuple(tuple(range(h, 64, 8))[:6] for h in range(2))
    return {"quest_twilight": b.quest_twilight(64, p=0.9),
            "quest_twilight_token": b.quest_twilight(48, p=0.85, granularity="token",
                                                     sink_tokens=2, window_tokens=5),
            "ds_twilight_group": b.ds_twilight(chans, 64, p=0.85, group_pages=2),
            "quest_top_k": b.quest_top_k(48, sink_tokens=3, window_tokens=4),
            "dense": b.dense(), "streaming": b.streaming(4, 20)}


def assert_same_lists(idx, cnt, widx, wcnt):
    """Equal lists; the fused step's are as wide as its context needs (``TVMCompiled.tier``),
    the stage path's as the plan: past the narrower width both hold only padding."""
    w = min(idx.shape[2], widx.shape[2])
    assert torch.equal(cnt, wcnt) and torch.equal(idx[..., :w], widx[..., :w])
    assert int(cnt.max()) <= w
    assert bool((idx[..., w:] == -1).all()) and bool((widx[..., w:] == -1).all())


def check_run(k, pipe, f, hq, dtype="float32", seed=0):
    """Fused run == the stage path (same kernels: equal), and the reference's kept sets."""
    q = f.query(hq, seed=seed)
    ids = f.cache.request_ids
    want, (widx, wcnt) = k.run(q, f.cache, return_lists=True)
    widx, wcnt = widx.clone(), wcnt.clone()
    got, (idx, cnt) = k.call_fused(q, f.cache, ids, return_lists=True)
    assert_same_lists(idx, cnt, widx, wcnt)
    assert torch.equal(got, want)
    ref, kept = tw.reference(pipe).run(q, f.cache, return_kept=True)
    assert torch.equal(lists_to_mask(idx, cnt, kept.mask.shape[-1]), kept.mask)
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("name", list(pipelines()))
def test_fused_run_matches_stages_and_reference(name, fill_cache):
    pipe = pipelines()[name]
    f = fill_cache(pipe, 2, 64, [150, 33, 1, 16], grid=True)
    check_run(lower(pipe, 8, 2, 64), pipe, f, 8)


@settings(max_examples=10, deadline=None, suppress_health_check=FIXTURE)
@given(name=st.sampled_from(["quest_twilight", "quest_twilight_token", "dense"]),
       lengths=st.lists(st.integers(1, 300), min_size=1, max_size=4),
       group=st.sampled_from([1, 3, 8]), seed=st.integers(0, 2**16))
def test_fused_random_shapes(name, lengths, group, seed, fill_cache):
    pipe = pipelines()[name]
    f = fill_cache(pipe, 2, 64, lengths, grid=True, seed=seed)
    check_run(lower(pipe, 2 * group, 2, 64), pipe, f, 2 * group, seed=seed)


@pytest.mark.parametrize(("d", "split"), [(64, 0), (128, 4), (80, 1)])
def test_fused_head_dims_and_splits(d, split, fill_cache):
    pipe = tw.builtins.quest_twilight(budget=4096)  # budget beyond the context: every page
    f = fill_cache(pipe, 1, d, [700, 1, 16], grid=True)
    check_run(lower(pipe, 4, 1, d, split_kv=split), pipe, f, 4)


@pytest.mark.parametrize(("bn", "split", "page", "dtype"),
                         [(16, 1, 16, "float32"), (4, 4, 16, "float16"), (16, 0, 8, "float32"),
                          (32, 2, 16, "float32"), (8, 1, 32, "bfloat16")])
def test_fused_dense_walks_the_pages(bn, split, page, dtype, fill_cache):
    """A dense pipeline's fused attention walks the pages, not its lists (``attend.identity``):
    a block in one page where ``attend_block_n`` divides the page, token by token where it
    does not; splits of whole pages. Lengths at page edges, one token, several splits: equal
    to the stage path (which reads the lists) and to the reference."""
    pipe = tw.Pipeline(name="dense", page_size=page)
    f = fill_cache(pipe, 2, 64, [1, page - 1, page, page + 1, 150], dtype=getattr(torch, dtype),
                   grid=True)
    check_run(lower(pipe, 6, 2, 64, dtype, attend_block_n=bn, split_kv=split), pipe, f, 6,
              dtype)


@pytest.mark.parametrize("strategy", ["bisect", "radix"])
def test_fused_ties_and_one_token(strategy, fill_cache):
    """All-equal keys (every weight ties) next to a one-token request."""
    pipe = tw.builtins.quest_twilight(64, p=0.5)
    f = fill_cache(pipe, 2, 64, [1, 90], grid=True)
    for k in f.cache.k_pages, f.cache.v_pages:
        k.fill_(0.5)
    c = f.cache
    for n in c.summaries:  # re-derive the side data of the constant keys
        c.summaries[n].fill_(0.5)
    for spec in c.key_codes:
        c.key_codes[spec].packed.zero_()
    k = lower(pipe, 4, 2, 64, top_p_strategy=strategy)
    q = f.query(4)
    got, (idx, cnt) = k.call_fused(q, c, f.ids, return_lists=True)
    want = k.run(q, c)
    assert torch.equal(got, want)
    assert int(cnt[0, 0]) == 1


def caches(pipe, hkv, d, lengths, dtype, seed=0):
    """Two identical caches holding random K/V (one appended by torch, one by the kernel)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    kv = [(torch.randn(hkv, n, d, generator=gen).to(dtype),
           torch.randn(hkv, n, d, generator=gen).to(dtype)) for n in lengths]
    for _ in range(2):
        c = make_cache(pipe, hkv, d, dtype=dtype, initial_pages=2)
        ids = c.add_requests(len(lengths))
        for rid, (k, v) in zip(ids, kv, strict=True):
            c.append(k, v, rid)
        out.append(c)
    return out, ids


def assert_same_cache(a, b):
    for name in ("k_pages", "v_pages", "page_fill", "lengths", "page_table"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for n in a.summaries:
        assert torch.equal(a.summaries[n], b.summaries[n]), n
    for spec in a.key_codes:
        for x, y in zip(a.key_codes[spec].tensors(), b.key_codes[spec].tensors(), strict=True):
            assert torch.equal(x, y), spec.name
    assert a._host_lengths == b._host_lengths


CASES = [(tw.quantized_keys(4, "page"), torch.float32),
         (tw.quantized_keys(4, "page"), torch.bfloat16),
         (tw.quantized_keys(2, "token"), torch.float16),
         (tw.quantized_keys(8, "group", pages=2), torch.float32),
         (tw.quantized_keys(4, "token", smooth=0.5), torch.float32),
         (tw.quantized_keys(4, "token", smooth=0.5), torch.bfloat16)]


@pytest.mark.parametrize(("est", "dtype"), CASES,
                         ids=lambda x: getattr(x, "granularity", str(x)[6:]))
def test_fused_step_appends_bit_exact(est, dtype):
    """Steps across page (and group) boundaries and through cache growth: the generated append
    leaves the cache exactly as ``PagedKVCache.append`` does, and the outputs agree."""
    pipe = tw.Pipeline(select=tw.top_k(tw.builtins.quest, tw.tokens(48)),
                       prune=tw.top_p(0.9, estimate=est), keep=tw.sink(1))
    (ref, mine), ids = caches(pipe, 2, 64, [13, 30, 1], dtype)
    k = lower(pipe, 4, 2, 64, str(dtype)[6:])
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        q = torch.randn(3, 4, 64, generator=gen).to(dtype)
        kn = torch.randn(3, 2, 64, generator=gen).to(dtype)
        vn = torch.randn(3, 2, 64, generator=gen).to(dtype)
        ref.append(kn[:, :, None], vn[:, :, None], ids)
        want = k.run(q, ref)
        got = k.call_fused(q, mine, ids, kn, vn)
        assert_same_cache(ref, mine)
        assert torch.equal(got, want)


def test_decode_pipeline_step_and_run(tmp_path):
    """``twilight.load``: ``run`` and ``step`` are fused, ``run_stages`` agrees, a subset of
    requests works, and the step keeps the torch cache's invariants."""
    pipe = tw.builtins.quest_twilight(budget=64)
    from twilight.runtime.store.kernel_cache import KernelCache
    dec = tw.load(pipe, shape=tw.Shape(6, 2, 64, 16, "float32"), backend="tvm", schedule={},
                  cache=KernelCache(tmp_path))
    assert dec.compiled.fused
    gen = torch.Generator().manual_seed(0)
    a, b = dec.make_cache(initial_pages=4), dec.make_cache(initial_pages=4)
    for c in (a, b):
        c.add_requests(3)
    kv = [(torch.randn(2, n, 64, generator=gen), torch.randn(2, n, 64, generator=gen))
          for n in (100, 17)]
    for c in (a, b):
        c.append(*kv[0], 0)
        c.append(*kv[1], 2)
    q = torch.randn(2, 6, 64, generator=gen)
    assert torch.equal(dec.run(q, a, [0, 2]), dec.run_stages(q, a, [0, 2]))
    for _ in range(3):
        kn, vn = torch.randn(2, 2, 64, generator=gen), torch.randn(2, 2, 64, generator=gen)
        out = dec.step(q, kn, vn, a, [0, 2])
        b.append(kn[:, :, None], vn[:, :, None], [0, 2])
        assert torch.equal(out, dec.run_stages(q, b, [0, 2]))
        assert_same_cache(a, b)
    assert a.length(0) == 103 and a.length(1) == 0 and a.length(2) == 20


@pytest.mark.parametrize("name", ["quest_twilight", "quest_top_k", "dense"])
def test_fused_step_work_follows_the_context_not_the_plan(name, fill_cache):
    """A plan for far more tokens than the context (a server plans for its longest request)
    runs the same step as a plan that fits: the fused call narrows its lists and page-table
    rows to the context (prefix views of the plan's scratch), and widens them as it grows."""
    pipe = pipelines()[name]
    f = fill_cache(pipe, 2, 64, [150, 33, 1, 16], grid=True)
    q = f.query(8)
    tight = lower(pipe, 8, 2, 64)
    want, (widx, wcnt) = tight.call_fused(q, f.cache, f.ids, return_lists=True)
    wide = lower(pipe, 8, 2, 64)
    wide.plan(len(f.ids), 64 * 1024)
    got, (idx, cnt) = wide.call_fused(q, f.cache, f.ids, return_lists=True)
    assert torch.equal(got, want)
    assert_same_lists(idx, cnt, widx, wcnt)
    plan = wide.plan_
    [(_, bufs)] = plan.tiers.values()  # the narrowed call, kept for the next steps
    assert bufs["pt"].shape[1] == 256 // 16 < plan.bufs["pt"].shape[1]  # 256 tokens, not 64k
    if name == "dense":  # the others' candidate lists are as wide as their budget anyway
        assert bufs["idx0"].shape[2] == 256 < plan.bufs["idx0"].shape[2]
    assert bufs["pt"].data_ptr() == plan.bufs["pt"].data_ptr()  # a view: no copy
    # the context grows past the tier: the next one, still equal to a fitting plan
    gen = torch.Generator().manual_seed(3)
    kv = [torch.randn(len(f.ids), 2, 1, 64, generator=gen) for _ in range(2)]
    for _ in range(2):  # 150 + 120 tokens crosses 256
        f.cache.append(kv[0].expand(-1, -1, 60, -1).contiguous(),
                       kv[1].expand(-1, -1, 60, -1).contiguous(), f.ids)
    want, (widx, wcnt) = tight.call_fused(q, f.cache, f.ids, return_lists=True)
    got, (idx, cnt) = wide.call_fused(q, f.cache, f.ids, return_lists=True)
    assert torch.equal(got, want)
    assert_same_lists(idx, cnt, widx, wcnt)
    assert int(f.cache.length(f.ids[0])) == 270
    assert sorted(b["pt"].shape[1] for _, b in plan.tiers.values()) == [256 // 16, 512 // 16]


def test_fused_select_skips_scores_where_the_budget_covers_the_context(fill_cache):
    """``top_k`` budget ≥ a request's pages: the fused step leaves its scores unwritten (rank
    keeps every page whatever they score), and keeps exactly what the reference keeps — next
    to a request whose context the budget does not cover."""
    pipe = tw.builtins.quest_top_k(64)  # 4 pages of 16
    f = fill_cache(pipe, 2, 64, [40, 150], grid=True)
    k = lower(pipe, 8, 2, 64)
    q = f.query(8)
    k.plan(len(f.ids), 1024)
    scores = k.plan_.bufs["scores0"]
    scores.fill_(1234.5)
    got, (idx, cnt) = k.call_fused(q, f.cache, f.ids, return_lists=True)
    [(_, bufs)] = k.plan_.tiers.values()
    scores = bufs["scores0"]  # the step's (a view of the plan's)
    assert bool((scores[0] == 1234.5).all())  # covered: not scored
    assert not bool((scores[1, :, :10] == 1234.5).any())  # 10 pages, budget 4: scored
    ref, kept = tw.reference(pipe).run(q, f.cache, return_kept=True)
    assert torch.equal(lists_to_mask(idx, cnt, kept.mask.shape[-1]), kept.mask)
    torch.testing.assert_close(got, ref, atol=TOL["float32"], rtol=TOL["float32"])
