"""``twilightc eval``: a pipeline against dense attention on a real attention snapshot.

For every layer, query and query head of the snapshot it runs the pipeline with the torch
reference and reports what was kept and what it cost in fidelity:

``kept_tokens``      tokens attended (mean / max), ``kept_fraction`` the same over the context;
``est_mass``         the first pruner's estimated mass of the kept set (null without a pruner);
``true_mass``        the exact attention mass (dense softmax over the whole context) of the
                     kept set — what the estimate is supposed to guarantee;
``true_mass_in_candidates``  the same relative to the selector's candidates: the pruner's own
                     fidelity (top-p promises ≥ p of the candidates' mass), apart from what the
                     selector missed;
``rank_agreement``   Spearman correlation of estimated vs exact weights over the candidates
                     (1 = the estimate orders tokens exactly as attention does; null without a
                     pruner);
``rel_l2_error``     ‖out − dense‖₂ / ‖dense‖₂ of each head's output.

``EvalReport.to_json()`` has the stable keys documented in ``METRIC_KEYS``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...compiler import ir
from ...compiler.stages import lists_to_mask, stage_inputs
from ...frontend.builtins import Calibrated
from ..serving.load import load
from .measure import Problem, dense_baseline, served_ms, snapshot_problem
from .reference import Kept, reference
from .reference_stages import ref_estimate, ref_select
from .snapshot import Snapshot

METRIC_KEYS = ("kept_tokens_mean", "kept_tokens_max", "kept_fraction_mean", "kept_fraction_max",
               "est_mass_mean", "est_mass_min", "true_mass_mean", "true_mass_min",
               "true_mass_in_candidates_mean", "true_mass_in_candidates_min",
               "rank_agreement_mean", "rank_agreement_min",
               "rel_l2_error_mean", "rel_l2_error_max", "heads")


@dataclass
class LayerResult:
    layer: int
    kept: torch.Tensor  # [Nq, Hq] tokens kept
    context: torch.Tensor  # [Nq] tokens visible to each query
    est_mass: torch.Tensor | None  # [Nq, Hq]
    true_mass: torch.Tensor  # [Nq, Hq]
    rel_err: torch.Tensor  # [Nq, Hq]
    true_in_cand: torch.Tensor  # [Nq, Hq]
    rank_agreement: torch.Tensor | None  # [Nq, Hq]
    latency_ms: float | None = None  # compiled pipeline, one decode step of all queries
    dense_ms: float | None = None  # the fastest torch SDPA on the same step
    path: str = ""  # what the loaded pipeline ran: "sparse", or the dense fallback and why
    dense_what: str = ""  # which SDPA was the fastest (dtype, GQA layout)


@dataclass
class EvalReport:
    pipeline: str
    pipeline_key: str
    snapshot: str
    model: str
    layers: list[LayerResult]

    backend: str = "reference"
    schedule_source: str = ""

    def to_json(self) -> dict:
        out = {"pipeline": self.pipeline, "pipeline_key": self.pipeline_key,
               "snapshot": self.snapshot, "model": self.model, "backend": self.backend,
               "context_max": int(max(int(r.context.max()) for r in self.layers)),
               "overall": summarize(self.layers),
               "layers": [{"layer": r.layer, **summarize([r])} for r in self.layers]}
        if self.backend != "reference":
            for row, r in zip(out["layers"], self.layers, strict=True):
                row["path"], row["dense_baseline"] = r.path, r.dense_what
            out["dense_baseline"] = ", ".join(dict.fromkeys(r.dense_what for r in self.layers))
        if self.schedule_source:
            out["schedule_source"] = self.schedule_source
        return out


def summarize(rows: list[LayerResult]) -> dict:
    """The ``METRIC_KEYS`` aggregates over every (layer, query, head) of ``rows``."""
    kept = torch.cat([r.kept.flatten().float() for r in rows])
    frac = torch.cat([(r.kept.float() / r.context[:, None]).flatten() for r in rows])
    true = torch.cat([r.true_mass.flatten() for r in rows])
    err = torch.cat([r.rel_err.flatten() for r in rows])
    est = None if rows[0].est_mass is None else torch.cat([r.est_mass.flatten() for r in rows])
    rank = None if rows[0].rank_agreement is None else \
        torch.cat([r.rank_agreement.flatten() for r in rows])
    rel = torch.cat([r.true_in_cand.flatten() for r in rows])
    out = {"kept_tokens_mean": kept.mean(), "kept_tokens_max": kept.max(),
           "kept_fraction_mean": frac.mean(), "kept_fraction_max": frac.max(),
           "est_mass_mean": None if est is None else est.mean(),
           "est_mass_min": None if est is None else est.min(),
           "true_mass_mean": true.mean(), "true_mass_min": true.min(),
           "true_mass_in_candidates_mean": rel.mean(), "true_mass_in_candidates_min": rel.min(),
           "rank_agreement_mean": None if rank is None else rank.mean(),
           "rank_agreement_min": None if rank is None else rank.min(),
           "rel_l2_error_mean": err.mean(), "rel_l2_error_max": err.max(), "heads": kept.numel()}
    if rows[0].latency_ms is not None:
        lat, dense = sum(r.latency_ms for r in rows), sum(r.dense_ms for r in rows)
        out |= {"latency_ms": lat, "dense_latency_ms": dense, "speedup_vs_dense": dense / lat}
    return {k: (None if v is None else v if isinstance(v, int) else round(float(v), 6))
            for k, v in out.items()}


def evaluate_snapshot(pipeline, snap: Snapshot, layers: list[int] | None = None,
                      calibration: Snapshot | None = None,
                      progress: Callable[[int], None] | None = None,
                      backend: str | None = None, repeats: int = 10) -> EvalReport:
    """Run ``pipeline`` (or a ``Calibrated`` one, calibrated per layer on ``calibration``,
    default the snapshot itself) on the snapshot's layers (indices into it; default all):
    with the torch reference, or with ``backend``'s compiled kernels through ``twilight.load``
    (tuned schedule, kernel cache) — then each layer's step is also timed against dense."""
    idx = list(range(snap.num_layers)) if layers is None else layers
    results, name, key, source = [], "", "", ""
    for i in idx:
        pipe = _pipeline_for_layer(pipeline, calibration or snap, i)
        name, key = ir.as_ir(pipe).name, ir.as_ir(pipe).key()
        result, source = evaluate_layer(ir.as_ir(pipe), snap, i, backend, repeats)
        results.append(result)
        if progress:
            progress(i)
    return EvalReport(name, key, snap.path, snap.model, results, backend or "reference",
                      source)


