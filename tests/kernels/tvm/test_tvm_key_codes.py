"""Every quantized-key format on the TVM backend (llvm): the estimate kernel against the torch
reference, and the append kernels against ``PagedKVCache``'s torch codes bit for bit.

Formats: per token (plain and smoothed), per page (lo/hi shared with Quest's summary or the
cache's own ``key.min``/``key.max``), per group of 2 and 4 pages; INT2/4/8; fp16, bf16, fp32
caches (each takes its own path from lo/hi to the query planes). Row layouts: a GQA group sharing
its candidates (one row per KV head), a ``kv`` group (the mean query) and one row per query head.
Edges: one token, one page, partial last page and group, ragged batches, empty candidate rows,
all-equal keys (scale 0).

Only the kernels a test calls are compiled (``compiled`` below, cached per pipeline and shape):
each pipeline holds one pruner per format, so one build serves every format.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import twilight as tw
from twilight.compiler import ir, stages
from twilight.compiler.backend import Target
from twilight.compiler.keycodes import KeyCodeSpec
from twilight.compiler.tvm.append import append_sources, gen_summaries
from twilight.compiler.tvm.build import build, has_vnni
from twilight.compiler.tvm.context import StageCtx
from twilight.compiler.tvm.dialect import Dialect
from twilight.compiler.tvm.estimate import gen_estimate
from twilight.compiler.tvm.pipeline import TVMCompiled
from twilight.runtime.evaluation import reference_stages as RS
from twilight.runtime.serving.pipeline_cache import make_cache
from twilight.schedules.tvm import TVM

LLVM = Target.parse("llvm")
FORMATS = {  # name: (granularity, group pages, smooth)
    "token": ("token", None, False),
    "token_smooth": ("token", None, True),
    "page": ("page", None, False),
    "group2": ("group", 2, False),
    "group4": ("group", 4, False),
}
ALL = tuple(FORMATS)
# where each head's rows come from: (selector group, pruner group)
MODES = {"shared": ("max", "max"), "kv": ("max", "kv"), "head": ("none", "none")}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def est(fmt: str, bits: int = 4) -> ir.Estimator:
    gran, pages, smooth = FORMATS[fmt]
    return tw.quantized_keys(bits, gran, pages=pages, smooth=smooth)


def pipeline(fmts=ALL, bits: int = 4, mode: str = "shared", page_size: int = 4,
             quest: bool = True) -> tw.Pipeline:
    """One pruner per format, behind Quest (page lo/hi shared with its summary) or an oracle
    selector (the cache keeps its own key min/max)."""
    sel, grp = MODES[mode]
    score = tw.builtins.quest if quest else tw.builtins.oracle
    return tw.Pipeline(select=tw.top_k(score, tw.tokens(40), group=sel),
                       prune=[tw.top_p(0.9, estimate=est(f, bits), group=grp) for f in fmts],
                       page_size=page_size)


@functools.cache
def compiled(fmts=ALL, bits: int = 4, mode: str = "shared", page_size: int = 4,
             quest: bool = True, hq: int = 8, hkv: int = 2, d: int = 32,
             dtype: str = "float16", append: bool = False,
             query: str = "float32") -> tuple[tw.Pipeline, TVMCompiled]:
    """The pipeline and a ``TVMCompiled`` holding only its estimate kernels, or (``append``)
    only its append kernels; ``query``: the schedule's ``estimate_query``."""
    pipe = pipeline(fmts, bits, mode, page_size, quest)
    ctx = StageCtx(pipe.ir, ir.Shape(hq, hkv, d, page_size, dtype),
                   TVM.complete({"top_p_strategy": "sort", "estimate_query": query}),
                   Dialect(vnni=has_vnni(LLVM)))
    if append:
        srcs = [gen_summaries(ctx, s) for s in pipe.ir.summaries()] + list(append_sources(ctx))
    else:
        srcs = [gen_estimate(ctx, i) for i in range(len(fmts))]
    return pipe, TVMCompiled(ctx, LLVM, {s.name: build(s, LLVM) for s in srcs})


