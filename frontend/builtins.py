"""The built-in selectors and pipelines, written in the DSL itself.

Selectors: ``quest`` (page min/max bound), ``double_sparsity`` (channel subsets, calibrated
offline), ``oracle`` (exact q·k), streaming (sink + window), dense, ``sparq`` (the query's
largest channels, chosen per step; SparQ Attention) and ``loki`` (keys projected on their
principal components, calibrated offline; Loki). Pipelines are factories with the published
defaults; ``PIPELINES`` maps the names the CLI accepts to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..compiler import ir
from ..errors import ChannelIndexError, InputError, NonFiniteInputError
from . import ops as tw
from .dsl import (
    Pipeline,
    ScoreDef,
    attention,
    fraction,
    nothing,
    page_summary,
    quantized_keys,
    score,
    sink,
    token_summary,
    tokens,
    top_k,
    top_p,
    window,
)
from .location import user_location


@page_summary
def minmax(k):
    """Quest's page summary: per-channel min and max of the page's keys."""
    return dict(kmin=tw.min(k, axis=0), kmax=tw.max(k, axis=0))


@score(per="page", summary=minmax)
def quest(q, page):
    """Quest's page score: Σ_i max(q_i·M_i, q_i·m_i), an upper bound of q·k over the page."""
    return tw.sum(tw.maximum(q * page.kmin, q * page.kmax))


@score(per="token")
def oracle(q, k):
    """Exact q·k: the quality ceiling of any top-k selector."""
    return tw.dot(q, k)


def double_sparsity_score(channels) -> ScoreDef:
    """Double Sparsity's token score over calibrated channels: a list shared by all KV heads or
    a table with one list per KV head (see ``calibrate_channels``)."""
    @score(per="token", name="double_sparsity")
    def double_sparsity(q, k):
        return tw.dot(q[channels], k[channels])
    return double_sparsity


