"""Estimator calibration: which key estimator a pipeline's pruners should use for a model.

``calibrate`` runs the pipeline with every estimator choice on real attention snapshots of the
model and weighs fidelity — the true attention mass of the kept set relative to the
candidates (what top-p promises), its worst head, the output error — against cost: bytes read
per candidate token, and the estimate stage's latency on this device (TVM on the CPU). It
recommends the cheapest choice that meets the fidelity target (default: mean ≥ p − 0.02 and
no head below p − 0.2); ``runtime.store.estimator_choice.write_choice`` records it in
``<data dir>/calibration/<model>.json``, where ``twilight.load(pipeline, model=...)`` picks it
up.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ...compiler import ir
from ...compiler.keycodes import KeyCodeSpec, bytes_per_token
from ..serving.load import DefaultScheduleWarning, load
from ..serving.pipeline_cache import make_cache
from ..store.estimator_choice import CHOICES, with_estimator
from .evaluate import evaluate_snapshot
from .measure import median_time
from .snapshot import Snapshot


def est_bytes(est: ir.Estimator, head_dim: int, page_size: int, elem_bytes: int = 2) -> float:
    """Bytes read per candidate token and KV head (keys in the cache dtype for the exact
    estimator; ``elem_bytes`` is its size)."""
    if est.kind == "exact":
        return float(elem_bytes * head_dim)
    return bytes_per_token(KeyCodeSpec.of(est), head_dim, page_size, elem_bytes)


@dataclass
class Choice:
    estimator: str
    bytes_per_token: float
    true_in_cand_mean: float
    true_in_cand_min: float
    true_mass_mean: float
    rel_error_mean: float
    kept_tokens_mean: float
    estimate_ms: float | None
    meets_target: bool


def _top_p(p: ir.PipelineIR) -> float:
    ps = [pr.p for pr in p.prune if pr.rule == "top_p"]
    if not ps:
        raise ValueError(f"pipeline {p.name!r} has no top-p pruner: nothing to calibrate")
    return ps[0]


def calibrate(pipeline, snapshots: list[Snapshot], mean_drop: float = 0.02,
              min_drop: float = 0.2, layers: list[int] | None = None,
              time_estimate: bool = True, progress=None) -> tuple[list[Choice], Choice | None]:
    """Measure every estimator choice; return them all and the recommendation (or None)."""
    p = ir.as_ir(pipeline)
    top = _top_p(p)
    d = snapshots[0].q.shape[-1]
    elem = snapshots[0].k.element_size()
    out = []
    for est in CHOICES:
        variant = with_estimator(p, est)
        reps = [evaluate_snapshot(variant, s, layers).to_json()["overall"] for s in snapshots]
        mean = sum(r["true_mass_in_candidates_mean"] for r in reps) / len(reps)
        worst = min(r["true_mass_in_candidates_min"] for r in reps)
        ms = _estimate_ms(variant, snapshots[0]) if time_estimate else None
        out.append(Choice(est.name, est_bytes(est, d, p.page_size, elem), mean, worst,
                          sum(r["true_mass_mean"] for r in reps) / len(reps),
                          sum(r["rel_l2_error_mean"] for r in reps) / len(reps),
                          sum(r["kept_tokens_mean"] for r in reps) / len(reps), ms,
                          mean >= top - mean_drop and worst >= top - min_drop))
        if progress:
            progress(est)
    ok = [c for c in out if c.meets_target]
    best = min(ok, key=lambda c: (c.bytes_per_token, c.estimate_ms or 0.0)) if ok else None
    return out, best


def _estimate_ms(p: ir.PipelineIR, snap: Snapshot) -> float | None:
    """The first pruner's estimate stage, compiled for this device, on the snapshot's last
    layer (all its queries as one batch)."""
    q, k, v = snap.q[-1], snap.k[-1], snap.v[-1]
    shape = ir.Shape(q.shape[1], k.shape[0], k.shape[-1], p.page_size,
                     str(q.dtype).removeprefix("torch."))
    try:
        with warnings.catch_warnings():  # an untuned variant runs its default schedule
            warnings.simplefilter("ignore", DefaultScheduleWarning)
            dp = load(p, shape=shape, batch=q.shape[0], context=k.shape[1])
    except Exception:  # no backend for this device: report fidelity and bytes only
        return None
    cache = make_cache(p, k.shape[0], k.shape[-1], dtype=k.dtype)
    ids = cache.add_requests(q.shape[0])
    cache.append(k[None].expand(len(ids), -1, -1, -1).contiguous(),
                 v[None].expand(len(ids), -1, -1, -1).contiguous(), ids)
    x = dp.plan(len(ids), k.shape[1]).stage_inputs(q, cache, ids)
    idx, cnt = dp.compiled.select(x)
    return median_time(lambda: dp.compiled.estimate(0, x, idx, cnt), repeats=10) * 1e3
