"""The torch reference executor: runs any pipeline IR exactly, batched.

Every code generator, the tuner's correctness gate and ``twilightc eval`` are checked against
this. One decode step, for requests ``req`` of a :class:`PagedKVCache`:

1. **select** — score pages or tokens (``compiler.torch_expr``), merge the GQA group as the
   stage's ``group`` says, keep the top-k (ties: lower index first) or those ≥ a threshold;
   pages expand to their valid tokens; the keep rules (sink, window) join the candidates;
2. **prune** — per pruner: estimated weights ``softmax(scale · q·K̃)`` over the candidates, with
   ``K̃`` the estimator's keys; top-p keeps the *minimal* set whose estimated mass (float64) is
   ≥ p of the candidates' mass (ties: lower index first), top-k the heaviest, threshold those
   ≥ a weight; the keep rules' tokens are always kept;
3. **attend** — exact softmax attention over full-precision K/V at the kept tokens.

There is no Python loop over requests, heads or tokens. Non-finite values follow the one
policy of ``twilight.runtime.serving.checks``: a query holding NaN or inf raises
``NonFiniteInputError`` (naming request and head), and the cache never holds one (``append``
refuses them), so no path here replaces NaN by anything. The one zero by design: a head whose
kept set is empty (``tw.nothing()`` with no keep rule) gives an exactly-zero output row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ...compiler import ir
from ...compiler.keycodes import KeyCodeSpec, dequantize_minmax, dequantize_token, unpack_codes
from ...compiler.passes import softmax_scale
from ...compiler.stages import mask_to_lists, v_sum_of
from ...compiler.torch_expr import evaluate
from ...compiler.verify import verify
from ...errors import InputError
from ..serving.checks import batch_ids, check_cache, check_query_finite
from ..serving.paged_cache import PagedKVCache


@dataclass
class Kept:
    """What one step kept, per request and query head."""

    mask: Tensor  # bool [B, Hq, T]
    candidates: Tensor  # bool [B, Hq, T]: after select + keep rules, before pruning
    est_mass: Tensor | None  # float32 [B, Hq]: first pruner's estimated mass of the kept set
    lengths: Tensor  # int64 [B]
    est_weights: Tensor | None = None  # float32 [B, Hq, T]: first pruner's estimate over cand.

    @property
    def count(self) -> Tensor:
        return self.mask.sum(-1)

    def indices(self) -> tuple[Tensor, Tensor]:
        """Ragged lists as ``(indices int64 [B, Hq, max_count] padded with -1, count [B, Hq])``,
        ascending within a row (the stage ABI's lists, in int64)."""
        idx, cnt = mask_to_lists(self.mask)
        return idx.long(), cnt.long()


class ReferenceExecutor:
    def __init__(self, pipeline):
        self.ir = ir.as_ir(pipeline)
        verify(self.ir)

    def run(self, q: Tensor, cache: PagedKVCache, req: int | Sequence[int] | None = None,
            return_kept: bool = False):
        """Attention output ``[B, Hq, D]`` (q's dtype) for queries ``q [B, Hq, D]`` of the
        requests ``req`` (default: all live ones, by id); with ``return_kept`` also a ``Kept``."""
        ids = batch_ids(cache, req)
        check_cache(self.ir, cache)
        q = self._check_query(q, cache, len(ids))
        check_query_finite(q, cache, ids)
        p, g = self.ir, q.shape[1] // cache.num_kv_heads
        verify(p, ir.Shape(q.shape[1], cache.num_kv_heads, cache.head_dim, cache.page_size))
        k, v, valid = cache.gather(ids)
        lengths = valid.sum(-1)
        qg = q.float().view(q.shape[0], cache.num_kv_heads, g, -1)  # [B, Hkv, G, D]
        scale = softmax_scale(p, cache.head_dim)

        keep = keep_mask(p.keep, valid, lengths)  # [B, T]
        cand = select_mask(p, qg, k, valid, cache, ids) | keep[:, None, None]
        first_w, kept = None, cand
        for pr in p.prune:
            w = estimate_weights(pr, qg, kept, cache, ids, k, scale, p.attend.softcap)
            first_w = w if first_w is None else first_w
            kept = prune_mask(pr, w, kept, lengths) | keep[:, None, None]

        out = attend_masked(qg, k.float(), v.float(), kept, scale, p.attend.softcap)
        if p.attend.mean_value:
            out = reallocate(p, qg, k, valid, cache, ids, kept, out)
        out = out.reshape(q.shape).to(q.dtype)
        if not return_kept:
            return out
        hq = q.shape[1]
        est = None if first_w is None else (first_w.double() * kept).sum(-1).float()
        return out, Kept(kept.reshape(q.shape[0], hq, -1), cand.reshape(q.shape[0], hq, -1),
                         None if est is None else est.reshape(q.shape[0], hq), lengths,
                         None if first_w is None else first_w.reshape(q.shape[0], hq, -1))

    @staticmethod
    def _check_query(q: Tensor, cache: PagedKVCache, batch: int) -> Tensor:
        if not isinstance(q, Tensor) or q.dim() != 3 or q.shape[0] != batch or not q.shape[1] \
                or q.shape[2] != cache.head_dim or q.shape[1] % cache.num_kv_heads:
            raise InputError(f"q: expected [batch={batch}, q_heads (a multiple of "
                             f"{cache.num_kv_heads}), head_dim={cache.head_dim}], got "
                             f"{tuple(getattr(q, 'shape', ()))}")
        if not q.is_floating_point():
            raise InputError(f"q: expected a floating dtype, got {q.dtype}")
        if q.device != cache.device:
            raise InputError(f"q: expected device {cache.device} (the cache's), got {q.device}")
        return q


def reference(pipeline) -> ReferenceExecutor:
    """The exact torch executor of ``pipeline`` (a ``tw.Pipeline`` or its IR)."""
    return ReferenceExecutor(pipeline)


# ---- stages -------------------------------------------------------------------------------------
def keep_mask(keep: ir.Keep, valid: Tensor, lengths: Tensor) -> Tensor:
    pos = torch.arange(valid.shape[-1], device=valid.device)
    return valid & ((pos < keep.sink) | (pos >= (lengths - keep.window)[:, None]))


def select_mask(p: ir.PipelineIR, qg: Tensor, k: Tensor, valid: Tensor, cache: PagedKVCache,
                ids: list[int]) -> Tensor:
    """Candidate mask ``[B, Hkv, G, T]``."""
    s = p.select
    b, hkv, g, _ = qg.shape
    if s is None:
        return valid[:, None, None].expand(b, hkv, g, -1)
    return _select(s, p, qg, k, valid, cache, ids).expand(b, hkv, g, -1) & valid[:, None, None]


def _select(s: ir.Select, p: ir.PipelineIR, qg: Tensor, k: Tensor, valid: Tensor,
            cache: PagedKVCache, ids: list[int]) -> Tensor:
    """One selector's (or a combination's) choice ``[B, Hkv, G or 1, T]``."""
    b, hkv, g, _ = qg.shape
    if s.rule == "none":
        return torch.zeros(b, hkv, 1, valid.shape[-1], dtype=torch.bool, device=valid.device)
    if s.parts:
        masks = [_select(x, p, qg, k, valid, cache, ids).expand(b, hkv, g, -1) for x in s.parts]
        out = masks[0]
        for m in masks[1:]:
            out = out | m if s.rule == "union" else out & m
        return out
    scores, units_valid, unit = select_scores(s, p, qg, k, valid, cache, ids)
    chosen = _decide(s.rule, s.group, scores, units_valid[:, None, None], s.budget,
                     s.threshold, unit, valid.sum(-1), s.p)
    if unit > 1:
        chosen = chosen.repeat_interleave(unit, -1)[..., :valid.shape[-1]]
    return chosen


def select_scores(s: ir.Select, p: ir.PipelineIR, qg: Tensor, k: Tensor, valid: Tensor,
                  cache: PagedKVCache, ids: list[int]) -> tuple[Tensor, Tensor, int]:
    """A scored selector's scores ``float32 [B, Hkv, G' (1 for group kv), N]`` (units: pages or
    tokens), which units are valid ``[B, N]``, and the unit's size in tokens."""
    b, hkv, g, _ = qg.shape
    sc = s.score
    qs = qg.mean(2, keepdim=True) if s.group == "kv" else qg
    lengths = valid.sum(-1)
    if sc.per == "token":
        units_valid, unit = valid, 1
        if sc.summary is not None:
            leaves = {f"summary.{f}": cache.gather_tokens(
                cache.token_summaries[f"{sc.summary.name}.{f}"], ids)[0].float()[:, :, None]
                for f in sc.summary.field_names()}
        else:
            keys = k.float() if s.estimator is None else \
                _estimated_keys(s.estimator, cache, ids, k)
            leaves = {"k": keys[:, :, None]}
    else:
        _, page_valid = cache.gather_pages(ids)
        units_valid, unit = page_valid > 0, cache.page_size
        leaves = {f"summary.{f}": cache.gather_paged(cache.summaries[f"{sc.summary.name}.{f}"],
                                                     ids).float()[:, :, None]
                  for f in sc.summary.field_names()}
    n = units_valid.shape[-1]
    leaves["q"] = qs[:, :, :, None]
    leaves["position"] = (torch.arange(n, device=qg.device, dtype=torch.float32)
                          * unit).view(1, 1, 1, n).expand(b, 1, 1, n)
    leaves["query_position"] = (lengths - 1).to(torch.float32).view(b, 1, 1, 1)
    scores = evaluate(sc.expr, leaves)  # [B, Hkv, G', N]
    return scores.expand(b, hkv, scores.shape[2], n), units_valid, unit


def _decide(rule: str, group: str, s: Tensor, ok: Tensor, budget: ir.Budget | None,
            thresh: float | None, unit: int, lengths: Tensor, p: float | None = None) -> Tensor:
    """Which units to keep from scores ``s [B, Hkv, G, N]`` (valid where ``ok``), merging the
    group as ``group`` says; returns ``[B, Hkv, G or 1, N]``."""
    s = merged_scores(group, s, ok)
    if rule == "top_k":
        tokens = torch.tensor([budget.tokens(int(n)) for n in lengths.tolist()],
                              device=s.device, dtype=torch.long)
        k = (tokens + unit - 1) // unit
        order = s.sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(
            s.shape[-1], device=s.device).expand_as(order))
        keep = rank < k.view(-1, 1, 1, 1)
    elif rule == "top_p":
        keep = top_p_mask(_softmax(s, ok & (s > -math.inf)), p)
    else:
        keep = s >= thresh
    keep = keep & ok
    return keep.any(2, keepdim=True) if group == "union" else keep