def calibrate_channels(q: torch.Tensor, k: torch.Tensor, r: int = 16,
                       mode: str = "qk") -> tuple[tuple[int, ...], ...]:
    """Rank channels per KV head on sample queries ``q [N, Hq, D]`` and keys ``k [Hkv, T, D]``
    and return the top ``r`` of each head, ascending (Double Sparsity's offline calibration).

    ``mode``: ``"qk"`` ranks by mean |q_c·k_c| over all (query, key) pairs of the head's group,
    which factorizes as mean|q_c| · mean|k_c|; ``"q"`` by mean |q_c|; ``"k"`` by mean |k_c|."""
    if mode not in ("qk", "q", "k"):
        raise InputError(f"calibrate_channels: mode={mode!r}: use 'qk', 'q' or 'k'")
    ok = isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 3 \
        and k.dim() == 3 and q.shape[0] and k.shape[0] and k.shape[1] and q.is_floating_point()
    if not ok or q.shape[1] % k.shape[0] or q.shape[-1] != k.shape[-1] \
            or not _whole(r) or not 0 < r <= k.shape[-1]:
        raise InputError(f"calibrate_channels: q {tuple(getattr(q, 'shape', ()))}, k "
                         f"{tuple(getattr(k, 'shape', ()))}, r={r!r}: expected float q [N, Hq, "
                         "D], k [Hkv, T, D] (none empty), Hq a multiple of Hkv, 0 < r ≤ D")
    if not (torch.isfinite(q).all() and torch.isfinite(k).all()):
        raise NonFiniteInputError("calibrate_channels: the sample q or k holds NaN or inf")
    hq, hkv, d = q.shape[1], k.shape[0], k.shape[-1]
    qa = q.float().abs().mean(0).view(hkv, hq // hkv, d).mean(1)  # [Hkv, D]
    ka = k.float().abs().mean(1)  # [Hkv, D]
    weight = {"qk": qa * ka, "q": qa, "k": ka}[mode]
    top = weight.topk(r, dim=-1).indices.sort(dim=-1).values
    return tuple(tuple(int(c) for c in row) for row in top.tolist())


@dataclass(frozen=True)
class Calibrated:
    """A pipeline that needs calibration data first: ``make(q, k) -> Pipeline`` with sample
    queries ``[N, Hq, D]`` and keys ``[Hkv, T, D]`` of the layer it will serve."""

    name: str
    make: Callable[[torch.Tensor, torch.Tensor], Pipeline]


# ---- pipelines ---------------------------------------------------------------------------------
def dense() -> Pipeline:
    """Every token: the baseline every other pipeline is measured against."""
    return Pipeline(name="dense")


def quest_top_k(budget: int = 1024, page_size: int = 16, sink_tokens: int = 0,
                window_tokens: int = 0) -> Pipeline:
    """Quest: the top ceil(budget/page_size) pages by the min/max bound."""
    return Pipeline(select=top_k(quest, tokens(budget)), page_size=page_size,
                    keep=sink(sink_tokens) | window(window_tokens), name="quest_top_k")


def quest_twilight(budget: int = 8192, p: float = 0.9, bits: int = 4,
                   granularity: str = "page", page_size: int = 16, sink_tokens: int = 0,
                   window_tokens: int = 0, group_pages: int = 4,
                   smooth: bool = False) -> Pipeline:
    """Quest with a conservative budget, then Twilight's top-p over low-bit key estimates.

    The estimate defaults to INT4 per channel within a page, with Quest's page min/max as zero
    point and scale (so it costs only the packed codes beyond what Quest keeps): unlike the
    published per-token codes (``granularity="token"``) it survives outlier key channels
    (ALGORITHMS.md, "Where the published estimator breaks"). ``granularity="group"`` shares
    the min/max over ``group_pages`` pages; ``smooth`` smooths per-token codes; ``twilightc
    calibrate`` weighs every choice for a model.
    ``sink_tokens``/``window_tokens`` always keep the first/last tokens: not in the published
    algorithms (so 0 by default), but on SmolLM2 at 8k, Quest's page bound often ranks the
    attention-sink page out of a 1024-token budget (see ``twilightc eval``)."""
    return Pipeline(select=top_k(quest, tokens(budget)),
                    prune=top_p(p, estimate=_estimator(bits, granularity, group_pages, smooth)),
                    page_size=page_size, keep=sink(sink_tokens) | window(window_tokens),
                    name="quest_twilight")


def _estimator(bits: int, granularity: str, group_pages: int, smooth: bool):
    pages = group_pages if granularity == "group" else None
    return quantized_keys(bits, granularity, pages=pages, smooth=smooth)


def oracle_top_k(budget: int = 1024) -> Pipeline:
    """The exact top-k tokens by q·k (quality ceiling of top-k)."""
    return Pipeline(select=top_k(oracle, tokens(budget)), name="oracle_top_k")


def streaming(sink_tokens: int = 4, window_tokens: int = 1020) -> Pipeline:
    """StreamingLLM: the first ``sink_tokens`` and the last ``window_tokens`` tokens."""
    return Pipeline(select=nothing(), keep=sink(sink_tokens) | window(window_tokens),
                    name="streaming")


def double_sparsity(channels=None, budget: int = 1024, r: int = 16):
    """Double Sparsity top-k; without ``channels`` it returns a ``Calibrated`` pipeline."""
    _check_r(r)
    if channels is None:
        return Calibrated("double_sparsity", lambda q, k: double_sparsity(
            calibrate_channels(q, k, r), budget))
    return Pipeline(select=top_k(double_sparsity_score(channels), tokens(budget)),
                    name="double_sparsity")


def ds_twilight(channels=None, budget: int = 8192, p: float = 0.9, bits: int = 4, r: int = 16,
                granularity: str = "group", group_pages: int = 4, smooth: bool = False):
    """Double Sparsity with a conservative budget, then top-p over low-bit key estimates.

    Double Sparsity keeps no page min/max to share, so the estimate defaults to INT4 per
    channel within a group of 4 pages: robust to outlier key channels like the page variant,
    with a quarter of its side data."""
    _check_r(r)
    if channels is None:
        return Calibrated("ds_twilight", lambda q, k: ds_twilight(
            calibrate_channels(q, k, r), budget, p, bits, r, granularity, group_pages, smooth))
    return Pipeline(select=top_k(double_sparsity_score(channels), tokens(budget)),
                    prune=top_p(p, estimate=_estimator(bits, granularity, group_pages, smooth)),
                    name="ds_twilight")


def _budget(budget: int | None, frac: float):
    """``tokens(budget)`` when given, else ``fraction(frac)`` of each context."""
    return tokens(budget) if budget is not None else fraction(frac)


def sparq_score(r: int = 16) -> ScoreDef:
    """SparQ's approximate logit of each token: ``q[i₁]·k[i₁] / τ`` over the ``r`` channels
    ``i₁`` of largest ``|q|`` (chosen per head and step), ``τ = sqrt(d · ‖q[i₁]‖₁ / ‖q‖₁)``;
    its softmax is SparQ's ``ŝ``."""
    @score(per="token", name="sparq")
    def sparq(q, k):
        i1 = tw.top_channels(q, r)
        tau = tw.sqrt(tw.head_dim() * tw.sum(tw.abs(q[i1])) / tw.sum(tw.abs(q)))
        return tw.dot(q[i1], k) / tau
    return sparq


def sparq(r: int = 16, budget: int | None = None, frac: float = 0.125,
          mean_value: bool = True, sink_tokens: int = 0, window_tokens: int = 0) -> Pipeline:
    """SparQ Attention (Ribar et al., 2024): per query head and step, the ``r`` channels of
    largest ``|q|`` score every token (``sparq_score``); the top ``budget`` tokens (default
    ``frac`` = 1/8 of the context) are attended exactly, and with ``mean_value`` the mass
    ``1 - α`` that ``softmax(ŝ)`` puts outside them goes to the context's mean value:
    ``y = α·attn + (1 - α)·mean(V)``. Published: ``r`` = d/8 … d/4, 1/8 of the context."""
    return Pipeline(select=top_k(sparq_score(r), _budget(budget, frac), group="none"),
                    attend=attention(mean_value=mean_value),
                    keep=sink(sink_tokens) | window(window_tokens), name="sparq")


def calibrate_projection(k: torch.Tensor, d_f: int = 16) -> torch.Tensor:
    """Loki's offline calibration: per KV head, the principal axes of sample keys
    ``k [Hkv, T, D]`` (eigenvectors of their covariance, by decreasing variance), the first
    ``d_f`` of them: ``P float32 [Hkv, D, d_f]``, orthonormal columns."""
    hkv, t, d = k.shape
    if not 0 < d_f <= d or t < 2:
        raise ValueError(f"calibrate_projection: k {tuple(k.shape)}, d_f={d_f}: expected keys "
                         "[Hkv, T ≥ 2, D] and 0 < d_f ≤ D")
    x = k.double() - k.double().mean(1, keepdim=True)
    cov = x.transpose(1, 2) @ x / (t - 1)  # [Hkv, D, D]
    vals, vecs = torch.linalg.eigh(cov)  # ascending
    order = vals.argsort(dim=-1, descending=True)[:, None, :d_f].expand(hkv, d, d_f)
    return torch.gather(vecs, -1, order).float().contiguous()


def loki_score(projection) -> ScoreDef:
    """Loki's approximate score: ``(q P)·(k P)`` over the ``d_f`` leading principal axes
    ``P [D, d_f]`` or ``[Hkv, D, d_f]``; ``k P`` is kept per token by the cache (on append)."""
    @token_summary(name="loki_keys")
    def loki_keys(k):
        return dict(kp=k @ projection)

    @score(per="token", summary=loki_keys, name="loki")
    def loki(q, tok):
        return tw.dot(q @ projection, tok.kp)
    return loki


def loki(projection=None, d_f: int = 16, budget: int | None = None, frac: float = 0.25,
         sink_tokens: int = 0, window_tokens: int = 0):
    """Loki (Singhania et al., 2024): keys scored in their principal-component space, the top
    ``budget`` tokens (default ``frac`` = 1/4 of the context) attended exactly with the full
    keys. ``projection``: ``[Hkv, D, d_f]`` (``calibrate_projection``); without it a
    ``Calibrated`` pipeline that fits it on a layer's sample keys. Published: ``d_f`` ≈ d/4,
    12.5–25% of the tokens."""
    if projection is None:
        return Calibrated("loki", lambda q, k: loki(calibrate_projection(k, d_f), d_f, budget,
                                                    frac, sink_tokens, window_tokens))
    return Pipeline(select=top_k(loki_score(projection), _budget(budget, frac), group="none"),
                    keep=sink(sink_tokens) | window(window_tokens), name="loki")


def _whole(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool)


def _check_r(r) -> None:
    """Double Sparsity's channel count, checked where it is written (calibration runs later)."""
    if not _whole(r) or not 1 <= r <= ir.MAX_HEAD_DIM:
        raise ChannelIndexError(f"r={r!r}: Double Sparsity keeps r channels of each key; use a "
                                f"whole number from 1 to head_dim", user_location())


PIPELINES: dict[str, Callable] = {
    f.__name__: f for f in (dense, quest_top_k, quest_twilight, oracle_top_k, streaming,
                            double_sparsity, ds_twilight, sparq, loki)
}