def _pipeline_for_layer(pipeline, calib: Snapshot, i: int):
    if isinstance(pipeline, Calibrated):
        return pipeline.make(calib.q[i].float(), calib.k[i].float())
    return pipeline


def evaluate_layer(p: ir.PipelineIR, snap: Snapshot, i: int, backend: str | None = None,
                   repeats: int = 10) -> tuple[LayerResult, str]:
    """One layer: every query of the snapshot is one request of a fresh paged cache
    (``measure.snapshot_problem``, what the tuner measures on). Returns the result and where
    the schedule came from (backends only)."""
    p = with_model_scale(p, float(snap.scale[i]), snap.q.shape[-1])
    q, k, v = snap.q[i], snap.k[i], snap.v[i]
    d = k.shape[-1]
    # compiled kernels for a GPU run on GPU tensors; the reference and the figures on the CPU
    device = "cuda" if backend in ("auto", "triton") and torch.cuda.is_available() else "cpu"
    prob = snapshot_problem(p, snap, i, device)
    if backend is None:
        out, kept = reference(p).run(q, prob.cache, prob.ids, return_kept=True)
        timing, source = (None, None, "", ""), ""
    else:
        out, kept, timing, source = _run_compiled(p, prob, backend, repeats)
        out, kept = out.cpu(), dataclasses.replace(kept, **{
            f.name: getattr(kept, f.name).cpu() for f in dataclasses.fields(kept)
            if isinstance(getattr(kept, f.name), torch.Tensor)})
    scale = p.attend.scale or d ** -0.5
    dense_w, dense_out = _dense(q, k, v, snap.q_pos, scale, p.attend.softcap)
    true_mass = (dense_w * kept.mask).sum(-1)
    in_cand = true_mass / (dense_w * kept.candidates).sum(-1).clamp(min=1e-30)
    rel_err = (out.float() - dense_out).norm(dim=-1) / dense_out.norm(dim=-1).clamp(min=1e-30)
    rank = None if kept.est_weights is None else \
        spearman(kept.est_weights, dense_w, kept.candidates)
    return LayerResult(snap.layers[i], kept.count, kept.lengths, kept.est_mass, true_mass,
                       rel_err, in_cand, rank, *timing), source