def filled(pipe, hkv: int, d: int, lengths, dtype=torch.float16, seed: int = 0,
           const: float | None = None, decode: int = 2):
    """A cache for ``pipe``: each request prefilled alone (the first prefill fits the smoothing
    factors), then ``decode`` batched one-token appends (ragged pages and groups). Channels have
    uneven ranges, so that smoothing and per-channel codes matter."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.full(shape, const) if const is not None else torch.randn(*shape, generator=gen)

    cache = make_cache(pipe, hkv, d, dtype=dtype, initial_pages=2)
    ids = cache.add_requests(len(lengths))
    scale = torch.linspace(0.2, 3.0, d) if const is None else torch.ones(d)
    for rid, n in zip(ids, lengths, strict=True):
        cache.append((rand(hkv, n, d) * scale).to(dtype), rand(hkv, n, d).to(dtype), rid)
    for _ in range(decode):
        cache.append((rand(len(ids), hkv, 1, d) * scale).to(dtype),
                     rand(len(ids), hkv, 1, d).to(dtype), ids)
    return cache, ids


def candidates(cache, ids, hq: int, mode: str, density: float, seed: int) -> torch.Tensor:
    """A random candidate mask ``bool [B, Hq, T]`` over valid tokens; the heads of a GQA group
    share it unless ``mode == "head"``."""
    gen = torch.Generator().manual_seed(seed)
    _, _, valid = cache.gather(ids)
    hkv = cache.num_kv_heads
    heads = hq if mode == "head" else hkv
    m = torch.rand(len(ids), heads, valid.shape[1], generator=gen) < density
    if mode != "head":
        m = m.repeat_interleave(hq // hkv, 1)
    return m & valid[:, None]


def check_estimates(pipe, comp, cache, ids, q, cand, atol=2e-6, rtol=1e-4,
                    query: str = "float32") -> list:
    """Every pruner's estimate over the candidate lists of ``cand`` against the reference (of
    the query ``query``: ``estimate_query``)."""
    x, ref_x = comp.inputs(q, cache, ids), stages.stage_inputs(q, cache, ids)
    t = x.max_len
    idx, cnt = stages.mask_to_lists(cand, max(1, int(cand.sum(-1).max())))
    out = []
    for i, pr in enumerate(pipe.ir.prune):
        w = comp.estimate(i, x, idx, cnt)
        live = torch.arange(idx.shape[-1]) < cnt[..., None]
        assert not w[~live].any(), pr.estimator.name  # zero past each row's candidates
        got = stages.rows_to_dense(w, idx, cnt, t)
        want = RS.ref_estimate(pipe.ir, i, ref_x, cand, query)
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol,
                                   msg=lambda m, n=pr.estimator.name: f"{n}: {m}")
        out.append(got)
    return out


def query(ids, hq: int, d: int, dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(len(ids), hq, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- estimate kernel vs the reference ------------------------------------------------------------
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(mode=st.sampled_from(sorted(MODES)),
       lengths=st.lists(st.integers(1, 70), min_size=1, max_size=4),
       density=st.sampled_from([0.05, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_estimate_random_shapes(mode, lengths, density, seed):
    """Every format at INT4, fp16, 8 query heads on 2 KV heads, page size 4, ragged lengths."""
    pipe, comp = compiled(mode=mode)
    cache, ids = filled(pipe, 2, 32, lengths, seed=seed)
    q = query(ids, 8, 32, torch.float16, seed)
    check_estimates(pipe, comp, cache, ids, q, candidates(cache, ids, 8, mode, density, seed))


@pytest.mark.parametrize("dtype,bits,d,quest", [
    ("float16", 2, 18, True),  # padded last byte, D not a multiple of 4: a per-channel gather
    ("float16", 8, 40, False),
    ("bfloat16", 2, 32, False),  # 64-bit words of 4 bfloat16
    ("bfloat16", 4, 40, True),
    ("float32", 4, 32, True),  # 64-bit words of 2 float32
    ("float32", 2, 32, False),  # 4 float32 do not fit a word: a per-channel gather
])
def test_estimate_bits_and_dtypes(dtype, bits, d, quest):
    """Each cache dtype and code width reaches the query planes its own way (``estimate.py``:
    words of ``8/bits`` lo/hi values, or a per-channel gather); page lo/hi are Quest's summary
    or the cache's own."""
    pipe, comp = compiled(bits=bits, d=d, dtype=dtype, quest=quest, hq=4)
    cache, ids = filled(pipe, 2, d, [37, 5, 1, 16], dtype=DTYPES[dtype], seed=bits)
    q = query(ids, 4, d, DTYPES[dtype])
    check_estimates(pipe, comp, cache, ids, q, candidates(cache, ids, 4, "shared", 0.6, d))


