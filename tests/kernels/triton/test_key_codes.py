"""Every quantized-key format on the Triton backend (interpreter): the append kernels against
``PagedKVCache``'s torch codes bit for bit, and the estimate kernel against the reference.

Formats: per token (plain and smoothed), per page (lo/hi shared with Quest's summary or the
cache's own ``key.min``/``key.max``), per group of 2 and 4 pages; edges: one token, one page,
partially filled last page and group, ragged batches, GQA, a ``kv`` group, all-equal keys.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import twilight as tw
from twilight.compiler import stages as S
from twilight.compiler.keycodes import KeyCodeSpec
from twilight.frontend import builtins as B
from twilight.runtime.evaluation import reference_stages as RS
from twilight.runtime.serving.pipeline_cache import make_cache

EXACT = {"top_p_strategy": "sort"}
FORMATS = {  # name: (bits, granularity, group pages, smooth)
    "token": (4, "token", None, False),
    "token_smooth": (4, "token", None, True),
    "page": (4, "page", None, False),
    "group2": (4, "group", 2, False),
    "group4": (4, "group", 4, False),
}


def _est(bits: int, gran: str, pages: int | None, smooth: bool):
    return tw.quantized_keys(bits, gran, pages=pages, smooth=smooth)


def _pipe(est, page_size: int = 4, group: str = "none", quest: bool = True, budget: int = 40):
    """A pipeline whose pruner reads ``est``: behind Quest (page lo/hi shared with its summary)
    or an oracle selector (the cache keeps its own key min/max)."""
    score = B.quest if quest else B.oracle
    return tw.Pipeline(select=tw.top_k(score, tw.tokens(budget), group=group),
                       prune=tw.top_p(0.9, estimate=est, group=group),
                       keep=tw.sink(1) | tw.window(2), page_size=page_size)


def _filled(pipe, hkv: int, d: int, lengths, dtype=torch.float32, seed: int = 0,
            const: float | None = None, decode: int = 1):
    """A cache for ``pipe``: each request prefilled alone, then ``decode`` batched one-token
    appends to all of them (ragged pages; the smoothing is fitted on the first prefill)."""
    gen = torch.Generator().manual_seed(seed)

    def keys(*shape):
        k = torch.full(shape, const) if const is not None else torch.randn(*shape, generator=gen)
        return k.to(dtype)

    cache = make_cache(pipe, hkv, d, dtype=dtype, initial_pages=2)
    ids = cache.add_requests(len(lengths))
    # uneven channels, so that smoothing matters
    scale = torch.linspace(0.2, 3.0, d) if const is None else torch.ones(d)
    for rid, n in zip(ids, lengths, strict=True):
        cache.append((keys(hkv, n, d).float() * scale).to(dtype), keys(hkv, n, d), rid)
    for _ in range(decode):
        cache.append(keys(len(ids), hkv, 1, d), keys(len(ids), hkv, 1, d), ids)
    return cache, ids


def _recode(comp, cache, ids, spec: KeyCodeSpec) -> None:
    """Wipe ``spec``'s codes and side data (not the smoothing factors) and rebuild them from
    the cached keys with the generated append kernels; assert they equal torch's."""
    codes = cache.key_codes[spec]
    pages, page_valid = cache.gather_pages(ids)
    pages = pages[page_valid > 0].flatten()
    side = codes.tensors()[:3]
    want = [t.clone() for t in side]
    for t in side:  # token codes: slots past the fill stay 0, as torch leaves them
        t.fill_(0 if spec.granularity == "token" else 3)
    if spec.granularity == "token":
        fill = cache.page_fill[pages]
        slot = torch.cat([torch.arange(int(n)) for n in fill])
        comp.refresh_tokens(cache, pages.repeat_interleave(fill), slot)
    elif spec.granularity == "page":
        comp.refresh_pages(cache, pages)
    else:
        lengths = cache.lengths[torch.tensor(ids)]
        gp = cache.group_pages(ids, [0] * len(ids), (lengths - 1).tolist(), spec.group_pages)
        comp.refresh_groups(cache, gp)
        lead = gp[:, 0]
        for got, w in zip(side[1:], want[1:], strict=True):  # lo/hi: at each group's first page
            assert torch.equal(got[lead], w[lead]), spec
    rows = [0, 1, 2] if spec.granularity != "group" else [0]
    for i in rows:
        assert torch.equal(side[i][pages], want[i][pages]), (spec, i)