def with_model_scale(p: ir.PipelineIR, scale: float, head_dim: int) -> ir.PipelineIR:
    """``p`` attending with the model's softmax scale: unchanged (same IR key, same tuning
    logs) where the model uses the default 1/sqrt(head_dim) or ``p`` names its own scale."""
    if p.attend.scale is not None or math.isclose(scale, head_dim ** -0.5, rel_tol=1e-6):
        return p
    return dataclasses.replace(p, attend=dataclasses.replace(p.attend, scale=scale))


def _run_compiled(p: ir.PipelineIR, prob: Problem, backend: str, repeats: int):
    """The loaded pipeline's answer as a ``Kept`` (estimates from the reference's estimator
    over the reference's candidates, so the figures compare like for like), its timing through
    the served path against the one dense baseline, and what ran (sparse, or dense where the
    tuning log measured dense faster for this layer)."""
    q, cache, ids = prob.q, prob.cache, prob.ids
    nq, hq, d = q.shape
    t = prob.max_context
    shape = ir.Shape(hq, cache.num_kv_heads, d, p.page_size, str(q.dtype).removeprefix("torch."))
    dp = load(p, shape=shape, backend=backend, batch=nq, context=t, layer=prob.layer)
    dp.plan(nq, t, q.device)
    out, (idx, cnt) = dp.run(q, cache, ids, return_lists=True)
    x = stage_inputs(q, cache, ids)
    cand = ref_select(p, x)
    w = ref_estimate(p, 0, x, cand) if p.prune else None
    mask = lists_to_mask(idx, cnt, t)
    if dp.runs_dense(t):  # every token was attended: the candidates too
        cand, path = mask, f"dense ({dp.dense!r}): faster below {dp.dense_below} tokens"
    else:
        path = "sparse"
    est = None if w is None else (w.double() * mask).sum(-1).float()
    kept = Kept(mask, cand, est, cache.lengths[ids], w)
    ms = served_ms(dp, prob, repeats)
    base = dense_baseline(prob, repeats)
    return out, kept, (ms, base.ms, path, str(base)), f"{dp.backend}, {dp.schedule_source}"


def spearman(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of ``a`` and ``b`` over ``mask`` along the last dim (rows with
    fewer than two masked entries give 1). Ties get distinct ranks by position."""
    def ranks(x):
        x = x.double().masked_fill(~mask, float("inf"))  # unmasked entries rank last
        r = torch.empty_like(x)
        r.scatter_(-1, x.argsort(dim=-1, stable=True), torch.arange(
            x.shape[-1], dtype=x.dtype, device=x.device).expand_as(x))
        return r
    n = mask.sum(-1, keepdim=True).double()
    ra, rb = ranks(a), ranks(b)
    mean = (n - 1) / 2
    da, db = (ra - mean) * mask, (rb - mean) * mask
    cov = (da * db).sum(-1)
    var = (da.square().sum(-1) * db.square().sum(-1)).sqrt()
    return torch.where(n.squeeze(-1) > 1, cov / var.clamp(min=1e-30), 1.0).float()


def _dense(q, k, v, q_pos, scale: float, softcap: float | None):
    """Exact attention weights ``[Nq, Hq, T]`` and outputs ``[Nq, Hq, D]`` (float32)."""
    nq, hq, d = q.shape
    hkv, t = k.shape[0], int(q_pos.max()) + 1
    qg = q.float().view(nq, hkv, hq // hkv, d)
    logits = torch.einsum("nhgd,htd->nhgt", qg, k[:, :t].float()) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    causal = torch.arange(t)[None] <= q_pos[:, None]
    w = torch.softmax(logits.masked_fill(~causal[:, None, None], -math.inf), -1)
    out = torch.einsum("nhgt,htd->nhgd", w, v[:, :t].float())
    return w.reshape(nq, hq, t), out.reshape(nq, hq, d)