@pytest.mark.parametrize("lengths", [[1], [4], [16], [1, 4, 17, 3]])
@pytest.mark.parametrize("mode", ["shared", "kv"])
def test_estimate_small_contexts(lengths, mode):
    """One token, exactly one page, exactly one group of 4 pages, ragged; every candidate."""
    pipe, comp = compiled(mode=mode)
    cache, ids = filled(pipe, 2, 32, lengths, decode=0)
    q = query(ids, 8, 32, torch.float16)
    check_estimates(pipe, comp, cache, ids, q, candidates(cache, ids, 8, mode, 1.0, 0))


def test_estimate_empty_rows_and_large_head_dim():
    """D = 128, page size 16 (the vectorized plane loops at full width), with rows that hold no
    candidate at all (all zero) next to full ones."""
    pipe, comp = compiled(page_size=16, d=128, hq=8)
    cache, ids = filled(pipe, 2, 128, [300, 1, 70])
    cand = candidates(cache, ids, 8, "shared", 0.7, 3)
    cand[1] = False
    cand[2, :4] = False
    ws = check_estimates(pipe, comp, cache, ids, query(ids, 8, 128, torch.float16), cand)
    for w in ws:
        assert not w[1].any() and not w[2, :4].any()


def test_estimate_all_equal_keys():
    """Constant keys: every scale is 0 and the codes dequantize to the keys exactly; every
    candidate of a row weighs the same."""
    pipe, comp = compiled()
    cache, ids = filled(pipe, 2, 32, [13, 40], const=-0.5)
    cand = candidates(cache, ids, 8, "shared", 0.5, 1)
    for w in check_estimates(pipe, comp, cache, ids, query(ids, 8, 32, torch.float16), cand):
        n = cand.sum(-1, keepdim=True)
        torch.testing.assert_close(w, cand / n.clamp(min=1), atol=1e-6, rtol=1e-5)


# ---- the int8 query (estimate_query="int8": integer dot products on AVX-512 VNNI) ----------------
needs_vnni = pytest.mark.skipif(not has_vnni(LLVM), reason="this CPU has no AVX-512 VNNI: the "
                                "int8 query path is not built for it (the float path serves)")


@needs_vnni
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int8_query_estimate_matches_its_reference(mode, bits):
    """Every format and row layout, tiles of 16 tokens (``vpdpbusd`` on 512 bits), candidates
    that form tiles and candidates that do not (the per-token path sees the same rounded
    query): the kernel against ``reference.int8_query_logits``."""
    pipe, comp = compiled(bits=bits, mode=mode, page_size=16, d=64, query="int8")
    assert "vpdpbusd.512" in comp.kernels["estimate0"].source.text
    cache, ids = filled(pipe, 2, 64, [300, 77, 16, 1], seed=bits)
    q = query(ids, 8, 64, torch.float16, seed=bits)
    for density in (1.0, 0.5):  # whole pages, then scattered tokens
        check_estimates(pipe, comp, cache, ids, q, candidates(cache, ids, 8, mode, density, 7),
                        query="int8")


@needs_vnni
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(dtype=st.sampled_from(sorted(DTYPES)), bits=st.sampled_from([2, 4, 8]),
       d=st.sampled_from([32, 64, 96, 128]),
       lengths=st.lists(st.integers(1, 90), min_size=1, max_size=3),
       density=st.sampled_from([0.3, 1.0]), seed=st.integers(0, 2**16))
