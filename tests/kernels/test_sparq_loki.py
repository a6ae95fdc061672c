"""The built-ins ``sparq`` and ``loki`` against their papers' definitions (ALGORITHMS.md, "Two
more selectors"), each written here directly in torch, one request and head at a time: the
reference, TVM (llvm) and Triton (interpreter) keep the same tokens and give the same output.

SparQ: ``i₁`` = the ``r`` channels of largest ``|q|``; ``ŝ = softmax(q[i₁]·K[:, i₁]ᵀ / τ)``,
``τ = sqrt(d · ‖q[i₁]‖₁ / ‖q‖₁)``; ``i₂`` = the top-``k`` of ``ŝ``;
``y = α·softmax(q·K[i₂]ᵀ/√d)·V[i₂] + (1 − α)·v̄``, ``α = Σ_{i₂} ŝ``, ``v̄`` the mean of V.
Loki: ``P`` the keys' principal axes (d×d, by decreasing variance); scores ``(qP)[:d_f]·(kP)[:d_f]``;
top-``k``; exact attention over them.
"""

from __future__ import annotations

import math

import pytest
import torch

import twilight as tw
from twilight.compiler import ir
from twilight.compiler.backend import Target, get_backend
from twilight.compiler.stages import lists_to_mask
from twilight.runtime.serving.pipeline_cache import make_cache

HQ, HKV, D = 4, 2, 32
LENGTHS = (61, 24)


def _data(seed: int):
    gen = torch.Generator().manual_seed(seed)
    k = [torch.randn(HKV, n, D, generator=gen) for n in LENGTHS]
    v = [torch.randn(HKV, n, D, generator=gen) for n in LENGTHS]
    q = torch.randn(len(LENGTHS), HQ, D, generator=gen)
    return q, k, v


def _cache(pipe, k, v):
    cache = make_cache(pipe, HKV, D, dtype=torch.float32)
    ids = cache.add_requests(len(k))
    for rid, kk, vv in zip(ids, k, v, strict=True):
        cache.append(kk[:, :5], vv[:, :5], rid)  # a prefill, then the rest: the running sums
        cache.append(kk[:, 5:], vv[:, 5:], rid)
    return cache


def _attend(qh, kh, vh, keep):
    w = torch.softmax(kh[keep] @ qh / math.sqrt(D), 0)
    return w @ vh[keep]


