"""The exact answer of each pipeline stage, for checking one backend stage at a time.

Each function takes the stage ABI's inputs (``twilight.compiler.stages.StageInputs``) and gives
the reference executor's answer as dense masks or weights over ``[B, Hq, T]``
(``compiler.stages.lists_to_mask``/``rows_to_dense`` turn a backend's lists into that form).
"""

from __future__ import annotations

from torch import Tensor

from ...compiler import ir
from ...compiler.passes import softmax_scale
from ...compiler.stages import StageInputs
from . import reference as R

__all__ = ["ref_attend", "ref_estimate", "ref_prune", "ref_scores", "ref_select"]

def _qg(x: StageInputs) -> Tensor:
    b, hq, d = x.q.shape
    return x.q.float().view(b, x.cache.num_kv_heads, hq // x.cache.num_kv_heads, d)


def ref_select(p: ir.PipelineIR, x: StageInputs) -> Tensor:
    """Candidates after the selector and the keep rules: ``bool [B, Hq, T]``."""
    k, _, valid = x.cache.gather(x.ids)
    keep = R.keep_mask(p.keep, valid, valid.sum(-1))
    cand = R.select_mask(p, _qg(x), k, valid, x.cache, x.ids) | keep[:, None, None]
    return cand.flatten(1, 2)


def ref_estimate(p: ir.PipelineIR, stage: int, x: StageInputs, cand: Tensor,
                 query: str = "float32") -> Tensor:
    """Estimated weights ``float32 [B, Hq, T]`` of pruner ``stage`` over candidates ``cand``
    (``query``: the schedule's ``estimate_query``)."""
    k, _, _ = x.cache.gather(x.ids)
    qg = _qg(x)
    c = cand.view(*qg.shape[:3], -1)
    w = R.estimate_weights(p.prune[stage], qg, c, x.cache, x.ids, k, softmax_scale(p, qg.shape[-1]),
                    p.attend.softcap, query)
    return w.flatten(1, 2)


def ref_prune(p: ir.PipelineIR, stage: int, x: StageInputs, w: Tensor, cand: Tensor) -> Tensor:
    """Kept set ``bool [B, Hq, T]`` of pruner ``stage`` given its weights and candidates."""
    _, _, valid = x.cache.gather(x.ids)
    lengths = valid.sum(-1)
    hkv = x.cache.num_kv_heads
    shape = (w.shape[0], hkv, w.shape[1] // hkv, -1)
    kept = R.prune_mask(p.prune[stage], w.view(shape), cand.view(shape), lengths)
    keep = R.keep_mask(p.keep, valid, lengths)
    return (kept | keep[:, None, None]).flatten(1, 2)


def ref_attend(p: ir.PipelineIR, x: StageInputs, kept: Tensor) -> Tensor:
    """Exact attention ``[B, Hq, D]`` (q's dtype) over the kept mask."""
    k, v, valid = x.cache.gather(x.ids)
    qg = _qg(x)
    kept = kept.view(*qg.shape[:3], -1)
    out = R.attend_masked(qg, k.float(), v.float(), kept, softmax_scale(p, qg.shape[-1]),
                          p.attend.softcap)
    if p.attend.mean_value:
        out = R.reallocate(p, qg, k, valid, x.cache, x.ids, kept, out)
    return out.reshape(x.q.shape).to(x.q.dtype)


def ref_scores(p: ir.PipelineIR, x: StageInputs, part: int = 0) -> Tensor:
    """Scores ``float32 [B, Hkv, G' (1 for group kv), N]`` of scored selector ``part``
    (``p.selectors()[part]``) over pages or tokens, before the group merge; invalid units hold
    whatever the expression gives there (a backend's are ``-inf``)."""
    k, _, valid = x.cache.gather(x.ids)
    s = p.selectors()[part]
    return R.select_scores(s, p, _qg(x), k, valid, x.cache, x.ids)[0]