def merged_scores(group: str, s: Tensor, ok: Tensor) -> Tensor:
    """Scores with NaN and invalid units at -inf, the group merged (``mean``/``max``)."""
    s = torch.nan_to_num(s.float(), nan=-math.inf).masked_fill(~ok, -math.inf)
    if group == "mean":
        return s.mean(2, keepdim=True)
    if group == "max":
        return s.amax(2, keepdim=True)
    return s


def _estimated_keys(e: ir.Estimator, cache: PagedKVCache, ids: list[int], k: Tensor) -> Tensor:
    """What the estimate multiplies q with: exact keys, or the dequantized codes (times the
    smoothing factors, for smoothed codes) ``float32 [B, Hkv, T, D]``."""
    if e.kind == "exact":
        return k.float()
    spec = KeyCodeSpec.of(e)
    c = cache.key_codes[spec]
    if e.granularity == "token":
        packed, _ = cache.gather_tokens(c.packed, ids)
        sc, _ = cache.gather_tokens(c.scale, ids)
        zr, _ = cache.gather_tokens(c.zero, ids)
        kt = dequantize_token(packed, sc, zr, e.bits, cache.head_dim)
        return kt * c.smooth[None, :, None, :] if e.smooth else kt
    lo, hi = c.lo, c.hi
    if e.granularity == "group":  # every page reads the min/max at its group's first page
        pages, _ = cache.gather_pages(ids)  # [B, NP]
        lead = pages[:, torch.arange(pages.shape[1], device=pages.device) // e.group_pages
                     * e.group_pages]
        live = pages >= 0
        lo, hi = lo.clone(), hi.clone()
        lo[pages[live]], hi[pages[live]] = c.lo[lead[live]], c.hi[lead[live]]
    return cache.gather_tokens(dequantize_minmax(c.packed, lo, hi, e.bits, cache.head_dim),
                               ids)[0]


