"""The decode problems twilight is measured on: synthetic ones, and real ones from snapshots.

A :class:`Problem` is what one decode step of one layer sees: queries, a paged cache of the
batch's requests, and their ids. The tuner, ``twilightc eval`` and the benchmarks build their
problems here so that "the same data" means the same cache, built the same way.

* :func:`make_problem` — synthetic, made to look like real attention rather than white noise:
  a GQA group's queries share a direction, every key leans along it by a Gaussian amount (its
  logit ~ N(0, 1 + SPREAD²): log-normal weights, a heavy tail), and token 0 is an attention
  sink holding ``SINK_SHARE`` of the mass. ``quest_twilight``'s top-p at 0.9 then keeps 6–21%
  of the tokens (by head layout, at 512–8k tokens), where SmolLM2's layers keep 4–25% at 2k
  (64% in its flat layer 0). Uniform random keys would keep nearly the whole context; the mix
  of a few keys with a 4x sink this replaced gave the sink ~all the mass, so top-p kept 1 token
  of 4096 and the tuner timed a trivial search.
* :func:`snapshot_problem` — one layer of an attention snapshot, each query a request of its
  own causal context (``q_pos[i] + 1`` tokens): exactly what ``twilightc eval`` runs. With
  ``context=c`` a longer request keeps its first ``SINK_TOKENS`` tokens (the attention sink) and
  its last ``c - SINK_TOKENS`` (real keys and queries, a shorter context) — how the tuner finds
  where dense attention wins on real data. Not the *first* ``c`` tokens: a query at position
  8176 cut off from its recent tokens puts its mass on the sink, and on SmolLM2's 8k snapshot
  top-p then kept 1 token of 2048 in 14 of 30 layers, where a sink-and-recent window of 2048 keeps
  15–1500 (median ~85, against ~125 of the whole 8k context): the short contexts looked
  trivially sparse, and dense attention's crossover came out too low. The keys carry their
  rotary embedding, so the recent window keeps its true distances to the query.
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


SPREAD = 2.5  # std of the keys' logits along their group's query direction (see make_problem)
SINK_SHARE = 0.3  # the attention sink's share of a group's mass


def make_problem(p: ir.PipelineIR, shape: ir.Shape, bucket: ShapeBucket, seed: int = 0,
                 device: str = "cpu") -> Problem:
    """A paged cache of ``bucket.batch`` requests of ``bucket.context`` tokens, and queries:
    each GQA group's queries share a direction ``u`` (80% of each query), every key is noise
    plus ``a_t·u`` with ``a_t`` Gaussian, scaled so the logits ``q·k/√d`` spread with std
    ``SPREAD`` beyond the noise's 1, and token 0's ``a_0`` makes it a sink with ``SINK_SHARE``
    of the group's mean-query mass."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[shape.dtype]
    b, t, hkv, d = bucket.batch, bucket.context, shape.kv_heads, shape.head_dim
    g = shape.q_heads // hkv
    cache = make_cache(p, hkv, d, dtype=dtype, device=device,
                       initial_pages=b * -(-t // p.page_size))
    ids = cache.add_requests(b)
    common = torch.randn(b, hkv, 1, d, generator=gen)
    q = 0.8 * common + 0.6 * torch.randn(b, hkv, g, d, generator=gen)  # unit variance a channel
    u = common / common.norm(dim=-1, keepdim=True)  # [B, Hkv, 1, D]
    along = 0.8 * common.norm(dim=-1, keepdim=True) / math.sqrt(d)  # q·u/√d, ~0.8
    a = SPREAD * torch.randn(b, hkv, t, 1, generator=gen) / along
    k = torch.randn(b, hkv, t, d, generator=gen) + a * u
    logits = (k @ q.mean(2, keepdim=True).transpose(-1, -2))[..., 0] / math.sqrt(d)  # [B, Hkv, T]
    if t > 1:  # the sink: token 0 takes SINK_SHARE of the mass of the group's mean query
        rest = torch.logsumexp(logits[..., 1:], -1)
        want = rest + math.log(SINK_SHARE / (1 - SINK_SHARE))
        k[:, :, 0] += ((want - logits[..., 0])[..., None] / along[:, :, 0]) * u[:, :, 0]
    v = torch.randn(b, hkv, t, d, generator=gen)
    cache.append(k.to(dtype).to(device), v.to(dtype).to(device), ids)
    q = q.reshape(b, shape.q_heads, d).to(dtype).to(device)
    return Problem(q, cache, ids, f"synthetic (peaked random keys, seed {seed})")


def snapshot_bucket(snap: Snapshot) -> ShapeBucket:
    """The shape bucket a snapshot's problems belong to: queries × longest context."""
    return ShapeBucket(len(snap.q_pos), int(snap.q_pos.max()) + 1)


SINK_TOKENS = 4  # the first tokens a shortened snapshot request keeps (StreamingLLM's sink)


def window(n: int, context: int | None) -> torch.Tensor | None:
    """The token positions a request of ``n`` tokens keeps at ``context`` tokens: ``None`` for
    all of them, else the first ``SINK_TOKENS`` and the last ``context - SINK_TOKENS``."""
    if context is None or n <= context:
        return None
    sink = min(SINK_TOKENS, context // 2)
    return torch.cat([torch.arange(sink), torch.arange(n - (context - sink), n)])


def snapshot_problem(p: ir.PipelineIR, snap: Snapshot, i: int, device: str = "cpu",
                     context: int | None = None) -> Problem:
    """Layer slot ``i`` of ``snap``: every query one request of a fresh paged cache holding its
    causal context (at most ``context`` tokens of it, when given: the sink and the most recent,
    see :func:`window`)."""
    q, k, v = snap.q[i], snap.k[i], snap.v[i]
    hkv, d = k.shape[0], k.shape[-1]
    lengths = [int(pos) + 1 for pos in snap.q_pos.tolist()]
    kept = [window(n, context) for n in lengths]
    cache = make_cache(p, hkv, d, dtype=k.dtype, device=device, initial_pages=sum(
        math.ceil((n if w is None else len(w)) / p.page_size) for n, w in zip(lengths, kept)))
    ids = cache.add_requests(len(lengths))
    for rid, n, w in zip(ids, lengths, kept, strict=True):
        kk, vv = (k[:, :n], v[:, :n]) if w is None else (k[:, w], v[:, w])
        cache.append(kk.to(device), vv.to(device), rid)
    name = Path(snap.path).name or "snapshot"
    label = f"{name} layer {snap.layers[i]}" + (
        "" if context is None else f" (sink + last tokens, {context})")
    return Problem(q.to(device), cache, ids, label, snap.layers[i])
