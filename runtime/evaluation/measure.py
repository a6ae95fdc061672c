"""Timing, the one dense baseline, the served-path timer, and the correctness gate.

Everything that reports a speed-up in twilight (``twilightc tune``, ``twilightc eval``, the tuning
logs, every benchmark) divides by :func:`fastest_sdpa`: the fastest torch
``scaled_dot_product_attention`` decode over the *same* K/V, among float32, bfloat16 and float16
and among the two ways of laying out a GQA group (``enable_gqa``, or the group's query heads
folded into the query length so K/V are read once per KV head), every conversion done before
the timing. On a CPU, float16 SDPA is several times slower than float32 over the same data, and
``enable_gqa`` repeats K/V per query head: a baseline in the cache's dtype would flatter every
sparse pipeline. The winner is reported with its dtype and layout.

Problems (the data measured on) live in :mod:`.problems`; they are re-exported here.
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
from .problems import Problem, make_problem, snapshot_bucket, snapshot_problem
from .reference import reference
from .reference_stages import ref_estimate, ref_select

__all__ = ["DenseBaseline", "GateResult", "Problem", "correctness_gate", "dense_baseline",
           "dense_baseline_ms", "fastest_sdpa", "make_problem", "median_time",
           "sdpa_variants", "served_ms", "snapshot_bucket", "snapshot_problem"]

SDPA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


WARM_CALLS, WARM_S = 8, 0.05  # warm-up before every timed series (see median_time)
SETTLE_S, SETTLE_CALLS = 0.02, 1000  # and at least this long (torch's OpenMP workers' spin)


def median_time(fn: Callable[[], object], repeats: int = 10, warmup: int = 2,
                max_seconds: float = 5.0, warm_calls: int = WARM_CALLS,
                warm_s: float = WARM_S) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA-synchronized when a GPU is in use), after
    ``warmup`` untimed calls and more, up to ``warm_calls`` of them (and no more than it times:
    a quick, rough series stays quick) while they take less than ``warm_s`` seconds in all.

    On a small shared VM a call made right after other heavy work (the torch reference a
    tuning trial checks against, another kernel's series) runs slow for a while. A fused
    decode step of 1.7 ms at SmolLM2's layout took 5 ms, then about 2.5 ms, for its first ~8
    calls after the correctness gate: with two warm-up calls those slow calls were most of a
    10-call median, so a trial's figure was mostly the gate's aftermath, and noise picked the
    tuner's winner.

    And at least ``SETTLE_S`` of calls (at most ``SETTLE_CALLS``): after a torch op that ran in
    parallel, torch's OpenMP workers spin on the cores for ~15 ms here (libgomp's wait; with
    ``GOMP_SPINCOUNT=10000`` or ``OMP_WAIT_POLICY=PASSIVE`` it was gone), and a TVM step sharing
    a core with one
    runs slow: a fused step of 0.19 ms at SmolLM2's layout and 1×8k took 0.35 ms for its first
    ~42 calls after SDPA, so the crossover, timing the pipeline right after the SDPA fallback,
    read it at 0.37 ms where its trial had read 0.19 ms, and logged dense attention as faster
    at 8k."""
    start = time.perf_counter()
    n = 0
    while n < warmup or (n < min(warm_calls, repeats) and time.perf_counter() - start < warm_s) \
            or (n < SETTLE_CALLS and time.perf_counter() - start < SETTLE_S):
        fn()
        _sync()
        n += 1
    times, start = [], time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(times) >= 3:
            break
    return statistics.median(times)


# ---- the dense baseline ------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseBaseline:
    """The fastest dense decode torch offers on a problem: ``ms`` per step and how it ran."""

    ms: float
    dtype: str  # "float32", "bfloat16", "float16"
    folded: bool  # the GQA group's query heads as query rows (K/V read once per KV head)

    def __str__(self) -> str:
        how = ", GQA group as query rows" if self.folded else ""
        return f"torch SDPA {self.dtype}{how}"


def sdpa_variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  valid: torch.Tensor | None = None,
                  dtypes: tuple[torch.dtype, ...] = SDPA_DTYPES):
    """``(dtype name, folded, fn)`` for every SDPA decode :func:`fastest_sdpa` times; ``fn()``
    returns ``[B, Hq, D]``. Inputs are converted once per dtype, lazily (one dtype's copies
    live at a time while the caller iterates)."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    mask = None if valid is None or bool(valid.all()) else valid[:, None, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for dtype in dtypes:
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        name = str(dtype).removeprefix("torch.")
        yield name, False, lambda qd=qd, kd=kd, vd=vd: sdpa(
            qd[:, :, None], kd, vd, attn_mask=mask, enable_gqa=hq != hkv)[:, :, 0]
        if hq != hkv:
            qf = qd.view(b, hkv, hq // hkv, d)
            yield name, True, lambda qf=qf, kd=kd, vd=vd: sdpa(
                qf, kd, vd, attn_mask=mask).reshape(b, hq, d)
        del qd, kd, vd


def fastest_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 valid: torch.Tensor | None = None, *, repeats: int = 10,
                 timer: Callable[[Callable[[], object]], float] | None = None,
                 dtypes: tuple[torch.dtype, ...] = SDPA_DTYPES) -> DenseBaseline:
    """The fastest torch SDPA decode of ``q [B, Hq, D]`` over ``k``/``v [B, Hkv, T, D]`` (any
    dtype; ``valid bool [B, T]`` masks ragged lengths) among ``dtypes`` and both GQA layouts
    (:func:`sdpa_variants`).

    Conversions happen before the timing, one dtype at a time (a float32 copy of a large cache
    is big). ``timer(fn) -> ms`` replaces the default (median of ``repeats`` wall-clock runs,
    CUDA-synchronized), e.g. with ``triton.testing.do_bench`` on a GPU."""
    timer = timer or (lambda fn: median_time(fn, repeats=repeats) * 1e3)
    best: DenseBaseline | None = None
    for dtype, folded, fn in sdpa_variants(q, k, v, valid, dtypes):
        ms = timer(fn)
        if best is None or ms < best.ms:
            best = DenseBaseline(ms, dtype, folded)
    return best


def dense_baseline(prob: Problem, repeats: int = 10, **kw) -> DenseBaseline:
    """:func:`fastest_sdpa` over the problem's K/V, gathered from its pages once (what a dense
    decoder holds: contiguous K/V per request)."""
    k, v, valid = prob.cache.gather(prob.ids)
    return fastest_sdpa(prob.q, k, v, valid, repeats=repeats, **kw)


def dense_baseline_ms(prob: Problem, repeats: int = 10) -> tuple[float, str]:
    """``(ms, what)`` of :func:`dense_baseline`."""
    base = dense_baseline(prob, repeats)
    return base.ms, str(base)


# ---- the served path ---------------------------------------------------------------------------
def served_ms(dp, prob: Problem, repeats: int = 10) -> float:
    """ms per step of a loaded pipeline (``DecodePipeline``) on ``prob`` exactly as serving runs
    it: ``plan`` once for the batch and its longest context, then ``run`` per step (median).
    The tuner's trials and ``twilightc eval --backend`` both time with this."""
    dp.plan(prob.batch, prob.max_context, prob.q.device)
    return median_time(lambda: dp.run(prob.q, prob.cache, prob.ids), repeats=repeats) * 1e3


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