def test_int8_query_random_shapes(dtype, bits, d, lengths, density, seed):
    """Page size 8 (``vpdpbusd`` on 256 bits), every cache dtype, head dims whose codes are
    whole 32-bit words, ragged lengths."""
    pipe, comp = compiled(bits=bits, page_size=8, d=d, dtype=dtype, hq=4, query="int8")
    cache, ids = filled(pipe, 2, d, lengths, dtype=DTYPES[dtype], seed=seed)
    q = query(ids, 4, d, DTYPES[dtype], seed)
    check_estimates(pipe, comp, cache, ids, q, candidates(cache, ids, 4, "shared", density, seed),
                    query="int8")


@needs_vnni
def test_int8_query_edges():
    """All-equal keys (every scale 0: the page planes are 0, nothing divides by their max), a
    zero query (``a = 0``), one token."""
    pipe, comp = compiled(page_size=16, d=64, query="int8")
    cache, ids = filled(pipe, 2, 64, [40, 1], const=-0.5)
    cand = candidates(cache, ids, 8, "shared", 1.0, 1)
    for w in check_estimates(pipe, comp, cache, ids, query(ids, 8, 64, torch.float16), cand,
                             query="int8"):
        torch.testing.assert_close(w, cand / cand.sum(-1, keepdim=True).clamp(min=1),
                                   atol=1e-6, rtol=1e-5)
    cache, ids = filled(pipe, 2, 64, [70, 1])
    zero = torch.zeros(len(ids), 8, 64, dtype=torch.float16)
    check_estimates(pipe, comp, cache, ids, zero, candidates(cache, ids, 8, "shared", 1.0, 2),
                    query="int8")


@needs_vnni
def test_int8_query_is_not_the_float_estimate():
    """The schedule takes the integer path: its estimate is the int8 reference's, which the
    float one is not (``test_reference`` bounds how far apart the two are)."""
    pipe, comp = compiled(fmts=("page", "token"), page_size=16, d=128, query="int8")
    _, flt = compiled(fmts=("page", "token"), page_size=16, d=128)
    cache, ids = filled(pipe, 2, 128, [512, 100])
    q = query(ids, 8, 128, torch.float16)
    cand = candidates(cache, ids, 8, "shared", 1.0, 0)
    got = check_estimates(pipe, comp, cache, ids, q, cand, query="int8")
    for g, w in zip(got, check_estimates(pipe, flt, cache, ids, q, cand), strict=True):
        assert not torch.equal(g, w)


# ---- append kernels: bit for bit with the torch cache -------------------------------------------
def recode(comp, cache, ids, spec: KeyCodeSpec) -> None:
    """Overwrite ``spec``'s codes and side data (not the smoothing factors) with junk, rebuild
    them with the append kernels, and assert they equal what torch computed."""
    codes = cache.key_codes[spec]
    pages, page_valid = cache.gather_pages(ids)
    pages = pages[page_valid > 0].flatten()
    side = codes.tensors()[:3]
    want = [t.clone() for t in side]
    for t in side:
        t.fill_(3)
    if spec.granularity == "token":
        fill = cache.page_fill[pages]
        slot = torch.cat([torch.arange(int(n)) for n in fill])
        phys = pages.repeat_interleave(fill)
        comp.refresh_tokens(cache, phys, slot)
        for got, w in zip(side, want, strict=True):
            assert torch.equal(got[phys, :, slot], w[phys, :, slot]), spec
        return
    if spec.granularity == "page":
        comp.refresh_pages(cache, pages)
        lead = pages
    else:
        lengths = cache.lengths[torch.tensor(ids)]
        gp = cache.group_pages(ids, [0] * len(ids), (lengths - 1).tolist(), spec.group_pages)
        comp.refresh_groups(cache, gp)
        lead = gp[:, 0]
    assert torch.equal(side[0][pages], want[0][pages]), spec  # codes, invalid slots 0
    for got, w in zip(side[1:], want[1:], strict=True):  # lo/hi: at each page / group's first
        assert torch.equal(got[lead], w[lead]), spec
        assert got.dtype == cache.dtype


@pytest.mark.parametrize("bits,dtype,quest", [
    (2, torch.bfloat16, True),
    (4, torch.float16, False),
    (8, torch.float32, True),
    (4, torch.bfloat16, False)])
