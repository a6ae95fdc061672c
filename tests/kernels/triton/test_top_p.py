"""Top-p strategies (sort / bisect / radix) and the top-k / threshold pruners vs the exact
reference on crafted weight rows (``runtime.evaluation.reference_stages.ref_prune``)."""

from __future__ import annotations

import pytest
import torch

import twilight as tw
from twilight.compiler import stages as S
from twilight.frontend import builtins as B
from twilight.runtime.evaluation import reference_stages as RS

STRATEGIES = [{"top_p_strategy": "sort"}, {"top_p_strategy": "radix", "radix_bits": 4},
              {"top_p_strategy": "radix", "radix_bits": 8},
              {"top_p_strategy": "radix", "radix_bits": 11},
              {"top_p_strategy": "bisect", "bisect_stop": "eps", "bisect_eps": 1e-5},
              {"top_p_strategy": "bisect", "bisect_stop": "mass", "bisect_mass": 1e-2},
              {"top_p_strategy": "bisect", "bisect_stop": "iters", "bisect_iters": 16}]


def _rows(fill_cache, lower, prune, schedule, lengths=(90, 41, 7), temp=3.0, seed=0,
          quantize=None):
    """Candidates from a dense selector, random weights written into them, and both kept sets."""
    pipe = tw.Pipeline(prune=prune, group="none")
    f = fill_cache(pipe, 2, 16, list(lengths), seed=seed)
    comp = lower(pipe, 4, 2, 16, schedule=schedule)
    x = S.stage_inputs(f.query(4, seed=seed), f.cache)
    idx, cnt = comp.select(x)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(idx.shape, generator=gen) * temp
    if quantize:
        logits = (logits * quantize).round() / quantize  # many exact ties
    live = torch.arange(idx.shape[-1]) < cnt[..., None]
    w = torch.softmax(logits.masked_fill(~live, -torch.inf), -1).nan_to_num(0.0)
    t = x.max_len
    dense_w = S.rows_to_dense(w, idx, cnt, t)
    cand = S.lists_to_mask(idx, cnt, t)
    kidx, kcnt = comp.prune(0, x, w.contiguous(), idx, cnt)
    return S.lists_to_mask(kidx, kcnt, t), RS.ref_prune(pipe.ir, 0, x, dense_w, cand), dense_w


@pytest.mark.parametrize("schedule", STRATEGIES, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("p", [0.5, 0.9, 1.0])
def test_top_p_strategies(schedule, p, fill_cache, lower):
    got, ref, w = _rows(fill_cache, lower, tw.top_p(p), schedule, quantize=4.0 if p == 0.9 else None)
    mass = (w.double() * got).sum(-1) / w.double().sum(-1)
    assert (mass >= p - 1e-12).all()
    if schedule["top_p_strategy"] != "bisect":
        assert torch.equal(got, ref)
        return
    assert (got | ref).equal(got), "bisection dropped a token of the minimal set"
    thr = torch.where(ref, w, torch.inf).amin(-1, keepdim=True)
    extra = got & ~ref
    if schedule["bisect_stop"] == "mass":  # the extra mass, ties with the cut aside
        over = (w.double() * (extra & (w != thr))).sum(-1) / w.double().sum(-1).clamp(min=1e-300)
        assert (over <= schedule["bisect_mass"] + 1e-6).all()
        return
    eps = schedule.get("bisect_eps") or w.amax(-1, keepdim=True) / 2 ** schedule["bisect_iters"]
    assert (w[extra] >= (thr - eps).expand_as(w)[extra] - 1e-7).all()


@pytest.mark.parametrize("temp", [0.0, 30.0])
def test_top_p_flat_and_peaked_rows(temp, fill_cache, lower):
    for sched in STRATEGIES[:3]:
        got, ref, _ = _rows(fill_cache, lower, tw.top_p(0.7), sched, temp=temp)
        assert torch.equal(got, ref)


def test_top_k_pruner(fill_cache, lower):
    got, ref, _ = _rows(fill_cache, lower, tw.top_k(budget=tw.tokens(5)), {}, quantize=2.0)
    assert torch.equal(got, ref)


def test_top_k_pruner_fraction(fill_cache, lower):
    got, ref, _ = _rows(fill_cache, lower, tw.top_k(budget=tw.fraction(0.3)), {})
    assert torch.equal(got, ref)


def test_threshold_pruner(fill_cache, lower):
    got, ref, _ = _rows(fill_cache, lower, tw.threshold(value=0.02), {})
    assert torch.equal(got, ref)


@pytest.mark.parametrize("group", ["mean", "max", "union", "kv"])
def test_pruner_groups_stagewise(group, fill_cache, lower):
    pipe = tw.Pipeline(select=tw.top_k(B.quest, tw.tokens(32)), prune=tw.top_p(0.8, group=group),
                       keep=tw.sink(1) | tw.window(3))
    f = fill_cache(pipe, 2, 16, [70, 25])
    comp = lower(pipe, 4, 2, 16, schedule={"top_p_strategy": "sort"})
    x = S.stage_inputs(f.query(4), f.cache)
    idx, cnt = comp.select(x)
    cand = RS.ref_select(pipe.ir, x)
    assert torch.equal(S.lists_to_mask(idx, cnt, x.max_len), cand)
    w = comp.estimate(0, x, idx, cnt)
    ref_w = RS.ref_estimate(pipe.ir, 0, x, cand)
    torch.testing.assert_close(S.rows_to_dense(w, idx, cnt, x.max_len), ref_w, atol=1e-6,
                               rtol=1e-5)
    kidx, kcnt = comp.prune(0, x, w, idx, cnt)
    assert torch.equal(S.lists_to_mask(kidx, kcnt, x.max_len),
                       RS.ref_prune(pipe.ir, 0, x, ref_w, cand))
