"""The decode problems twilight is measured on: synthetic ones, and real ones from snapshots.

A :class:`Problem` is what one decode step of one layer sees: queries, a paged cache of the
batch's requests, and their ids. The tuner, ``twilightc eval`` and the benchmarks build their
problems here so that "the same data" means the same cache, built the same way.

* :func:`make_problem` — synthetic, made to look like real attention rather than white noise:
  a GQA group's queries share a direction, every key leans along it by a Gaussian amount (its
  logit ~ N(0, σ²): log-normal weights, a heavy tail), and token 0 is an attention sink holding
  ``SINK_SHARE`` of the mass. σ grows with the context so that ``quest_twilight``'s top-p at
  0.9 (on its INT4 estimate) keeps ``KEEP_8K · (t / 8192) ** KEEP_GROWTH`` tokens, as it does on
  SmolLM2-135M's 8k snapshot (30 layers, Python source): a median 86, 110, 120 and 130 tokens of
  sink-and-recent windows of 1k, 2k, 4k and 8k (quartiles 53–137 at 1k, 68–274 at 8k): on real
  text the kept tokens barely grow with the context, so their fraction falls (8% at 1k, 1.6% at
  8k; extrapolated, 0.5% at 32k). A synthetic with a fixed spread keeps a fixed fraction
  (the one this replaced: 6–21% at every context, ~4000 tokens of 32k, where no real layer but
  the flat first one comes near), and uniform random keys keep nearly everything. The target
  is what that pipeline keeps, estimate and all, on both data; by exact weights far fewer
  tokens hold 90% of the synthetic mass (~25–70 at 8k), so a selector with an exact or finer
  estimator keeps fewer here than ``KEEP_8K`` says.
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
from statistics import NormalDist

import torch

from ...compiler import ir
from ..serving.paged_cache import DTYPES, PagedKVCache
from ..serving.pipeline_cache import make_cache
from ..store.tuning_log import ShapeBucket
from .snapshot import Snapshot

__all__ = ["SYNTHETIC_VERSION", "Problem", "make_problem", "snapshot_bucket", "snapshot_problem"]


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


# Bumped whenever make_problem's data changes: tuning studies on it are named by it, so trials
# timed on an older synthetic problem are not resumed as if measured on this one.
SYNTHETIC_VERSION = 3
SINK_SHARE = 0.3  # the attention sink's share of a group's mass
KEEP_8K = 130.0  # tokens quest_twilight's top-p keeps at 8k tokens (see the module doc)
KEEP_GROWTH = 0.19  # ... times (context / 8192) ** this (least squares over 1k-8k, log-log)
_KEEP_MASS = 0.9
# Each head's own query and the INT4 estimate top-p runs on flatten the weights top-p sees:
# with the spread as derived, quest_twilight kept ~2x the target at 1k-8k. Scaled by this it
# keeps a median ~88, ~75, ~92 and ~133 tokens at 1k, 2k, 4k and 8k over four head layouts
# (32/8 x 128, 9/3 x 64, 12/4 x 80, 14/2 x 64; fewer at 32k, where Quest's budget of 8192 cuts
# the candidates first).
FLATTENING = 1.3


def spread(context: int) -> float:
    """The std σ of the synthetic logits at ``context`` tokens: with log-normal weights
    ``exp(σZ)``, the tokens with ``Z > z`` hold ``1 - Φ(z - σ)`` of the non-sink mass, so the
    top ``φ = 1 - Φ(z)`` of them hold the share that, with the sink, makes ``_KEEP_MASS``
    when ``σ = z - Φ⁻¹(1 - share)``; ``φ`` is the target count over the context. (The weights
    the pipeline's top-p sees are flatter than these: ``make_problem`` scales by
    ``FLATTENING``.)"""
    nd = NormalDist()
    share = (_KEEP_MASS - SINK_SHARE) / (1 - SINK_SHARE)
    keep = KEEP_8K * (max(context, 2) / 8192) ** KEEP_GROWTH
    phi = min(max((keep - 1) / max(context - 1, 1), 1e-6), 0.5)
    return max(nd.inv_cdf(1 - phi) - nd.inv_cdf(1 - share), 1.0)


def make_problem(p: ir.PipelineIR, shape: ir.Shape, bucket: ShapeBucket, seed: int = 0,
                 device: str = "cpu") -> Problem:
    """A paged cache of ``bucket.batch`` requests of ``bucket.context`` tokens, and queries:
    each GQA group's queries share a direction ``u`` (80% of each query), every key is noise
    plus ``a_t·u`` with ``a_t`` Gaussian, scaled so the logits ``q·k/√d`` spread with std
    ``spread(context)`` (the noise's 1 included), and token 0's ``a_0`` makes it a sink with
    ``SINK_SHARE`` of the group's mean-query mass."""
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
    sigma = FLATTENING * math.sqrt(spread(t) ** 2 - 1)  # beyond the noise's unit logit spread
    a = sigma * torch.randn(b, hkv, t, 1, generator=gen) / along
    k = torch.randn(b, hkv, t, d, generator=gen) + a * u
    logits = (k @ q.mean(2, keepdim=True).transpose(-1, -2))[..., 0] / math.sqrt(d)  # [B, Hkv, T]
    if t > 1:  # the sink: token 0 takes SINK_SHARE of the mass of the group's mean query
        rest = torch.logsumexp(logits[..., 1:], -1)
        want = rest + math.log(SINK_SHARE / (1 - SINK_SHARE))
        k[:, :, 0] += ((want - logits[..., 0])[..., None] / along[:, :, 0]) * u[:, :, 0]
    v = torch.randn(b, hkv, t, d, generator=gen)
    cache.append(k.to(dtype).to(device), v.to(dtype).to(device), ids)
    q = q.reshape(b, shape.q_heads, d).to(dtype).to(device)
    return Problem(q, cache, ids, f"synthetic (log-normal attention, seed {seed})")


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
    sizes = [n if w is None else len(w) for n, w in zip(lengths, kept, strict=True)]
    cache = make_cache(p, hkv, d, dtype=k.dtype, device=device,
                       initial_pages=sum(math.ceil(n / p.page_size) for n in sizes))
    ids = cache.add_requests(len(lengths))
    for rid, n, w in zip(ids, lengths, kept, strict=True):
        kk, vv = (k[:, :n], v[:, :n]) if w is None else (k[:, w], v[:, w])
        cache.append(kk.to(device), vv.to(device), rid)
    name = Path(snap.path).name or "snapshot"
    label = f"{name} layer {snap.layers[i]}" + (
        "" if context is None else f" (sink + last tokens, {context})")
    return Problem(q.to(device), cache, ids, label, snap.layers[i])