def _check_estimate(pipe, comp, cache, q, atol=1e-6, rtol=1e-5):
    x = S.stage_inputs(q, cache)
    idx, cnt = comp.select(x)
    cand = RS.ref_select(pipe.ir, x)
    assert torch.equal(S.lists_to_mask(idx, cnt, x.max_len), cand)
    w = comp.estimate(0, x, idx, cnt)
    ref_w = RS.ref_estimate(pipe.ir, 0, x, cand)
    got = S.rows_to_dense(w, idx, cnt, x.max_len)
    torch.testing.assert_close(got, ref_w, atol=atol, rtol=rtol)
    return got


# ---- append kernels: bit for bit with the torch cache -------------------------------------------
@pytest.mark.parametrize("fmt,bits,dtype,quest", [
    ("token", 2, torch.bfloat16, True),
    ("token_smooth", 4, torch.float16, True),
    ("token_smooth", 8, torch.float32, False),
    ("page", 2, torch.float16, True),
    ("page", 8, torch.bfloat16, False),
    ("group2", 4, torch.float16, True),
    ("group4", 2, torch.float32, False),
    ("group4", 8, torch.bfloat16, True)])
def test_append_codes_match_cache(fmt, bits, dtype, quest, lower):
    """Ragged lengths with a partial last page and group, at an odd head_dim (padded bytes)."""
    _, gran, pages, smooth = FORMATS[fmt]
    est = _est(bits, gran, pages, smooth)
    pipe = _pipe(est, quest=quest)
    cache, ids = _filled(pipe, 2, 20, [37, 5, 1, 16], dtype=dtype, decode=2)
    comp = lower(pipe, 4, 2, 20, dtype, EXACT)
    _recode(comp, cache, ids, KeyCodeSpec.of(est))


def test_append_smoothing_set_by_user(lower):
    """Codes of keys divided by user factors (``set_smoothing``), not the fitted ones."""
    est = _est(4, "token", None, True)
    pipe = _pipe(est)
    cache, ids = _filled(pipe, 2, 16, [21, 9])
    spec = KeyCodeSpec.of(est)
    cache.set_smoothing(spec, torch.rand(2, 16, generator=torch.Generator().manual_seed(3)) + .01)
    _recode(lower(pipe, 2, 2, 16, schedule=EXACT), cache, ids, spec)


def test_fractional_smoothing_strength(lower):
    """``smooth=0.5``: the append kernel's name stays an identifier; codes and estimate agree."""
    est = tw.quantized_keys(4, smooth=0.5)
    pipe = _pipe(est)
    cache, ids = _filled(pipe, 2, 16, [21, 9])
    comp = lower(pipe, 4, 2, 16, schedule=EXACT)
    _recode(comp, cache, ids, KeyCodeSpec.of(est))
    x = S.stage_inputs(torch.randn(2, 4, 16), cache, ids)
    idx, cnt = comp.select(x)
    w = comp.estimate(0, x, idx, cnt)
    want = RS.ref_estimate(pipe.ir, 0, x, RS.ref_select(pipe.ir, x))
    torch.testing.assert_close(S.rows_to_dense(w, idx, cnt, x.max_len), want, atol=1e-5,
                               rtol=1e-4)


def test_append_all_equal_keys(lower):
    """Constant keys: every scale is 0, every code 0, nothing divides by zero."""
    ests = [_est(*FORMATS[f]) for f in ("token_smooth", "page", "group2")]
    pipe = tw.Pipeline(select=tw.top_k(B.quest, tw.tokens(8)),
                       prune=[tw.top_p(0.9, estimate=e) for e in ests], page_size=4)
    cache, ids = _filled(pipe, 1, 16, [11, 3], const=0.25)
    comp = lower(pipe, 2, 1, 16, schedule=EXACT)
    for e in ests:
        spec = KeyCodeSpec.of(e)
        _recode(comp, cache, ids, spec)
        assert not cache.key_codes[spec].packed.any()


def test_refresh_groups_checks_group_size(lower):
    pipe = _pipe(_est(4, "group", 2, False))
    comp = lower(pipe, 2, 2, 16, schedule=EXACT)
    cache, ids = _filled(pipe, 2, 16, [9])
    with pytest.raises(ValueError, match="group sizes"):
        comp.refresh_groups(cache, cache.group_pages(ids, [0], [8], 4))
    comp.refresh_groups(cache, torch.zeros(0, 2, dtype=torch.int64))  # nothing to do