def _logits(qg: Tensor, k: Tensor, scale: float, softcap: float | None) -> Tensor:
    logits = torch.einsum("bhgd,bhtd->bhgt", qg, k) * scale
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def _softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over each row's masked-in entries; a row with nothing in it is exactly zero (the
    one zero by design); anything else non-finite stays visible (NaN), never zeroed."""
    w = torch.softmax(logits.masked_fill(~mask, -math.inf), -1)
    return w.masked_fill(~mask.any(-1, keepdim=True), 0.0)


def estimate_weights(pr: ir.Prune, qg: Tensor, cand: Tensor, cache: PagedKVCache, ids: list[int],
              k: Tensor, scale: float, softcap: float | None, query: str = "float32") -> Tensor:
    """Estimated attention weights ``[B, Hkv, G, T]`` over each head's candidates.

    ``query="int8"``: the schedule knob ``estimate_query`` of the TVM backend (quantized keys
    only): the query rounded to int8 as ``int8_query_logits`` says."""
    if query == "int8" and pr.estimator.kind == "quantized":
        def logits(qq):
            lg = int8_query_logits(pr.estimator, qq, cache, ids) * scale
            return softcap * torch.tanh(lg / softcap) if softcap else lg
    else:
        kt = _estimated_keys(pr.estimator, cache, ids, k)

        def logits(qq):
            return _logits(qq, kt, scale, softcap)
    if pr.group == "kv":  # one estimate per KV head, from the group's mean query
        w = _softmax(logits(qg.mean(2, keepdim=True)), cand.any(2, True))
        w = w.expand_as(cand) * cand  # heads may hold different candidates: renormalize each
        return w / w.sum(-1, keepdim=True).clamp(min=1e-30)
    return _softmax(logits(qg), cand)


INT8_MAX = 127
INT8_STEP_BITS = 6  # the int8 query's step: 2^(E - 6) for a largest magnitude in [2^E, 2^(E+1))
INT8_MIN_EXP = INT8_STEP_BITS + 1  # biased exponent: smaller maxima round the query to 0


def int8_query_logits(e: ir.Estimator, qg: Tensor, cache: PagedKVCache, ids: list[int]) -> Tensor:
    """``q·K̃`` ``float32 [B, Hkv, G, T]`` (before the softmax scale) with the query rounded to
    int8 against the codes, as the TVM estimate does with ``estimate_query="int8"``.

    The query's coefficients of the codes, ``qc`` (``q·scale`` of the token's side page for
    page/group codes; ``q`` times the smoothing factors for token codes), are rounded per head
    and side page (token codes: per head) with a power-of-two step: for ``max|qc|`` in
    ``[2^E, 2^(E+1))``, ``a = 2^(E-6)`` and ``qi = clamp(round(qc / a), ±127)`` (half to even;
    0 when ``max|qc| < 2^-120``), so every product is exact and the kernel's rounding is this
    one bit for bit. The logit is ``a · Σ qi·code`` plus
    the unrounded offset: ``Σ q·lo`` (page/group), or ``scale · a·Σ qi·code + zero · Σ qc``
    (token). The page step is ``(hi - lo) · f32(1/levels)``, as the kernel computes it."""
    spec = KeyCodeSpec.of(e)
    c = cache.key_codes[spec]
    d = cache.head_dim
    codes = unpack_codes(cache.gather_tokens(c.packed, ids)[0], e.bits, d).float()
    q = qg.float()

    def rounded(qc: Tensor) -> tuple[Tensor, Tensor]:
        amax = qc.abs().amax(-1, keepdim=True)
        _, ex = torch.frexp(amax)  # amax = m·2^ex, m in [0.5, 1): E = ex - 1
        live = amax >= 2.0 ** (INT8_MIN_EXP - 127)
        one = torch.ones_like(amax)
        a = torch.where(live, torch.ldexp(one, ex - 1 - INT8_STEP_BITS), 0 * one)
        inv = torch.where(live, torch.ldexp(one, INT8_STEP_BITS + 1 - ex), 0 * one)
        return a, torch.round(qc * inv).clamp(-INT8_MAX, INT8_MAX)

    if e.granularity == "token":
        if e.smooth:
            q = q * c.smooth[None, :, None, :]
        a, qi = rounded(q)  # [B, Hkv, G, 1], [B, Hkv, G, D]
        sc, _ = cache.gather_tokens(c.scale, ids)
        zr, _ = cache.gather_tokens(c.zero, ids)
        dot = a * torch.einsum("bhgd,bhtd->bhgt", qi, codes)
        return sc[:, :, None] * dot + zr[:, :, None] * q.sum(-1, keepdim=True)
    lo, hi = c.lo, c.hi
    if e.granularity == "group":
        pages, _ = cache.gather_pages(ids)
        lead = pages[:, torch.arange(pages.shape[1], device=pages.device) // e.group_pages
                     * e.group_pages]
        live = pages >= 0
        lo, hi = lo.clone(), hi.clone()
        lo[pages[live]], hi[pages[live]] = c.lo[lead[live]], c.hi[lead[live]]
    ps = cache.page_size

    def per_token(x: Tensor) -> Tensor:  # [CAP, Hkv, D] per page -> [B, Hkv, T, D]
        return cache.gather_tokens(x[:, :, None].expand(-1, -1, ps, -1).contiguous(), ids)[0]
    lo_t, hi_t = per_token(lo.float()), per_token(hi.float())
    step = (hi_t - lo_t) * torch.tensor(1 / ((1 << e.bits) - 1), dtype=torch.float32)
    a, qi = rounded(q[:, :, :, None] * step[:, :, None])  # [B, Hkv, G, T, 1 | D]
    dot = a[..., 0] * (qi * codes[:, :, None]).sum(-1)
    return dot + torch.einsum("bhgd,bhtd->bhgt", q, lo_t)


def prune_mask(pr: ir.Prune, w: Tensor, cand: Tensor, lengths: Tensor) -> Tensor:
    if pr.group == "mean":
        w = w.mean(2, keepdim=True)
    elif pr.group == "max":
        w = w.amax(2, keepdim=True)
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-30)
    if pr.rule == "top_p":
        keep = top_p_mask(w, pr.p)
    elif pr.rule == "top_k":
        keep = _decide("top_k", "none", w, w > 0, pr.budget, None, 1, lengths)
    else:
        keep = w >= pr.threshold
    if pr.group == "union":
        keep = keep.any(2, keepdim=True)
    return keep & cand


def top_p_mask(w: Tensor, p: float) -> Tensor:
    """The minimal set of each row of ``w`` whose mass is ≥ ``p`` of the row's total.

    Sums in float64; among equal weights the lower index is kept first. Zero weights are never
    kept (they add no mass); ``p >= 1`` keeps every positive weight, however small."""
    wd = w.double()
    sorted_w, order = wd.sort(dim=-1, descending=True, stable=True)
    cum = sorted_w.cumsum(-1)
    before = cum - sorted_w  # mass of the heavier ones
    # p = 1: a weight below the float64 resolution of the running sum still holds mass; and
    # the heaviest one is always needed (p · total may underflow to 0 on subnormal rows).
    first = torch.arange(wd.shape[-1], device=wd.device) == 0
    keep_sorted = ((before < p * cum[..., -1:]) | (p >= 1) | first) & (sorted_w > 0)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def mean_value_alpha(p: ir.PipelineIR, qg: Tensor, k: Tensor, valid: Tensor,
                     cache: PagedKVCache, ids: list[int], kept: Tensor) -> Tensor:
    """SparQ's ``α [B, Hkv, G]``: the mass of the attended tokens ``kept [B, Hkv, G, T]`` under
    ``softmax`` of the selector's (group-merged) scores over the whole context."""
    s = p.select
    scores, ok, _ = select_scores(s, p, qg, k, valid, cache, ids)
    ok = ok[:, None, None]
    merged = merged_scores(s.group, scores, ok)
    w = _softmax(merged, ok & (merged > -math.inf)).expand_as(kept)
    return (w * kept).sum(-1)


