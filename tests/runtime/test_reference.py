"""The torch reference executor: dense equivalence, input checks, selection semantics, and
agreement with deliberately naive loop implementations written here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import twilight as tw
from twilight.compiler.torch_expr import evaluate
from twilight.frontend.builtins import PIPELINES, quest

BIG = 10_000  # a budget above every context used here


# ---- user-defined selectors --------------------------------------------------------------------
@tw.page_summary
def kmean(k):
    return dict(kmean=tw.mean(k, axis=0))


@tw.score(per="page", summary=kmean)
def mean_key(q, page):
    return tw.dot(q, page.kmean)


@tw.score(per="token")
def qk(q, k):
    return tw.dot(q, k)


def _table(hkv: int, d: int) -> tuple[tuple[int, ...], ...]:
    """A per-KV-head channel table, a different subset for every head."""
    r = max(1, min(4, d // 2))
    return tuple(tuple(sorted((h + 2 * i) % d for i in range(r))) for h in range(hkv))


def _unbounded(name: str, ps: int, hkv: int, d: int) -> tw.Pipeline:
    """Every built-in with a budget above the context (and p = 1)."""
    b = tw.builtins
    return {
        "dense": lambda: b.dense(),
        "quest_top_k": lambda: b.quest_top_k(BIG, page_size=ps),
        "quest_twilight": lambda: b.quest_twilight(BIG, p=1.0, page_size=ps),
        "oracle_top_k": lambda: b.oracle_top_k(BIG),
        "streaming": lambda: b.streaming(sink_tokens=3, window_tokens=BIG),
        "double_sparsity": lambda: b.double_sparsity(channels=_table(hkv, d), budget=BIG),
        "ds_twilight": lambda: b.ds_twilight(channels=_table(hkv, d), budget=BIG, p=1.0),
        "sparq": lambda: b.sparq(r=min(4, d), budget=BIG),  # α = 1: nothing left for v̄
        "loki": lambda: b.loki(torch.randn(hkv, d, 2), budget=BIG),
        "user_mean_key": lambda: tw.Pipeline(select=tw.top_k(mean_key, tw.tokens(BIG)),
                                             prune=tw.top_p(1.0, estimate=tw.exact_keys()),
                                             page_size=ps),
    }[name]()


CONFIGS = [  # q_heads, kv_heads, head_dim, page_size, request lengths
    (1, 1, 8, 1, [1, 2, 3]),
    (4, 4, 16, 4, [1, 4, 5]),  # 1 token, exactly one page, a page + 1
    (8, 2, 32, 16, [16, 17, 1, 40]),
    (6, 3, 8, 2, [3, 1, 2]),
    (4, 1, 64, 8, [9, 8, 1]),
]


def test_every_builtin_is_covered() -> None:
    for name in PIPELINES:
        _unbounded(name, 16, 2, 16)


@pytest.mark.parametrize("name", [*PIPELINES, "user_mean_key"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "hq{}_hkv{}_d{}_ps{}_{}".format(*c))
def test_unbounded_budget_equals_dense(fill_cache, dense_attention, name, cfg) -> None:
    hq, hkv, d, ps, lengths = cfg
    pipe = _unbounded(name, ps, hkv, d)
    f = fill_cache(pipe, hkv, d, lengths)
    q = f.query(hq)
    out, kept = tw.reference(pipe).run(q, f.cache, return_kept=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), dense_attention(q, f.keys, f.values),
                               atol=1e-5, rtol=1e-5)
    valid = torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]
    assert torch.equal(kept.mask, valid[:, None].expand_as(kept.mask))


def test_scale_and_softcap(fill_cache, dense_attention) -> None:
    pipe = tw.Pipeline(attend=tw.attention(scale=0.7, softcap=2.5))
    f = fill_cache(pipe, 2, 16, [5, 19], scale=2.0)
    q = f.query(4, scale=2.0)
    torch.testing.assert_close(tw.reference(pipe).run(q, f.cache).double(),
                               dense_attention(q, f.keys, f.values, 0.7, 2.5),
                               atol=1e-5, rtol=1e-5)


def test_fp16_cache_runs_close_to_dense(fill_cache, dense_attention) -> None:
    pipe = tw.builtins.quest_twilight(BIG, p=1.0, page_size=4)
    f = fill_cache(pipe, 2, 16, [7, 12], dtype=torch.float16)
    q = f.query(4)
    out = tw.reference(pipe).run(q, f.cache)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), dense_attention(q, f.keys, f.values),
                               atol=2e-3, rtol=2e-3)


# ---- input checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_query_is_refused(fill_cache, bad: float) -> None:
    pipe = tw.builtins.quest_top_k(32, page_size=4)
    f = fill_cache(pipe, 2, 8, [5, 9])
    q = f.query(4)
    q[1, 3, 2] = bad
    with pytest.raises(tw.NonFiniteInputError):
        tw.reference(pipe).run(q, f.cache)


@pytest.mark.parametrize("shape", [(2, 8), (1, 4, 8), (3, 4, 8), (2, 4, 16), (2, 3, 8),
                                   (2, 4, 8, 1)])
def test_wrong_query_shape_names_q(fill_cache, shape) -> None:
    pipe = tw.builtins.oracle_top_k(4)
    f = fill_cache(pipe, 2, 8, [5, 9])
    with pytest.raises(tw.InputError, match=r"^q: ") as err:
        tw.reference(pipe).run(torch.zeros(shape), f.cache)
    assert not isinstance(err.value, tw.NonFiniteInputError)


def test_integer_query_is_refused(fill_cache) -> None:
    pipe = tw.builtins.dense()
    f = fill_cache(pipe, 1, 8, [3])
    with pytest.raises(tw.InputError, match="q"):
        tw.reference(pipe).run(torch.zeros(1, 1, 8, dtype=torch.int64), f.cache)


# ---- selection semantics -----------------------------------------------------------------------
def _scores(q: torch.Tensor, keys: list[torch.Tensor]) -> list[torch.Tensor]:
    """q·k of every query head and token, per request: ``[Hq, T]`` float64."""
    out = []
    for b, k in enumerate(keys):
        g = q.shape[1] // k.shape[0]
        out.append(torch.einsum("hd,htd->ht", q[b].double(),
                                k.double().repeat_interleave(g, 0)))
    return out


def _top(s: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest of a 1-d tensor, ties to the lower index."""
    order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
    keep = torch.zeros(len(s), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def _grid_query(b: int, hq: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (b, hq, d), generator=gen).float() / 4


@pytest.mark.parametrize("group", ["none", "max", "mean", "kv", "union"])
@pytest.mark.parametrize("budget", [1, 7, 16, 100])
def test_top_k_tokens_keeps_min_budget_length(fill_cache, group, budget) -> None:
    lengths = [1, 5, 16, 40]
    pipe = tw.Pipeline(select=tw.top_k(qk, tw.tokens(budget), group=group))
    f = fill_cache(pipe, 2, 8, lengths)
    _, kept = tw.reference(pipe).run(f.query(8), f.cache, return_kept=True)
    want = torch.tensor([min(budget, n) for n in lengths])[:, None].expand(-1, 8)
    if group == "union":  # each head keeps its own top-k; the group keeps the union
        assert (kept.count >= want).all() and (kept.count <= (4 * want).clamp(max=40)).all()
    else:
        assert torch.equal(kept.count, want)


@pytest.mark.parametrize("ps", [1, 4, 16])
@pytest.mark.parametrize("budget", [1, 4, 5, 13, 100])
def test_top_k_pages_keeps_ceil_budget_over_page_size(fill_cache, ps, budget) -> None:
    lengths = [1, ps, ps + 1, 3 * ps + 2]
    pipe = tw.builtins.quest_top_k(budget, page_size=ps)
    f = fill_cache(pipe, 2, 8, lengths)
    _, kept = tw.reference(pipe).run(f.query(4), f.cache, return_kept=True)
    for b, n in enumerate(lengths):
        pages = math.ceil(n / ps)
        m = torch.nn.functional.pad(kept.mask[b, :, :n], (0, pages * ps - n))
        m = m.view(4, pages, ps)
        valid = (torch.arange(pages * ps) < n).view(pages, ps)
        page_kept = m.any(-1)
        assert torch.equal(m, page_kept[..., None] & valid), "pages are kept whole"
        assert (page_kept.sum(-1) == min(math.ceil(budget / ps), pages)).all()
        assert not kept.mask[b, :, n:].any()


def test_threshold_selects_scores_at_or_above(fill_cache) -> None:
    pipe = tw.Pipeline(select=tw.threshold(qk, 1.0, group="none"))
    f = fill_cache(pipe, 2, 8, [6, 31], grid=True)
    q = _grid_query(2, 4, 8, seed=3)  # grid values: q·k is exact, so ≥ 1.0 is too
    _, kept = tw.reference(pipe).run(q, f.cache, return_kept=True)
    for b, s in enumerate(_scores(q, f.keys)):
        assert torch.equal(kept.mask[b, :, : s.shape[1]], s >= 1.0)
    assert (kept.mask.sum() > 0) and not kept.mask.all()


@pytest.mark.parametrize("prune", ["top_p", "top_k", "threshold"])
def test_sink_and_window_survive_pruning(fill_cache, prune) -> None:
    rule = {"top_p": tw.top_p(0.05, estimate=tw.exact_keys()),
            "top_k": tw.top_k(budget=tw.tokens(1), estimate=tw.exact_keys()),
            "threshold": tw.threshold(value=0.99, estimate=tw.exact_keys())}[prune]
    pipe = tw.Pipeline(select=tw.top_k(qk, tw.tokens(2)), prune=rule,
                       keep=tw.sink(2) | tw.window(3))
    lengths = [1, 3, 6, 20]
    f = fill_cache(pipe, 2, 8, lengths, scale=3.0)
    _, kept = tw.reference(pipe).run(f.query(4, scale=3.0), f.cache, return_kept=True)
    for b, n in enumerate(lengths):
        assert kept.mask[b, :, : min(2, n)].all()
        assert kept.mask[b, :, max(0, n - 3) : n].all()
        assert not kept.mask[b, :, n:].any()
        assert (kept.count[b] <= min(n, 2 + 3 + 1)).all()


@pytest.mark.parametrize("frac", [0.25, 0.5, 1.0])
def test_fraction_budget_is_per_request(fill_cache, frac) -> None:
    lengths = [1, 3, 4, 10, 33]
    pipe = tw.Pipeline(select=tw.top_k(qk, tw.fraction(frac)))
    f = fill_cache(pipe, 1, 8, lengths)
    _, kept = tw.reference(pipe).run(f.query(2), f.cache, return_kept=True)
    assert kept.count.tolist() == [[math.ceil(frac * n)] * 2 for n in lengths]


@pytest.mark.parametrize("frac", [0.25, 0.5, 1.0])
def test_fraction_budget_of_pages(fill_cache, frac) -> None:
    lengths, ps = [1, 3, 4, 10, 33], 4
    pipe = tw.Pipeline(select=tw.top_k(quest, tw.fraction(frac)), page_size=ps)
    f = fill_cache(pipe, 1, 8, lengths)
    _, kept = tw.reference(pipe).run(f.query(2), f.cache, return_kept=True)
    for b, n in enumerate(lengths):
        first_tokens = kept.mask[b, 0, : n : ps]  # one flag per page
        assert int(first_tokens.sum()) == math.ceil(math.ceil(frac * n) / ps)


def _group_pipe(group: str) -> tw.Pipeline:
    return tw.Pipeline(select=tw.top_k(qk, tw.tokens(5), group=group))


@pytest.mark.parametrize("group", ["none", "union", "max", "mean", "kv"])
def test_select_group_modes(fill_cache, group) -> None:
    g, hkv, lengths = 4, 2, [30, 17]
    f = fill_cache(_group_pipe(group), hkv, 8, lengths, grid=True, seed=1)
    q = _grid_query(len(lengths), g * hkv, 8, seed=2)
    _, kept = tw.reference(_group_pipe(group)).run(q, f.cache, return_kept=True)
    for b, s in enumerate(_scores(q, f.keys)):
        mask = kept.mask[b, :, : s.shape[1]].view(hkv, g, -1)
        s = s.view(hkv, g, -1)
        own = torch.stack([torch.stack([_top(s[h, i], 5) for i in range(g)]) for h in range(hkv)])
        if group == "none":
            assert torch.equal(mask, own)
        elif group == "union":
            assert torch.equal(mask, own.any(1, keepdim=True).expand_as(mask))
            assert (mask >= own).all()
        else:
            merged = {"max": s.amax(1), "mean": s.mean(1),
                      "kv": _scores(q.view(-1, hkv, g, 8).mean(2), f.keys)[b]}[group]
            want = torch.stack([_top(merged[h], 5) for h in range(hkv)])
            assert torch.equal(mask, want[:, None].expand_as(mask))


def test_group_none_lets_heads_of_a_group_differ(fill_cache) -> None:
    f = fill_cache(_group_pipe("none"), 2, 8, [30, 17], grid=True, seed=1)
    _, kept = tw.reference(_group_pipe("none")).run(_grid_query(2, 8, 8, 2), f.cache,
                                                    return_kept=True)
    by_group = kept.mask.view(2, 2, 4, -1)
    assert not (by_group == by_group[:, :, :1]).all(), "expected some head to decide alone"


@pytest.mark.parametrize("group", ["none", "union", "max", "mean", "kv"])
def test_prune_group_modes(fill_cache, group) -> None:
    def pipe(gr):
        return tw.Pipeline(select=tw.top_k(qk, tw.tokens(BIG)),
                           prune=tw.top_p(0.6, estimate=tw.exact_keys(), group=gr))
    f = fill_cache(pipe(group), 2, 8, [30, 17], scale=3.0)
    q = f.query(8, scale=3.0)
    kept = tw.reference(pipe(group)).run(q, f.cache, return_kept=True)[1].mask.view(2, 2, 4, -1)
    alone = tw.reference(pipe("none")).run(q, f.cache, return_kept=True)[1].mask.view(2, 2, 4, -1)
    shared = (kept == kept[:, :, :1]).all()
    if group == "none":
        assert not shared
    elif group == "union":
        assert torch.equal(kept, alone.any(2, keepdim=True).expand_as(kept))
    else:
        assert shared


def test_nothing_without_keep_gives_zero_output(fill_cache) -> None:
    pipe = tw.Pipeline(select=tw.nothing())
    f = fill_cache(pipe, 2, 8, [1, 9])
    out, kept = tw.reference(pipe).run(f.query(4), f.cache, return_kept=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert not kept.mask.any() and kept.est_mass is None
    idx, count = kept.indices()
    assert idx.shape == (2, 4, 0) and not count.any()


def test_nothing_with_keep_is_streaming(fill_cache, masked_attention) -> None:
    pipe = tw.Pipeline(select=tw.nothing(), keep=tw.sink(2) | tw.window(3))
    f = fill_cache(pipe, 1, 8, [1, 4, 12])
    q = f.query(2)
    out, kept = tw.reference(pipe).run(q, f.cache, return_kept=True)
    pos = torch.arange(12)
    n = torch.tensor([1, 4, 12])[:, None]
    want = ((pos < 2) | (pos >= n - 3)) & (pos < n)
    assert torch.equal(kept.mask, want[:, None].expand(-1, 2, -1))
    torch.testing.assert_close(out.double(), masked_attention(q, f.keys, f.values, kept.mask))


def test_kept_indices_match_mask(fill_cache) -> None:
    pipe = tw.builtins.quest_twilight(24, p=0.7, page_size=4)
    f = fill_cache(pipe, 2, 16, [1, 8, 40], scale=3.0)
    _, kept = tw.reference(pipe).run(f.query(4, scale=3.0), f.cache, return_kept=True)
    idx, count = kept.indices()
    assert torch.equal(count, kept.mask.sum(-1)) and idx.shape[-1] == int(count.max())
    for b in range(3):
        for h in range(4):
            row = idx[b, h]
            n = int(count[b, h])
            assert torch.equal(row[:n], kept.mask[b, h].nonzero().flatten())
            assert (row[n:] == -1).all()


def test_request_subset_and_order(fill_cache) -> None:
    pipe = tw.builtins.oracle_top_k(3)
    f = fill_cache(pipe, 1, 8, [5, 9, 2])
    q = f.query(3)
    full = tw.reference(pipe).run(q, f.cache)
    part = tw.reference(pipe).run(q[[2, 0]], f.cache, req=[2, 0])
    torch.testing.assert_close(part, full[[2, 0]])


# ---- Quest's bound -----------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), hkv=st.integers(1, 3), g=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([1, 3, 8, 32]), ps=st.sampled_from([1, 2, 4, 16]),
       lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       magnitude=st.sampled_from([1e-3, 1.0, 1e3]))
def test_quest_score_bounds_every_key_of_its_page(fill_cache, seed, hkv, g, d, ps, lengths,
                                                  magnitude) -> None:
    pipe = tw.builtins.quest_top_k(16, page_size=ps)
    f = fill_cache(pipe, hkv, d, lengths, seed=seed, scale=magnitude)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(lengths), hkv, g, d, generator=gen) * magnitude
    summ = {f"summary.{n}": f.cache.gather_paged(f.cache.summaries[f"minmax.{n}"]).float()
            for n in ("kmin", "kmax")}
    leaves = {"q": q[:, :, :, None], **{n: t[:, :, None] for n, t in summ.items()}}
    page_score = evaluate(quest.ir.expr, leaves)  # [B, Hkv, G, NP]
    for b, k in enumerate(f.keys):
        n = k.shape[1]
        qk_ = torch.einsum("hgd,htd->hgt", q[b], k)
        bound = torch.einsum("hgd,htd->hgt", q[b].abs(), k.abs())  # float rounding scale
        per_token = page_score[b][..., torch.arange(n) // ps]
        assert (per_token >= qk_ - 1e-5 * bound - 1e-30).all()


# ---- agreement with naive loop implementations ---------------------------------------------------
def _naive_select(q, keys, budget: int, ps: int, page_score) -> torch.Tensor:
    """Top ceil(budget/ps) units per KV head by the group's max score; loops everywhere."""
    b_, hq, _ = q.shape
    mask = torch.zeros(b_, hq, max(k.shape[1] for k in keys), dtype=torch.bool)
    for b, k in enumerate(keys):
        hkv, n, _ = k.shape
        g = hq // hkv
        for kvh in range(hkv):
            pages = [k[kvh, j : j + ps].double() for j in range(0, n, ps)]
            qg = q[b, kvh * g : (kvh + 1) * g].double()  # the group's query heads
            s = torch.tensor([float(page_score(qg, pg).max()) for pg in pages])
            for j in _top(s, math.ceil(budget / ps)).nonzero().flatten().tolist():
                mask[b, kvh * g : (kvh + 1) * g, j * ps : min((j + 1) * ps, n)] = True
    return mask


def _naive_quest(qg, page):
    """Per query head: Σ_i max(q_i·min_t k_ti, q_i·max_t k_ti)."""
    return torch.maximum(qg * page.min(0).values, qg * page.max(0).values).sum(-1)


def _naive_oracle(qg, page):  # ps = 1: the page is one key
    return qg @ page[0]


def _naive_top_p(q, keys, cand: torch.Tensor, p: float) -> torch.Tensor:
    """Each query head's minimal mass-p set over its candidates; the group keeps the union."""
    kept = torch.zeros_like(cand)
    for b, k in enumerate(keys):
        hkv, n, d = k.shape
        g = q.shape[1] // hkv
        for h in range(q.shape[1]):
            idx = cand[b, h, :n].nonzero().flatten().tolist()
            w = torch.softmax(torch.stack([k[h // g, t].double() @ q[b, h].double()
                                           for t in idx]) / math.sqrt(d), 0).tolist()
            mass, own = 0.0, []
            for i in sorted(range(len(idx)), key=lambda i: (-w[i], i)):
                if mass >= p * sum(w):
                    break
                mass += w[i]
                own.append(idx[i])
            start = h // g * g
            kept[b, start : start + g, own] = True
    return kept


naive_shapes = dict(seed=st.integers(0, 2**31 - 1), hkv=st.integers(1, 2),
                    g=st.sampled_from([1, 2, 4]), d=st.sampled_from([4, 8, 16]),
                    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3),
                    budget=st.integers(1, 48))


@settings(max_examples=30, deadline=None)
@given(**naive_shapes)
def test_oracle_top_k_matches_naive(fill_cache, masked_attention, seed, hkv, g, d, lengths,
                                    budget) -> None:
    pipe = tw.builtins.oracle_top_k(budget)
    f = fill_cache(pipe, hkv, d, lengths, seed=seed, grid=True)
    q = _grid_query(len(lengths), hkv * g, d, seed + 1)
    out, kept = tw.reference(pipe).run(q, f.cache, return_kept=True)
    want = _naive_select(q, f.keys, budget, 1, _naive_oracle)
    assert torch.equal(kept.mask, want)
    torch.testing.assert_close(out.double(), masked_attention(q, f.keys, f.values, want),
                               atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(ps=st.sampled_from([1, 2, 4, 8]), **naive_shapes)
def test_quest_top_k_matches_naive(fill_cache, masked_attention, seed, hkv, g, d, lengths,
                                   budget, ps) -> None:
    pipe = tw.builtins.quest_top_k(budget, page_size=ps)
    f = fill_cache(pipe, hkv, d, lengths, seed=seed, grid=True)
    q = _grid_query(len(lengths), hkv * g, d, seed + 1)
    out, kept = tw.reference(pipe).run(q, f.cache, return_kept=True)
    want = _naive_select(q, f.keys, budget, ps, _naive_quest)
    assert torch.equal(kept.mask, want)
    torch.testing.assert_close(out.double(), masked_attention(q, f.keys, f.values, want),
                               atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(ps=st.sampled_from([1, 2, 4, 8]), p=st.sampled_from([0.37, 0.61, 0.83, 0.97]),
       **naive_shapes)
def test_quest_twilight_exact_keys_matches_naive(fill_cache, masked_attention, seed, hkv, g, d,
                                                 lengths, budget, ps, p) -> None:
    pipe = tw.Pipeline(select=tw.top_k(quest, tw.tokens(budget)),
                       prune=tw.top_p(p, estimate=tw.exact_keys()), page_size=ps)
    f = fill_cache(pipe, hkv, d, lengths, seed=seed, grid=True)
    q = _grid_query(len(lengths), hkv * g, d, seed + 1)
    out, kept = tw.reference(pipe).run(q, f.cache, return_kept=True)
    cand = _naive_select(q, f.keys, budget, ps, _naive_quest)
    assert torch.equal(kept.candidates, cand)
    want = _naive_top_p(q, f.keys, cand, p)
    assert torch.equal(kept.mask, want)
    torch.testing.assert_close(out.double(), masked_attention(q, f.keys, f.values, want),
                               atol=1e-5, rtol=1e-5)


# ---- the int8 query of the TVM estimate (estimate_query="int8") --------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity,smooth", [("token", False), ("token", True), ("page", False)])
def test_int8_query_logits_stay_within_the_rounding_of_the_query(granularity, smooth, bits):
    """``reference.int8_query_logits`` against the float ``q·K̃`` of the same codes: each logit
    moves by at most ``a·Σ code`` (``a ≤ max|qc|/64``, the int8 step, ``qc`` the query's
    coefficients of the codes), and on average by much less (rounding to nearest, not down)."""
    from twilight.compiler.keycodes import KeyCodeSpec, unpack_codes
    from twilight.runtime.evaluation import reference as R
    from twilight.runtime.serving.pipeline_cache import make_cache
    e = tw.quantized_keys(bits, granularity, smooth=smooth)
    pipe = tw.Pipeline(select=tw.top_k(quest, tw.tokens(64)), prune=tw.top_p(0.9, estimate=e),
                       page_size=16)
    gen = torch.Generator().manual_seed(bits)
    hkv, g, d = 2, 3, 64
    cache = make_cache(pipe, hkv, d, dtype=torch.float16, initial_pages=16)
    ids = cache.add_requests(2)
    scale = torch.linspace(0.2, 3.0, d)
    for rid, n in zip(ids, (150, 37), strict=True):
        cache.append((torch.randn(hkv, n, d, generator=gen) * scale).half(),
                     torch.randn(hkv, n, d, generator=gen).half(), rid)
    q = torch.randn(2, hkv, g, d, generator=gen).half().float()
    k, _, valid = cache.gather(ids)
    kt = R._estimated_keys(e, cache, ids, k)
    want = torch.einsum("bhgd,bhtd->bhgt", q, kt)
    got = R.int8_query_logits(e, q, cache, ids)
    c = cache.key_codes[KeyCodeSpec.of(e)]
    codes = unpack_codes(cache.gather_tokens(c.packed, ids)[0], bits, d).float()
    if granularity == "token":  # qc = q (times the smoothing factors); the token's scale after
        amax = (q * c.smooth[None, :, None] if smooth else q).abs().amax(-1)[..., None]
        step = cache.gather_tokens(c.scale, ids)[0][:, :, None]
        bound = amax / 64 * step * codes.sum(-1)[:, :, None]
    else:
        lo_hi = [cache.gather_tokens(x[:, :, None].expand(-1, -1, 16, -1).contiguous(), ids)[0]
                 .float() for x in (c.lo, c.hi)]
        qc = q[:, :, :, None] * ((lo_hi[1] - lo_hi[0]) / (2 ** bits - 1))[:, :, None]
        bound = qc.abs().amax(-1) / 64 * codes.sum(-1)[:, :, None]
    live = valid[:, None, None].expand_as(got)
    err = (got - want).abs()[live]
    b = bound[live] * (1 + 1e-4) + 1e-4 * want.abs()[live] + 1e-5
    assert (err <= b).all(), (err - b).max()
    assert err.mean() < bound[live].mean() / 4
    assert err.max() > 0  # the query was rounded