def test_refresh_refuses_page_ids_outside_the_pool(lower):
    """An id past the pool (or a slot past the page) is one InputError before a kernel runs."""
    pipe = tw.Pipeline(select=tw.top_k(B.quest, tw.tokens(8)), page_size=4,
                       prune=[tw.top_p(0.9, estimate=_est(*FORMATS[f]))
                              for f in ("token", "group2")])
    comp = lower(pipe, 2, 2, 16, schedule=EXACT)
    cache, _ = _filled(pipe, 2, 16, [9])
    cap, i64 = cache.capacity_pages, dict(dtype=torch.int64)
    with pytest.raises(tw.InputError, match=rf"refresh_pages: page ids must be in \[0, {cap}\)"):
        comp.refresh_pages(cache, torch.tensor([0, cap], **i64))
    with pytest.raises(tw.InputError, match="refresh_tokens: slots must lie in"):
        comp.refresh_tokens(cache, torch.tensor([0], **i64), torch.tensor([-1], **i64))
    with pytest.raises(tw.InputError, match="refresh_groups: page ids must be -1"):
        comp.refresh_groups(cache, torch.tensor([[-2, 0]], **i64))


def test_one_kernel_per_format(lower):
    """Two pruners of the same bits and different formats get their own append kernels; two of
    the same format share one."""
    ests = [_est(4, "token", None, False), _est(4, "token", None, True),
            _est(4, "group", 2, False), _est(4, "group", 4, False), _est(4, "group", 2, False)]
    pipe = tw.Pipeline(select=tw.top_k(B.quest, tw.tokens(8)),
                       prune=[tw.top_p(0.9, estimate=e) for e in ests], page_size=4)
    names = {k for k in lower(pipe, 2, 1, 16, schedule=EXACT).specs if "codes" in k}
    assert names == {"append_codes_int4_token", "append_codes_int4_token_smooth",
                     "append_codes_int4_group2", "append_codes_int4_group4"}


# ---- estimate kernel vs the reference ------------------------------------------------------------
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("group", ["none", "kv"])
def test_estimate_formats(fmt, group, lower):
    """GQA (4 query heads on 2 KV heads), ragged lengths, partial last page/group, fp16."""
    est = _est(*FORMATS[fmt])
    pipe = _pipe(est, group=group)
    cache, ids = _filled(pipe, 2, 24, [41, 6, 1], dtype=torch.float16)
    comp = lower(pipe, 4, 2, 24, torch.float16, EXACT)
    q = torch.randn(3, 4, 24, generator=torch.Generator().manual_seed(5)).half()
    _check_estimate(pipe, comp, cache, q)


def test_estimate_all_equal_keys(lower):
    """Scale-0 codes dequantize to the keys exactly: every candidate weighs the same."""
    for fmt in ("token_smooth", "page", "group4"):
        pipe = _pipe(_est(*FORMATS[fmt]), budget=8)
        cache, _ = _filled(pipe, 1, 16, [13], const=-0.5)
        comp = lower(pipe, 2, 1, 16, schedule=EXACT)
        w = _check_estimate(pipe, comp, cache, torch.randn(1, 2, 16))
        live = w > 0
        assert torch.allclose(w[live], 1 / live.sum(-1, keepdim=True).expand_as(w)[live])


@pytest.mark.parametrize("lengths", [[1], [4], [4, 9, 1]])
def test_whole_pipeline_small_contexts(lengths, check_run):
    """One token, exactly one page, ragged: group, page and smoothed formats in one pipeline
    (each pruner reads its own format), kept sets equal to the reference."""
    pipe = tw.Pipeline(select=tw.top_k(B.quest, tw.tokens(64)),
                       prune=[tw.top_p(0.95, estimate=_est(2, "group", 2, False)),
                              tw.top_p(0.95, estimate=_est(8, "page", None, False)),
                              tw.top_p(0.95, estimate=_est(4, "token", None, True))],
                       page_size=4)
    check_run(pipe, 4, 2, 16, lengths, schedule=EXACT)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(fmt=st.sampled_from(sorted(FORMATS)), bits=st.sampled_from([2, 4, 8]),
       ratio=st.sampled_from([1, 2]), hkv=st.integers(1, 2), d=st.sampled_from([8, 20, 32]),
       page=st.sampled_from([1, 2, 8]), group=st.sampled_from(["none", "kv", "mean"]),
       lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 1000))
def test_random_formats(fmt, bits, ratio, hkv, d, page, group, lengths, dtype, seed, lower):
    _, gran, pages, smooth = FORMATS[fmt]
    est = _est(bits, gran, pages, smooth)
    pipe = _pipe(est, page_size=page, group=group, quest=seed % 2 == 0, budget=24)
    cache, ids = _filled(pipe, hkv, d, lengths, dtype=dtype, seed=seed)
    comp = lower(pipe, hkv * ratio, hkv, d, dtype, EXACT)
    q = torch.randn(len(ids), hkv * ratio, d, generator=torch.Generator().manual_seed(seed))
    _check_estimate(pipe, comp, cache, q.to(dtype))
    _recode(comp, cache, ids, KeyCodeSpec.of(est))
