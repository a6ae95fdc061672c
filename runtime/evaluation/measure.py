"""Problems to measure on, timing, and the correctness gate (used by the tuner and benchmarks).

Synthetic decode problems are built to look like real attention, not white noise: each query
is a mix of a few keys of its context (so a few tokens dominate, as in trained models), plus an
attention-sink token; uniform random keys would make every top-p set nearly the whole context
and mis-tune the top-p search.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...compiler import ir
from ...compiler.stages import lists_to_mask, stage_inputs
from ..serving.paged_cache import DTYPES, PagedKVCache
from ..serving.pipeline_cache import make_cache
from ..store.tuning_log import ShapeBucket
from .reference import reference
from .reference_stages import ref_estimate, ref_select


@dataclass
class Problem:
    q: torch.Tensor
    cache: PagedKVCache
    ids: list[int]




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
    return Problem(q, cache, ids)


def median_time(fn: Callable[[], object], repeats: int = 10, warmup: int = 2,
                max_seconds: float = 5.0) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA-synchronized when a GPU is in use)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times, start = [], time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(times) >= 3:
            break
    return statistics.median(times)


def dense_baseline_ms(prob: Problem, repeats: int = 10) -> tuple[float, str]:
    """The fastest dense decode torch offers on this problem, in ms, and what it was: SDPA over
    contiguous K/V (what a dense decoder holds) in the cache's dtype, and in float32 with the
    conversion done beforehand (on CPUs, fp16 SDPA is far slower than fp32)."""
    k, v, valid = prob.cache.gather(prob.ids)
    mask = None if bool(valid.all()) else valid[:, None, None, :]  # ragged lengths
    best = (float("inf"), "")
    for dtype in dict.fromkeys((k.dtype, torch.float32)):
        q, kd, vd = prob.q[:, :, None].to(dtype), k.to(dtype), v.to(dtype)
        fn = lambda q=q, kd=kd, vd=vd: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q, kd, vd, attn_mask=mask, enable_gqa=True)
        ms = median_time(fn, repeats=repeats) * 1e3
        best = min(best, (ms, f"torch SDPA {str(dtype).removeprefix('torch.')}"))
    return best


@dataclass
class GateResult:
    ok: bool
    rel_error: float
    est_mass_min: float | None
    reason: str = ""


def correctness_gate(p: ir.PipelineIR, prob: Problem, out: torch.Tensor,
                     kept: tuple[torch.Tensor, torch.Tensor] | None, tol: float = 2e-2) \
        -> GateResult:
    """Compare a backend's answer with the torch reference: output relative L2 error ≤ ``tol``
    and, for top-p pipelines, estimated mass of the kept set ≥ p of the reference estimate."""
    ref_out, ref_kept = reference(p).run(prob.q, prob.cache, prob.ids, return_kept=True)
    err = float((out.float() - ref_out.float()).norm() / ref_out.float().norm().clamp(min=1e-30))
    if not math.isfinite(err) or err > tol:
        return GateResult(False, err, None, f"output differs from the reference: rel L2 {err:.3g}")
    top_p = [pr for pr in p.prune if pr.rule == "top_p"]
    if not top_p or kept is None or ref_kept.est_mass is None:
        return GateResult(True, err, None)
    mask = lists_to_mask(kept[0], kept[1], ref_kept.mask.shape[-1])
    # the reference's estimate restricted to the backend's kept set
    frac = _estimated_mass(p, prob, mask)
    need = top_p[0].p - 1e-4
    if frac < need:
        return GateResult(False, err, frac, f"kept estimated mass {frac:.4f} < p={top_p[0].p}")
    return GateResult(True, err, frac)


def _estimated_mass(p: ir.PipelineIR, prob: Problem, mask: torch.Tensor) -> float:
    x = stage_inputs(prob.q, prob.cache, prob.ids)
    w = ref_estimate(p, 0, x, ref_select(p, x))
    return float((w.double() * mask).sum(-1).min())