def mean_value(cache: PagedKVCache, ids: list[int]) -> Tensor:
    """``v̄ float32 [B, Hkv, D]``: the mean value of each request's context, from the running
    sum the cache keeps on append."""
    v_sum = v_sum_of(cache)
    idx = torch.tensor(ids, dtype=torch.long, device=v_sum.device)
    return v_sum[idx] / cache.lengths[idx].clamp(min=1).to(torch.float32)[:, None, None]


def reallocate(p: ir.PipelineIR, qg: Tensor, k: Tensor, valid: Tensor, cache: PagedKVCache,
               ids: list[int], kept: Tensor, out: Tensor) -> Tensor:
    """``α·out + (1 - α)·v̄`` (``attention(mean_value=True)``): the mass the selector left out
    goes to the mean value instead of vanishing."""
    alpha = mean_value_alpha(p, qg, k, valid, cache, ids, kept)[..., None]
    return alpha * out + (1 - alpha) * mean_value(cache, ids)[:, :, None]


def attend_masked(qg: Tensor, k: Tensor, v: Tensor, kept: Tensor, scale: float,
            softcap: float | None) -> Tensor:
    w = _softmax(_logits(qg, k, scale, softcap), kept)
    return torch.einsum("bhgt,bhtd->bhgd", w, v)