def sparq_direct(q, k, v, r: int, budget: int):
    """The paper's SparQ step, per request and query head (float64)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    kept = torch.zeros(q.shape[0], HQ, max(LENGTHS), dtype=torch.bool)
    for b in range(q.shape[0]):
        for h in range(HQ):
            qh, kh, vh = q[b, h].double(), k[b][h // (HQ // HKV)].double(), v[b][h // (HQ // HKV)].double()
            i1 = qh.abs().topk(r).indices
            tau = math.sqrt(D * qh[i1].abs().sum() / qh.abs().sum())
            s_hat = torch.softmax(kh[:, i1] @ qh[i1] / tau, 0)
            i2 = s_hat.topk(min(budget, kh.shape[0])).indices
            alpha = s_hat[i2].sum()
            keep = torch.zeros(kh.shape[0], dtype=torch.bool)
            keep[i2] = True
            out[b, h] = alpha * _attend(qh, kh, vh, keep) + (1 - alpha) * vh.mean(0)
            kept[b, h, :kh.shape[0]] = keep
    return out, kept


def loki_direct(q, k, v, d_f: int, budget: int, k_calib):
    """The paper's Loki step: keys rotated by their full principal axes, the first ``d_f``
    rotated channels score, then exact attention (float64)."""
    x = k_calib.double() - k_calib.double().mean(1, keepdim=True)
    vals, vecs = torch.linalg.eigh(x.transpose(1, 2) @ x)
    rot = torch.stack([vecs[g][:, vals[g].argsort(descending=True)] for g in range(HKV)])
    out = torch.zeros(q.shape, dtype=torch.float64)
    kept = torch.zeros(q.shape[0], HQ, max(LENGTHS), dtype=torch.bool)
    for b in range(q.shape[0]):
        for h in range(HQ):
            g = h // (HQ // HKV)
            qh, kh, vh = q[b, h].double(), k[b][g].double(), v[b][g].double()
            s = (kh @ rot[g])[:, :d_f] @ (qh @ rot[g])[:d_f]
            keep = torch.zeros(kh.shape[0], dtype=torch.bool)
            keep[s.topk(min(budget, kh.shape[0])).indices] = True
            out[b, h] = _attend(qh, kh, vh, keep)
            kept[b, h, :kh.shape[0]] = keep
    return out, kept


def _backends():
    out = [("reference", None), ("tvm", Target.parse("llvm"))]
    from twilight.compiler.triton import loader
    if loader.interpreter_ready():
        out.append(("triton", Target("interpret")))
    return out


def _run(pipe, cache, q, backend, target):
    if backend == "reference":
        out, kept = tw.reference(pipe).run(q, cache, return_kept=True)
        return out, kept.mask
    kern = get_backend(backend).lower(pipe.ir, ir.Shape(HQ, HKV, D, pipe.ir.page_size,
                                                        "float32"), {}, target)
    out, (idx, cnt) = kern.run(q, cache, return_lists=True)
    return out, lists_to_mask(idx, cnt, max(LENGTHS))


@pytest.mark.parametrize("backend,target", _backends(), ids=lambda x: str(x))
@pytest.mark.parametrize("seed", [0, 1])
def test_sparq_is_the_papers(backend, target, seed):
    q, k, v = _data(seed)
    pipe = tw.builtins.sparq(r=8, budget=12)
    want, want_kept = sparq_direct(q, k, v, r=8, budget=12)
    out, kept = _run(pipe, _cache(pipe, k, v), q, backend, target)
    assert torch.equal(kept, want_kept)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend,target", _backends(), ids=lambda x: str(x))
@pytest.mark.parametrize("seed", [0, 1])
def test_loki_is_the_papers(backend, target, seed):
    q, k, v = _data(seed)
    calib = torch.cat(k, dim=1)  # calibration keys: every request's
    pipe = tw.builtins.loki(tw.builtins.calibrate_projection(calib, 8), d_f=8, budget=10)
    want, want_kept = loki_direct(q, k, v, d_f=8, budget=10, k_calib=calib)
    out, kept = _run(pipe, _cache(pipe, k, v), q, backend, target)
    assert torch.equal(kept, want_kept)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


def test_sparq_without_reallocation_is_plain_top_k():
    q, k, v = _data(2)
    pipe = tw.builtins.sparq(r=8, budget=12, mean_value=False)
    _, want_kept = sparq_direct(q, k, v, r=8, budget=12)
    out, kept = tw.reference(pipe).run(q, _cache(pipe, k, v), return_kept=True)
    assert torch.equal(kept.mask, want_kept)
    with_mean = tw.builtins.sparq(r=8, budget=12)
    assert not torch.allclose(out, tw.reference(with_mean).run(q, _cache(with_mean, k, v)))
    with pytest.raises(tw.InputError, match="running sum of V"):
        tw.reference(with_mean).run(q, _cache(pipe, k, v))  # a cache made without the sum


def test_loki_calibrated_fits_each_layer():
    q, k, _ = _data(3)
    made = tw.builtins.loki(d_f=8).make(q, torch.cat(k, dim=1))
    m = next(n for n in made.ir.select.score.expr.walk() if n.op == "project").attr("matrix")
    assert m.shape == (HKV, D, 8)
    p = torch.tensor(m.values()).view(HKV, D, 8)
    torch.testing.assert_close(p.transpose(1, 2) @ p, torch.eye(8).expand(HKV, 8, 8),
                               atol=1e-5, rtol=0)  # orthonormal axes
