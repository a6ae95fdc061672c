"""The decode problems twilight is measured on: synthetic ones, and real ones from snapshots.

A :class:`Problem` is what one decode step of one layer sees: queries, a paged cache of the
batch's requests, and their ids. The tuner, ``twilightc eval`` and the benchmarks build their
problems here so that "the same data" means the same cache, built the same way.

* :func:`make_problem` — synthetic, made to look like real attention rather than white noise:
  each query is a mix of a few keys of its context (so a few tokens dominate, as in trained
  models), plus an attention-sink token; uniform random keys would make every top-p set nearly
  the whole context and mis-tune the top-p search.
* :func:`snapshot_problem` — one layer of an attention snapshot, each query a request of its
  own causal context (``q_pos[i] + 1`` tokens): exactly what ``twilightc eval`` runs. With
  ``context=c`` every request keeps only its first ``min(q_pos[i] + 1, c)`` tokens (real keys
  and queries, a shorter context) — how the tuner finds where dense attention wins on real data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ...compiler import ir
from ..serving.paged_cache import DTYPES, PagedKVCache
from ..serving.pipeline_cache import make_cache
from ..store.tuning_log import ShapeBucket
from .snapshot import Snapshot

__all__ = ["Problem", "make_problem", "snapshot_bucket", "snapshot_problem"]


@dataclass
class Problem:
    q: torch.Tensor
    cache: PagedKVCache
    ids: list[int]
    label: str = "synthetic"  # where the data came from (printed, logged)
    layer: int | None = None  # the model layer, for snapshot problems

    @property
    def batch(self) -> int:
        return len(self.ids)

    @property
    def max_context(self) -> int:
        """The longest request's length (a host-side read of the cache's lengths)."""
        return int(self.cache.lengths[self.ids].max())


def make_problem(p: ir.PipelineIR, shape: ir.Shape, bucket: ShapeBucket, seed: int = 0,
                 device: str = "cpu") -> Problem:
    """A paged cache of ``bucket.batch`` requests of ``bucket.context`` tokens, and queries."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[shape.dtype]
    b, t, hkv, d = bucket.batch, bucket.context, shape.kv_heads, shape.head_dim
    cache = make_cache(p, hkv, d, dtype=dtype, device=device,
                       initial_pages=b * -(-t // p.page_size))
    ids = cache.add_requests(b)
    k = torch.randn(b, hkv, t, d, generator=gen)
    k[:, :, 0] *= 4.0  # an attention sink
    v = torch.randn(b, hkv, t, d, generator=gen)
    cache.append(k.to(dtype).to(device), v.to(dtype).to(device), ids)
    g = shape.q_heads // hkv
    picks = torch.randint(0, t, (b, hkv, g, 4), generator=gen)
    mix = torch.gather(k[:, :, None].expand(b, hkv, g, t, d), 3,
                       picks[..., None].expand(-1, -1, -1, -1, d)).sum(3)
    q = 0.6 * mix + torch.randn(b, hkv, g, d, generator=gen) + 0.5 * k[:, :, None, 0]
    q = q.reshape(b, shape.q_heads, d).to(dtype).to(device)
    return Problem(q, cache, ids, f"synthetic (peaked random keys, seed {seed})")


def snapshot_bucket(snap: Snapshot) -> ShapeBucket:
    """The shape bucket a snapshot's problems belong to: queries × longest context."""
    return ShapeBucket(len(snap.q_pos), int(snap.q_pos.max()) + 1)


def snapshot_problem(p: ir.PipelineIR, snap: Snapshot, i: int, device: str = "cpu",
                     context: int | None = None) -> Problem:
    """Layer slot ``i`` of ``snap``: every query one request of a fresh paged cache holding its
    causal context (the first ``context`` tokens of it, when given)."""
    q, k, v = snap.q[i], snap.k[i], snap.v[i]
    hkv, d = k.shape[0], k.shape[-1]
    lengths = [int(pos) + 1 for pos in snap.q_pos.tolist()]
    if context is not None:
        lengths = [min(n, context) for n in lengths]
    cache = make_cache(p, hkv, d, dtype=k.dtype, device=device,
                       initial_pages=sum(math.ceil(n / p.page_size) for n in lengths))
    ids = cache.add_requests(len(lengths))
    for rid, n in zip(ids, lengths, strict=True):
        cache.append(k[:, :n].to(device), v[:, :n].to(device), rid)
    name = Path(snap.path).name or "snapshot"
    label = f"{name} layer {snap.layers[i]}" + ("" if context is None else f" (first {context})")
    return Problem(q.to(device), cache, ids, label, snap.layers[i])
