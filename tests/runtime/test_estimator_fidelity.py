"""Estimator fidelity on keys with outlier channels (ALGORITHMS.md, "Where the published
estimator breaks"): per-token INT4 reports mass ≥ p while the kept set holds far less true
mass; the default (per channel within a page), per channel within a group of pages and smoothed
per-token INT4 do not. On well-behaved keys all hold. The fidelity
target is issue 7's: mean true mass of the kept set (relative to the candidates) ≥ p − 0.02
and no head below p − 0.2."""

from __future__ import annotations

import pytest
import torch

import twilight as tw
from twilight.frontend.builtins import quest_twilight
from twilight.runtime.serving.pipeline_cache import make_cache

P, HKV, G, D, T = 0.9, 2, 4, 64, 1024


def keys_and_queries(outliers: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(HKV, T, D, generator=gen)
    if outliers:  # a few channels 10-30x the rest, nearly constant across tokens (as in Llama)
        chans = torch.tensor([3, 17, 40])
        k[:, :, chans] = torch.tensor([12.0, -25.0, 30.0]) * (1 + 0.05 * torch.randn(
            HKV, T, 3, generator=gen))
    v = torch.randn(HKV, T, D, generator=gen)
    # each query head looks for a few tokens through the ordinary channels: peaked attention
    picks = torch.randint(0, T, (HKV, G, 6), generator=gen)
    q = torch.stack([torch.stack([k[h, picks[h, g]].sum(0) for g in range(G)])
                     for h in range(HKV)])
    if outliers:
        q[..., [3, 17, 40]] = 0.0  # the outlier channels add a constant, not information
    q = q / q.norm(dim=-1, keepdim=True) * 3.0 * D ** 0.5
    return q.reshape(1, HKV * G, D), k, v


ROBUST = {"page": tw.quantized_keys(4, "page"), "group4": tw.quantized_keys(4, "group"),
          "group2": tw.quantized_keys(4, "group", pages=2),
          "token_smooth": tw.quantized_keys(4, smooth=True)}


def fidelity(estimator, outliers: bool, seed: int = 0):
    pipe = tw.Pipeline(prune=tw.top_p(P, estimate=estimator, group="none"))
    q, k, v = keys_and_queries(outliers, seed)
    cache = make_cache(pipe, HKV, D, dtype=torch.float32)
    cache.append(k, v, cache.add_request())
    _, kept = tw.reference(pipe).run(q, cache, return_kept=True)
    logits = torch.einsum("hgd,htd->hgt", q.view(HKV, G, D), k) / D ** 0.5
    true = (logits.softmax(-1).reshape(1, HKV * G, T) * kept.mask).sum(-1)
    return kept.est_mass, true


def meets_target(true: torch.Tensor) -> bool:
    return bool(true.mean() >= P - 0.02 and true.min() >= P - 0.2)


@pytest.mark.parametrize("seed", [0, 1])
def test_per_token_int4_is_fooled_by_outlier_channels(seed):
    est, true = fidelity(tw.quantized_keys(4, "token"), outliers=True, seed=seed)
    assert bool((est >= P - 1e-5).all())  # it reports the promised mass ...
    assert not meets_target(true)  # ... while holding much less: the check can fail


def test_the_default_estimator_is_robust():
    default = quest_twilight().ir.prune[0].estimator
    assert default.granularity != "token" or default.smooth  # not the published one
    for seed in (0, 1):
        est, true = fidelity(default, outliers=True, seed=seed)
        assert bool((est >= P - 1e-5).all()) and meets_target(true)


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_per_channel_and_smoothed_int4_survive_outlier_channels(name):
    est, true = fidelity(ROBUST[name], outliers=True)
    assert bool((est >= P - 1e-5).all()) and meets_target(true)


@pytest.mark.parametrize("name", ["token", *sorted(ROBUST)])
def test_all_hold_on_well_behaved_keys(name):
    e = ROBUST.get(name) or tw.quantized_keys(4, "token")
    est, true = fidelity(e, outliers=False)
    assert bool((est >= P - 1e-5).all()) and meets_target(true)