def test_append_codes_match_cache(bits, dtype, quest):
    """Every format; ragged lengths with a partial last page and group, odd head_dim (padded
    bytes at 2 bits)."""
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
    pipe, comp = compiled(bits=bits, d=18, dtype=name[dtype], quest=quest, hq=2, append=True)
    cache, ids = filled(pipe, 2, 18, [37, 5, 1, 16], dtype=dtype)
    for f in ALL:
        recode(comp, cache, ids, KeyCodeSpec.of(est(f, bits)))


def test_append_smoothing_set_by_user():
    """Codes of keys divided by user factors (``set_smoothing``), not the fitted ones."""
    pipe, comp = compiled(fmts=("token_smooth",), hq=2, d=16, append=True)
    cache, ids = filled(pipe, 2, 16, [21, 9])
    spec = KeyCodeSpec.of(est("token_smooth"))
    cache.set_smoothing(spec, torch.rand(2, 16, generator=torch.Generator().manual_seed(3)) + .01)
    recode(comp, cache, ids, spec)


def test_append_all_equal_keys():
    """Constant keys: every scale is 0, every code 0, nothing divides by zero."""
    pipe, comp = compiled(fmts=("token_smooth", "page", "group2"), hq=2, d=16, append=True)
    cache, ids = filled(pipe, 2, 16, [11, 3], const=0.25)
    for f in ("token_smooth", "page", "group2"):
        spec = KeyCodeSpec.of(est(f))
        recode(comp, cache, ids, spec)
        assert not cache.gather_tokens(cache.key_codes[spec].packed, ids)[0].any()


def test_refresh_groups_checks_group_size():
    pipe, comp = compiled(fmts=("group2",), hq=2, d=16, append=True)
    cache, ids = filled(pipe, 2, 16, [9])
    with pytest.raises(ValueError, match="group sizes"):
        comp.refresh_groups(cache, cache.group_pages(ids, [0], [8], 4))
    comp.refresh_groups(cache, torch.zeros(0, 2, dtype=torch.int64))  # nothing to do


def test_refresh_refuses_page_ids_outside_the_pool():
    """An id past the pool (or a slot past the page) is one InputError, not a segfault."""
    pipe, comp = compiled(fmts=("token", "page", "group2"), hq=2, d=16, append=True)
    cache, ids = filled(pipe, 2, 16, [9])
    cap, i64 = cache.capacity_pages, dict(dtype=torch.int64)
    for pages in ([cap], [-1], [0, 10**9]):
        with pytest.raises(tw.InputError, match=rf"refresh_pages: page ids must be in \[0, {cap}\)"):
            comp.refresh_pages(cache, torch.tensor(pages, **i64))
    with pytest.raises(tw.InputError, match="refresh_tokens: page ids"):
        comp.refresh_tokens(cache, torch.tensor([cap], **i64), torch.tensor([0], **i64))
    with pytest.raises(tw.InputError, match="refresh_tokens: slots must lie in"):
        comp.refresh_tokens(cache, torch.tensor([0], **i64), torch.tensor([4], **i64))
    with pytest.raises(tw.InputError, match="refresh_groups: page ids must be -1"):
        comp.refresh_groups(cache, torch.tensor([[0, cap]], **i64))
    with pytest.raises(tw.InputError, match="integer tensor"):
        comp.refresh_pages(cache, torch.tensor([0.0]))
    comp.refresh_groups(cache, torch.tensor([[0, -1]], **i64))  # -1: a page not allocated yet


def test_one_append_kernel_per_format():
    """Formats of the same bits get their own append kernels; two pruners of one format share
    one."""
    pipe = pipeline(fmts=("token", "token_smooth", "group2", "group4", "group2", "page"))
    ctx = StageCtx(pipe.ir, ir.Shape(2, 1, 16, 4, "float16"), TVM.complete({}), Dialect())
    assert [s.name for s in append_sources(ctx)] == [
        "token_codes4", "token_codes4_smooth", "group_codes4_g2", "group_codes4_g4",
        "page_codes4"]
