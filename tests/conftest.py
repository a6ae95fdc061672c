"""Shared helpers of the CPU test tiers, handed out as session fixtures.

Pytest runs with ``--import-mode=importlib``, so test modules cannot import this file; each
helper is a fixture that returns a plain function. They are session-scoped so hypothesis tests
may use them too.

* ``fill_cache(pipeline, hkv, d, lengths)`` — a cache made for ``pipeline`` holding random K/V;
* ``dense_attention(q, keys, values)`` — float64 softmax attention, a Python loop over requests
  and query heads (the oracle a pipeline with an unbounded budget must equal);
* ``masked_attention(q, keys, values, mask)`` — the same over the kept tokens of each head.
"""

from __future__ import annotations

import os
import sys

# Triton decides per function, at decoration time, whether to interpret: the interpreter must be
# on before anything (a backend lookup at collection, say) imports triton. GPU tests in the
# same session launch compiled kernels all the same (see compiler/triton/loader.py).
if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings

from twilight.runtime.serving.paged_cache import PagedKVCache
from twilight.runtime.serving.pipeline_cache import make_cache

# CI runs the same examples every time (a red CI then means a real regression, reproducible
# locally with HYPOTHESIS_PROFILE=ci); a developer's run explores new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else
                                     "default"))


@dataclass
class Filled:
    cache: PagedKVCache
    ids: list[int]
    keys: list[torch.Tensor]  # per request: [Hkv, T, D], in the cache dtype
    values: list[torch.Tensor]

    @property
    def lengths(self) -> list[int]:
        return [k.shape[1] for k in self.keys]

    def query(self, q_heads: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        d = self.cache.head_dim
        return (torch.randn(len(self.ids), q_heads, d, generator=gen) * scale).to(self.cache.dtype)


def _fill_cache(pipeline, hkv: int, d: int, lengths: Sequence[int], *, dtype=torch.float32,
                seed: int = 0, scale: float = 1.0, grid: bool = False) -> Filled:
    """Random K/V in a cache built by ``make_cache`` for ``pipeline``.

    ``grid=True`` draws values from {-2, -1.75, ..., 2}: dot products are then exact in float32
    and float64 alike, so an independent implementation ranks scores exactly as the executor."""
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache(pipeline, hkv, d, dtype=dtype, initial_pages=2)
    ids = cache.add_requests(len(lengths))
    keys, values = [], []
    for rid, n in zip(ids, lengths, strict=True):
        if grid:
            k = torch.randint(-8, 9, (hkv, n, d), generator=gen).float() / 4
        else:
            k = torch.randn(hkv, n, d, generator=gen) * scale
        v = torch.randn(hkv, n, d, generator=gen)
        k, v = k.to(dtype), v.to(dtype)
        cache.append(k, v, rid)
        keys.append(k)
        values.append(v)
    return Filled(cache, ids, keys, values)


def _masked_attention(q: torch.Tensor, keys: Sequence[torch.Tensor],
                      values: Sequence[torch.Tensor], mask: torch.Tensor | None,
                      scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of ``q [B, Hq, D]`` over the tokens ``mask [B, Hq, >=T_b]`` keeps (all when
    ``None``); loops over requests and heads, float64; a head keeping nothing gives zeros."""
    b, hq, d = q.shape
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for i in range(b):
        k, v = keys[i].double(), values[i].double()
        group = hq // k.shape[0]
        for h in range(hq):
            kh, vh = k[h // group], v[h // group]
            sel = torch.ones(kh.shape[0], dtype=torch.bool) if mask is None \
                else mask[i, h, : kh.shape[0]]
            if not sel.any():
                continue
            logits = kh[sel] @ q[i, h].double() * (scale or 1.0 / math.sqrt(d))
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            out[i, h] = torch.softmax(logits, 0) @ vh[sel]
    return out


@pytest.fixture(scope="session")
def fill_cache():
    return _fill_cache


@pytest.fixture(scope="session")
def masked_attention():
    return _masked_attention


@pytest.fixture(scope="session")
def dense_attention():
    def dense(q, keys, values, scale=None, softcap=None):
        return _masked_attention(q, keys, values, None, scale, softcap)
    return dense
