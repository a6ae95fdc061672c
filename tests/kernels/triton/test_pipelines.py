"""Whole pipelines on the Triton backend (interpreter) vs ``twilight.reference``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import twilight as tw
from twilight.frontend import builtins as B

EXACT = {"top_p_strategy": "sort"}
CH4 = ((0, 3, 5, 7), (1, 2, 9, 11))


def _builtin(name: str, budget: int = 48):
    if name == "dense":
        return B.dense()
    if name == "streaming":
        return B.streaming(4, 16)
    if name in ("double_sparsity", "ds_twilight"):
        return B.PIPELINES[name](channels=CH4, budget=budget)
    if name == "loki":
        proj = torch.randn(2, 32, 4, generator=torch.Generator().manual_seed(0))
        return B.loki(proj, budget=budget)
    if name == "sparq":
        return B.sparq(r=8, budget=budget)
    return B.PIPELINES[name](budget=budget)


@pytest.mark.parametrize("name", sorted(B.PIPELINES))
def test_builtin_pipelines(name, check_run):
    check_run(_builtin(name), 4, 2, 32, [70, 23], dtype=torch.float16, schedule=EXACT)


def test_ds_shared_channel_list(check_run):
    check_run(B.ds_twilight(channels=(1, 4, 6, 30), budget=40), 4, 2, 32, [60, 33],
              schedule=EXACT)


# ---- user-defined selectors: new formulas, no change to the backend ---------------------------
@tw.page_summary
def absmax_summary(k):
    return dict(kabsmax=tw.absmax(k, axis=0), kmean=tw.mean(k, axis=0))


@tw.score(per="page", summary=absmax_summary)
def magnitude(q, page):
    return tw.sum(tw.abs(q) * page.kabsmax) + 0.5 * tw.max(q * page.kmean)


@tw.score(per="token")
def soft_token(q, k):
    return tw.sum(tw.exp(tw.minimum(q * k, 1.0)) / (1.0 + tw.abs(k))) - tw.mean(k[[0, 2, 5]])


def test_user_page_score(check_run):
    pipe = tw.Pipeline(select=tw.top_k(magnitude, tw.tokens(32)),
                       prune=tw.top_p(0.8, estimate=tw.quantized_keys(8, "page")),
                       keep=tw.sink(2) | tw.window(4))
    check_run(pipe, 4, 2, 24, [90, 41], schedule=EXACT)


def test_user_token_score_threshold(check_run):
    pipe = tw.Pipeline(select=tw.threshold(soft_token, 12.0), group="none")
    check_run(pipe, 2, 2, 16, [50, 20])


def test_user_token_score_top_k(check_run):
    pipe = tw.Pipeline(select=tw.top_k(soft_token, tw.fraction(0.25)),
                       prune=tw.top_k(budget=tw.tokens(9), estimate=tw.exact_keys()))
    check_run(pipe, 4, 1, 16, [64, 17])


# ---- group modes, softcap, edges --------------------------------------------------------------
@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("sel_group,prune_group", [("none", "none"), ("mean", "mean"),
                                                   ("max", "max"), ("kv", "kv"),
                                                   ("union", "union")])
def test_group_modes(sel_group, prune_group, fuse, check_run):
    pipe = tw.Pipeline(select=tw.top_k(B.quest, tw.tokens(32), group=sel_group),
                       prune=tw.top_p(0.85, group=prune_group))
    check_run(pipe, 4, 2, 16, [75, 30], schedule={**EXACT, "fuse_prune_compact": fuse})


@pytest.mark.parametrize("schedule", [{"top_p_strategy": "bisect"},
                                      {"top_p_strategy": "radix", "radix_bits": 4}])
@pytest.mark.parametrize("group", ["none", "mean"])
def test_fused_prune_compact(group, schedule, check_run, lower):
    """``fuse_prune_compact``: one decide+compact kernel per pruner, same lists and output
    as the two-kernel schedule (a top-p and a top-k pruner, keep rules, a merged group)."""
    pipe = tw.Pipeline(select=tw.top_k(B.quest, tw.tokens(40), group=group),
                       prune=[tw.top_p(0.9, group=group),
                              tw.top_k(budget=tw.tokens(12), group=group)],
                       keep=tw.sink(2) | tw.window(4))
    fused = lower(pipe, 4, 2, 16, schedule={**schedule, "fuse_prune_compact": True})
    assert not any(k.endswith("_compact") and k.startswith("prune") for k in fused.specs)
    outs = [check_run(pipe, 4, 2, 16, [70, 23], schedule={**schedule, "fuse_prune_compact": f},
                      exact_mask=False) for f in (False, True)]
    assert torch.equal(outs[0][2], outs[1][2])
    torch.testing.assert_close(outs[0][0], outs[1][0])


def test_softcap_and_scale(check_run):
    pipe = tw.Pipeline(select=tw.top_k(B.oracle, tw.tokens(20)),
                       prune=tw.threshold(value=0.01, estimate=tw.exact_keys()),
                       attend=tw.attention(scale=0.3, softcap=5.0))
    check_run(pipe, 2, 2, 16, [40, 13])


@pytest.mark.parametrize("lengths", [[1], [16], [1, 33]])
def test_tiny_contexts(lengths, check_run):
    check_run(B.quest_twilight(budget=64), 4, 2, 16, lengths, schedule=EXACT)


def test_budget_larger_than_context(check_run):
    check_run(B.quest_top_k(budget=4096), 2, 1, 16, [40, 7])


def test_ties_all_equal_keys(fill_cache, lower):
    """Equal keys: equal scores and weights; ties go to the lower index first."""
    pipe = tw.Pipeline(select=tw.top_k(B.oracle, tw.tokens(5)),
                       prune=tw.top_p(0.5, estimate=tw.exact_keys()))
    f = fill_cache(pipe, 1, 16, [30])
    f.cache.k_pages.fill_(0.25)
    q = f.query(2)
    for strategy in ("sort", "radix"):
        comp = lower(pipe, 2, 1, 16, schedule={"top_p_strategy": strategy})
        out, (idx, cnt) = comp.run(q, f.cache, return_lists=True)
        _, kept = tw.reference(pipe).run(q, f.cache, return_kept=True)
        assert cnt.tolist() == kept.count.tolist() == [[3, 3]]
        assert idx[0, :, :3].tolist() == [[0, 1, 2]] * 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(dtype, check_run):
    check_run(B.quest_twilight(budget=32), 4, 2, 32, [50], dtype=dtype, schedule=EXACT)


@pytest.mark.parametrize("page_size", [1, 32])
def test_page_sizes(page_size, check_run):
    check_run(B.quest_twilight(budget=24, page_size=page_size), 2, 1, 16, [45, 12],
              schedule=EXACT)


@pytest.mark.parametrize("d", [128, 256])
def test_large_head_dims(d, check_run):
    check_run(B.quest_twilight(budget=32), 2, 1, d, [40], dtype=torch.float16, schedule=EXACT)


def test_non_power_of_two_head_dim(check_run):
    check_run(B.ds_twilight(channels=((0, 3, 40), (5, 6, 47)), budget=20), 4, 2, 48, [37],
              schedule=EXACT)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(ratio=st.sampled_from([1, 2, 4]), hkv=st.integers(1, 2),
       d=st.sampled_from([16, 24, 32]), page=st.sampled_from([1, 16]),
       lengths=st.lists(st.integers(1, 80), min_size=1, max_size=3),
       budget=st.integers(1, 90), p=st.floats(0.5, 1.0), splits=st.sampled_from([1, 2, 8]),
       seed=st.integers(0, 1000))
def test_random_shapes(ratio, hkv, d, page, lengths, budget, p, splits, seed, check_run):
    pipe = B.quest_twilight(budget=budget, p=p, page_size=page)
    check_run(pipe, hkv * ratio, hkv, d, lengths, seed=seed,
              schedule={"top_p_strategy": "sort", "attend_splits": splits})
