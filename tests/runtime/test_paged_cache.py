from __future__ import annotations

import doctest
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twilight.compiler import keycodes as quant
from twilight.compiler.keycodes import KeyCodeSpec, quantize_page, quantize_token
from twilight.errors import InputError, NonFiniteInputError
from twilight.runtime.serving import paged_cache
from twilight.runtime.serving.paged_cache import PagedKVCache

INF = float("inf")


def _kmin(k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return k.masked_fill(~valid[:, None, :, None], INF).amin(2)


def _kmax(k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return k.masked_fill(~valid[:, None, :, None], -INF).amax(2)


def _kmean(k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    w = valid[:, None, :, None].float()
    return (k * w).sum(2) / w.sum(2).clamp(min=1)


def _first3(k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:  # a channel subset, C != D
    return _kmax(k[..., :3], valid)


SUMMARIES = {"min": _kmin, "max": _kmax, "mean": _kmean, "first3": _first3}
SPECS = [KeyCodeSpec(b, g) for b in (2, 4, 8) for g in ("token", "page")] + [
    KeyCodeSpec(4, "group", 2), KeyCodeSpec(2, "group", 4)]


def _cache(hkv: int, d: int, ps: int, dtype=torch.float32, initial_pages: int = 4,
           per_token: bool = False):
    """A cache keeping every summary and code format; ``per_token`` adds token summaries (a
    projection, a channel subset) and the running V sum."""
    toks = {"proj": lambda k: k @ torch.linspace(-1, 1, d * 2).view(d, 2),
            "first2": lambda k: k[..., :2]} if per_token else None
    return PagedKVCache(
        hkv,
        d,
        page_size=ps,
        dtype=dtype,
        summaries=SUMMARIES,
        key_codes=SPECS,
        initial_pages=initial_pages,
        token_summaries=toks,
        track_v_sum=per_token,
    )


def _seq(hkv: int, t: int, d: int, dtype=torch.float32, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(hkv, t, d) * scale).to(dtype)


def _snapshot(cache: PagedKVCache, ids: list[int]) -> dict[str, torch.Tensor]:
    """Everything the cache holds for ``ids``, independent of physical page order."""
    k, v, valid = cache.gather(ids)
    out = {"k": k, "v": v, "valid": valid}
    out |= {f"s:{n}": cache.gather_paged(t, ids) for n, t in cache.summaries.items()}
    out |= {f"t:{n}": cache.gather_tokens(t, ids)[0] for n, t in cache.token_summaries.items()}
    if cache.v_sum is not None:
        out["v_sum"] = cache.v_sum[ids]
    for spec, codes in cache.key_codes.items():
        out[f"{spec.name}:packed"] = cache.gather_tokens(codes.packed, ids)[0]
        if spec.granularity == "token":
            for field in ("scale", "zero"):
                out[f"{spec.name}:{field}"] = cache.gather_tokens(getattr(codes, field), ids)[0]
            continue
        for field in ("lo", "hi"):  # a group's min/max live at its first page only
            got = cache.gather_paged(getattr(codes, field), ids)
            out[f"{spec.name}:{field}"] = got[:, :, :: spec.group_pages]
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def test_doctests() -> None:
    assert doctest.testmod(paged_cache).failed == 0


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_chunking_matches_one_shot(data: st.DataObject) -> None:
    ps = data.draw(st.sampled_from([1, 4, 16]), "page_size")
    hkv, d = data.draw(st.integers(1, 3), "hkv"), data.draw(st.sampled_from([5, 16]), "d")
    lengths = data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=4), "lengths")
    seqs = [(_seq(hkv, t, d), _seq(hkv, t, d)) for t in lengths]

    whole = _cache(hkv, d, ps)
    ids = whole.add_requests(len(seqs))
    for rid, (k, v) in zip(ids, seqs, strict=True):
        whole.append(k, v, rid)

    chunked = _cache(hkv, d, ps, initial_pages=1)
    cids = chunked.add_requests(len(seqs))
    done = [0] * len(seqs)
    while any(done[i] < lengths[i] for i in range(len(seqs))):
        open_ = [i for i in range(len(seqs)) if done[i] < lengths[i]]
        group = data.draw(st.lists(st.sampled_from(open_), min_size=1, unique=True), "group")
        n = data.draw(st.integers(1, min(lengths[i] - done[i] for i in group)), "n")
        ks = torch.stack([seqs[i][0][:, done[i] : done[i] + n] for i in group])
        vs = torch.stack([seqs[i][1][:, done[i] : done[i] + n] for i in group])
        if len(group) == 1 and data.draw(st.booleans(), "unbatched"):
            chunked.append(ks[0], vs[0], cids[group[0]])
        else:
            chunked.append(ks, vs, [cids[i] for i in group])
        for i in group:
            done[i] += n
    _assert_same(_snapshot(whole, ids), _snapshot(chunked, cids))


def _check_against_direct(cache: PagedKVCache, rid: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Gathered K/V, summaries and codes of ``rid`` equal a direct computation over ``k``."""
    hkv, t, d = k.shape
    ps, dtype = cache.page_size, cache.dtype
    gk, gv, valid = cache.gather(rid)
    assert gk.dtype == dtype and torch.equal(gk[0, :, :t], k) and torch.equal(gv[0, :, :t], v)
    assert valid[0].sum() == t
    np_ = math.ceil(t / ps)
    pad = np_ * ps - t
    pages = torch.cat([k.float(), k.new_zeros(hkv, pad, d).float()], 1).view(hkv, np_, ps, d)
    pages = pages.transpose(0, 1)  # [NP, Hkv, ps, D]
    pvalid = (torch.arange(np_ * ps) < t).view(np_, ps)
    for name, fn in SUMMARIES.items():
        want = fn(pages, pvalid).to(dtype).transpose(0, 1)
        assert torch.equal(cache.gather_paged(cache.summaries[name], rid)[0, :, :np_], want), name
    for spec, codes in cache.key_codes.items():
        packed = cache.gather_tokens(codes.packed, rid)[0][0, :, :t]
        if spec.granularity == "token":
            want = quantize_token(k, spec.bits)
            assert torch.equal(packed, want[0])
            assert torch.equal(cache.gather_tokens(codes.scale, rid)[0][0, :, :t], want[1])
        else:
            g = spec.group_pages
            ng = math.ceil(np_ / g)
            gpages = torch.cat([pages, pages.new_zeros(ng * g - np_, *pages.shape[1:])])
            gpages = gpages.view(ng, g, hkv, ps, d).transpose(1, 2).reshape(ng, hkv, g * ps, d)
            gvalid = (torch.arange(ng * g * ps) < t).view(ng, g * ps)
            wp, lo, hi = quantize_page(gpages, gvalid[:, None, :], spec.bits)
            wp = wp.view(ng, hkv, g, ps, -1).transpose(1, 2).reshape(ng * g, hkv, ps, -1)
            assert torch.equal(packed, wp.transpose(0, 1).reshape(hkv, -1, wp.shape[-1])[:, :t])
            for got, want in ((codes.lo, lo), (codes.hi, hi)):
                got = cache.gather_paged(got, rid)[0, :, :np_:g]
                assert torch.equal(got, want.to(dtype).transpose(0, 1)), spec.name


SHAPES = list(itertools.product([1, 16, 64], [64, 128, 96, 7]))
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("ps,d", SHAPES)
def test_matches_direct_computation(ps: int, d: int) -> None:
    i = SHAPES.index((ps, d))
    hkv, dtype = 1 + i % 8, DTYPES[i % 3]
    cache = _cache(hkv, d, ps, dtype=dtype, initial_pages=2)
    seqs = {}
    for t in (1, ps + 3, 2 * ps, 37):
        rid = cache.add_request()
        k, v = seqs[rid] = (_seq(hkv, t, d, dtype), _seq(hkv, t, d, dtype))
        if t < 3:
            cache.append(k, v, rid)
            continue
        cache.append(k[:, : t - 2], v[:, : t - 2], rid)  # a prefill chunk, then decode tokens
        for j in (t - 2, t - 1):
            cache.append(k[:, j : j + 1], v[:, j : j + 1], rid)
    for rid, (k, v) in seqs.items():
        _check_against_direct(cache, rid, k, v)


@pytest.mark.parametrize("hkv", range(1, 9))
def test_gqa_heads_and_batched_decode(hkv: int) -> None:
    cache = _cache(hkv, 8, 4, dtype=torch.float16)
    ids = cache.add_requests(3)
    seqs = [_seq(hkv, 6, 8, torch.float16) for _ in ids]
    for j in range(6):
        step = torch.stack([s[:, j : j + 1] for s in seqs])
        cache.append(step, step, ids)
    for rid, s in zip(ids, seqs, strict=True):
        _check_against_direct(cache, rid, s, s)


def test_free_reuses_pages_and_ids() -> None:
    cache = _cache(2, 8, 4, initial_pages=4)
    a, b = cache.add_requests(2)
    cache.append(_seq(2, 8, 8), _seq(2, 8, 8), a)
    cache.append(_seq(2, 8, 8), _seq(2, 8, 8), b)
    assert cache.capacity_pages == 4 and cache.num_requests == 2
    cache.free_request(a)
    assert cache.num_requests == 1 and cache.request_ids == [b]
    with pytest.raises(ValueError, match="unknown request id 0"):
        cache.gather(a)
    c = cache.add_request()
    assert c == a and int(cache.lengths[c]) == 0
    k, v = _seq(2, 7, 8), _seq(2, 7, 8)
    cache.append(k, v, c)
    assert cache.capacity_pages == 4  # the freed pages were reused
    _check_against_direct(cache, c, k, v)


def test_growth_beyond_initial_pages() -> None:
    cache = _cache(3, 16, 4, initial_pages=1)
    before = cache.memory_bytes()
    ids = cache.add_requests(3)
    seqs = [_seq(3, t, 16) for t in (1, 30, 9)]
    for rid, k in zip(ids, seqs, strict=True):
        cache.append(k, k, rid)
    assert cache.capacity_pages >= 1 + 8 + 3
    after = cache.memory_bytes()
    assert after["k_pages"] == cache.capacity_pages * 3 * 4 * 16 * 4
    assert after["total"] == sum(v for n, v in after.items() if n != "total") > before["total"]
    assert {"summary:min", "key_codes:int4_page", "summary:key.min"} <= after.keys()
    # the page format's min/max are the cache's key.min/key.max summaries: counted once
    assert after["key_codes:int4_page"] == cache.key_codes[KeyCodeSpec(4, "page")].packed.numel()
    for rid, k in zip(ids, seqs, strict=True):
        _check_against_direct(cache, rid, k, k)
    pages, page_valid = cache.gather_pages(ids)
    assert pages.shape == (3, 8) and page_valid.sum(1).tolist() == [1, 30, 9]
    assert (pages[0, 1:] == -1).all() and len(set(pages[pages >= 0].tolist())) == 12


def test_empty_requests_and_empty_append() -> None:
    cache = _cache(2, 8, 4)
    a = cache.add_request()
    cache.append(_seq(2, 0, 8), _seq(2, 0, 8), a)
    k, v, valid = cache.gather()
    assert k.shape == (1, 2, 0, 8) and valid.shape == (1, 0)
    assert cache.gather([])[0].shape == (0, 2, 0, 8)


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), INF, -INF])
def test_non_finite_keys_and_values_are_refused_and_nothing_is_stored(which, bad) -> None:
    cache = _cache(2, 4, 4)
    a, b = cache.add_requests(2)
    cache.append(_seq(2, 3, 4), _seq(2, 3, 4), a)
    before = (cache.lengths.clone(), cache.k_pages.clone(), cache.v_pages.clone())
    k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    (k if which == "k" else v)[0, 1, 2, 3] = bad  # request a, KV head 1, its 3rd new token
    kind = "NaN" if bad != bad else "inf"
    with pytest.raises(NonFiniteInputError, match=rf"^{which}: request {a}, KV head 1, token "
                       rf"position 5 holds {kind};"):
        cache.append(k, v, [a, b])
    after = (cache.lengths, cache.k_pages, cache.v_pages)
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    with pytest.raises(NonFiniteInputError, match=rf"request {b}, KV head 0, token position 0"):
        cache.append(torch.full((2, 1, 4), bad), torch.full((2, 1, 4), bad), b)


def test_error_messages() -> None:
    cache = PagedKVCache(3, 64, dtype=torch.float16)
    r = cache.add_request()
    good = torch.zeros(3, 5, 64, dtype=torch.float16)
    with pytest.raises(
        ValueError,
        match=r"k: expected shape \[num_kv_heads=3, n, head_dim=64\]"
        r" or \[B, 3, n, 64\].*got \(3, 5, 32\)",
    ):
        cache.append(torch.zeros(3, 5, 32, dtype=torch.float16), good, r)
    with pytest.raises(ValueError, match=r"v: expected shape .*got \(2, 5, 64\)"):
        cache.append(good, torch.zeros(2, 5, 64, dtype=torch.float16), r)
    with pytest.raises(ValueError, match=r"k: expected shape \[B=1, 3, n, 64\]"):
        cache.append(good[None].expand(2, -1, -1, -1), good[None], [r])
    with pytest.raises(ValueError, match=r"k: expected dtype torch.float16.*got torch.float32"):
        cache.append(good.float(), good, r)
    with pytest.raises(ValueError, match="unknown request id 7"):
        cache.append(good, good, 7)
    with pytest.raises(ValueError, match="distinct"):
        cache.append(good[None].expand(2, -1, -1, -1), good[None].expand(2, -1, -1, -1), [r, r])
    with pytest.raises(ValueError, match="power of two"):
        PagedKVCache(1, 8, page_size=12)
    with pytest.raises(ValueError, match="dtype"):
        PagedKVCache(1, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"summary 'bad'"):
        PagedKVCache(2, 8, summaries={"bad": lambda k, valid: k.amin(2).amin(1)})


def test_page_codes_share_a_named_min_max_summary() -> None:
    spec = KeyCodeSpec(4, "page")
    cache = PagedKVCache(2, 8, page_size=4, summaries=SUMMARIES, key_codes=[spec],
                         initial_pages=1, minmax_summaries=("min", "max"), dtype=torch.float32)
    assert "key.min" not in cache.summaries
    k = _seq(2, 23, 8)
    cache.append(k, k, cache.add_request())  # grows: the link must follow the new tensors
    codes = cache.key_codes[spec]
    assert codes.lo is cache.summaries["min"] and codes.hi is cache.summaries["max"]
    _check_against_direct(cache, 0, k, k)
    with pytest.raises(ValueError, match="no summary named 'nope'"):
        PagedKVCache(2, 8, summaries=SUMMARIES, key_codes=[spec], minmax_summaries=("min", "nope"))


def test_smoothed_codes_fit_on_first_append_and_can_be_set() -> None:
    spec = KeyCodeSpec(4, "token", smooth=True)
    cache = PagedKVCache(2, 8, page_size=4, key_codes=[spec], dtype=torch.float32)
    a, b = cache.add_requests(2)
    k = _seq(2, 10, 8)
    k[:, :, 3] *= 30  # an outlier channel
    cache.append(k, k, a)
    codes = cache.key_codes[spec]
    assert torch.equal(codes.smooth, quant.fit_smoothing(k))
    k2 = _seq(2, 5, 8)
    cache.append(k2, k2, b)  # later appends reuse the factors
    assert torch.equal(codes.smooth, quant.fit_smoothing(k))
    want = quantize_token(k2 / codes.smooth[:, None, :], 4)
    assert torch.equal(cache.gather_tokens(codes.packed, b)[0][0], want[0])
    assert torch.equal(cache.gather_tokens(codes.scale, b)[0][0], want[1])
    assert codes.tensors()[-1] is codes.smooth
    new = torch.full((2, 8), 2.0)
    cache.set_smoothing(spec, new)  # re-encodes what is stored
    assert torch.equal(cache.gather_tokens(codes.packed, a)[0][0], quantize_token(k / 2, 4)[0])
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(InputError, match="positive finite values of shape"):
            cache.set_smoothing(spec, torch.full((2, 8), bad))
    with pytest.raises(InputError, match="no smoothed format"):
        cache.set_smoothing(KeyCodeSpec(4), new)


def test_copy_request_is_independent_and_exact() -> None:
    """A copied request holds what its source holds (every page and token summary, code format
    and the running V sum); appending to the copy and the source keeps both equal to caches
    built by appending those tokens."""
    cache = _cache(2, 16, 4, initial_pages=2, per_token=True)
    src = cache.add_request()
    first = _seq(2, 13, 16)
    cache.append(first, first, src)
    dup = cache.copy_request(src)  # forces growth: 2 initial pages, 4 + 4 needed
    _assert_same(_snapshot(cache, [src]), _snapshot(cache, [dup]))
    a, b = _seq(2, 6, 16), _seq(2, 3, 16)
    cache.append(a, a, src)
    cache.append(b, b, dup)
    for rid, extra in ((src, a), (dup, b)):
        fresh = _cache(2, 16, 4, per_token=True)
        r = fresh.add_request()
        fresh.append(first, first, r)  # the same chunks: V's running sum is exact
        fresh.append(extra, extra, r)
        _assert_same(_snapshot(cache, [rid]), _snapshot(fresh, [r]))
    cache.free_request(src)
    assert cache.gather(dup)[2].sum() == 16
