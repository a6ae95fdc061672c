"""Every IR op of a score, one at a time, through both backends (TVM llvm; Triton's
interpreter) against its torch meaning (``compiler.torch_expr``), on random data (hypothesis):
each backend's ``scores`` of a one-op selector equal the reference's, NaN (a log of a negative,
say) read as ``-inf`` as the backends write it.

A new op joins ``OPS`` with one line; its three facets (torch, TVM, Triton) are then all
checked here. Shapes are fixed per case so that each backend lowers once; the data vary.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import twilight as tw
from twilight.compiler import ir
from twilight.compiler.backend import Target, get_backend
from twilight.compiler.stages import stage_inputs
from twilight.runtime.evaluation.reference_stages import ref_scores
from twilight.runtime.serving.pipeline_cache import make_cache

HQ, HKV, D, PS = 4, 2, 16, 4
P = torch.randn(HKV, D, 3, generator=torch.Generator().manual_seed(7))

# name -> (q, k) -> a rank-0 traced score; k is the key (or a token-summary view, see SUMMARY)
OPS = {
    "neg_abs": lambda q, k: tw.sum(-tw.abs(q * k)),
    "exp": lambda q, k: tw.sum(tw.exp(q * k * 0.5)),
    "log": lambda q, k: tw.sum(tw.log(k)),  # NaN below 0: the whole score reads -inf
    "log_abs": lambda q, k: tw.sum(tw.log(tw.abs(q * k))),
    "sqrt": lambda q, k: tw.sum(tw.sqrt(tw.abs(k)) * q),
    "tanh": lambda q, k: tw.sum(tw.tanh(q * k * 3.0)),
    "tanh_small": lambda q, k: tw.sum(tw.tanh(q * k * 1e-3)) * 1e3,
    "sign": lambda q, k: tw.sum(tw.sign(k) * q),
    "pow_int": lambda q, k: tw.sum(k ** 3 - q ** -2),
    "pow_frac": lambda q, k: tw.sum(tw.abs(k) ** 1.7 + k ** 0.33),
    "add_sub_mul_div": lambda q, k: tw.sum((q + k) * (q - 0.5) / (1.5 + tw.abs(k))),
    "maximum_minimum": lambda q, k: tw.sum(tw.maximum(q, k) - tw.minimum(q * 2.0, k)),
    "compare": lambda q, k: tw.sum((q < k) + (q <= k) * 2 + (q > k) * 4 + (q >= k) * 8
                                   + (k == 0.0) * 16 + (q != k) * 32),
    "where": lambda q, k: tw.sum(tw.where(q * k > 0, tw.exp(k), -q)),
    "take": lambda q, k: tw.dot(q[[0, 3, 7]], k[[1, 2, 15]]),
    "take_per_head": lambda q, k: tw.dot(q[[[0, 1], [5, 9]]], k[[[2, 3], [4, 4]]]),
    "slice_broadcast": lambda q, k: tw.dot(q[2:14:3], k),
    "top_channels": lambda q, k: tw.dot(q[tw.top_channels(q, 5)], k),
    "top_channels_expr": lambda q, k: tw.sum(k[tw.top_channels(q * q - 0.5, 3)]),
    "project_query": lambda q, k: tw.sum(q @ P) * tw.sum(k),
    "reductions": lambda q, k: tw.max(q * k) - tw.min(k) + tw.mean(q) * tw.sum(k),
    "positions": lambda q, k: tw.dot(q, k) - 0.05 * tw.distance() + 0.01 * tw.position()
    + 0.001 * tw.query_position(),
    "head_dim": lambda q, k: tw.dot(q, k) / tw.sqrt(tw.head_dim()),
    "softcap": lambda q, k: tw.softcap(tw.dot(q, k), 2.0),
    "matmul": lambda q, k: q @ k,
    "reduce_of_query_in_take": lambda q, k: tw.sum((q * tw.sum(q))[[1, 2]] * k[[3, 4]]),
}
ESTIMATORS = {"codes_token": tw.quantized_keys(4), "codes_smooth": tw.quantized_keys(8, smooth=0.5),
              "codes_page": tw.quantized_keys(4, "page"),
              "codes_group": tw.quantized_keys(2, "group", pages=2)}


@tw.token_summary
def low_rank(k):
    return dict(kp=k @ P, few=k[[1, 6]])


@tw.page_summary
def projected_pages(k):
    kp = k @ P
    return dict(lo=tw.min(kp, axis=0), hi=tw.max(kp, axis=0), m=tw.mean(k[:, 0:4], axis=0))


def _pipeline(name: str) -> tw.Pipeline:
    if name in OPS:
        sel = tw.top_k(tw.score(per="token", name=name)(OPS[name]), 8, group="none")
    elif name in ESTIMATORS:
        s = tw.score(per="token", name="codes")(lambda q, k: tw.dot(q, k))
        sel = tw.top_k(s, 8, estimate=ESTIMATORS[name], group="none")
    elif name == "token_summary":
        s = tw.score(per="token", summary=low_rank)(
            lambda q, tok: tw.dot(q @ P, tok.kp) + tw.sum(q[[1, 6]] * tok.few))
        sel = tw.top_k(s, 8, group="none")
    else:  # a page score over projected page summaries
        s = tw.score(per="page", summary=projected_pages)(
            lambda q, page: tw.sum(tw.maximum((q @ P) * page.lo, (q @ P) * page.hi))
            + tw.dot(q, page.m) - tw.position() * 0.01)
        sel = tw.top_k(s, 8, group="none")
    return tw.Pipeline(select=sel, page_size=PS)


CASES = [*OPS, *ESTIMATORS, "token_summary", "page_projection"]


@functools.cache
def _lowered(name: str, backend: str):
    target = Target.parse("llvm") if backend == "tvm" else Target("interpret")
    pipe = _pipeline(name)
    return pipe, get_backend(backend).lower(pipe.ir, ir.Shape(HQ, HKV, D, PS, "float32"), {},
                                            target)


def _check(name: str, backend: str, lengths: list[int], seed: int, scale: float) -> None:
    if backend == "triton":
        from twilight.compiler.triton import loader
        if not loader.interpreter_ready():
            pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    pipe, kern = _lowered(name, backend)
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache(pipe, HKV, D, dtype=torch.float32, initial_pages=2)
    ids = cache.add_requests(len(lengths))
    for rid, n in zip(ids, lengths, strict=True):
        k = torch.randn(HKV, n, D, generator=gen) * scale
        k[:, ::5, 3] = 0.0  # exact zeros: sign, comparisons, logs and powers at 0
        cache.append(k, torch.randn(HKV, n, D, generator=gen), rid)
    q = torch.randn(len(ids), HQ, D, generator=gen) * scale
    x = stage_inputs(q, cache, ids)
    got = kern.scores(x, 0)
    want = ref_scores(pipe.ir, x)  # [B, Hkv, G or 1 (a score of the key alone), N]
    want = want.expand(len(ids), HKV, HQ // HKV, want.shape[-1]).reshape(len(ids), HQ, -1)
    want = torch.where(torch.isnan(want), -torch.inf, want)
    n = want.shape[-1]
    valid = torch.arange(n) < ((x.lengths.long()[:, None] + (PS - 1)) // PS
                               if pipe.ir.select.score.per == "page" else x.lengths.long()[:, None])
    got = got[..., :n]
    assert torch.equal(torch.isinf(got) & valid[:, None], torch.isinf(want) & valid[:, None]), \
        name
    fin = valid[:, None] & torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], atol=2e-4 * max(1.0, scale) ** 3, rtol=2e-4)


@pytest.mark.parametrize("backend", ["tvm", "triton"])
@pytest.mark.parametrize("name", CASES)
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(lengths=st.lists(st.integers(1, 37), min_size=1, max_size=3),
       seed=st.integers(0, 2**16), scale=st.sampled_from([0.3, 1.0, 3.0]))
def test_op_agrees_with_torch(name, backend, lengths, seed, scale):
    _check(name, backend, lengths, seed, scale)
