"""The DSL's score math, channel choices, projections, positions and rule algebra: what each
builds in the IR, and what the reference does with it, checked against direct torch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import twilight as tw
from twilight.compiler import ir
from twilight.compiler.torch_expr import top_channels
from twilight.runtime.evaluation.reference import _estimated_keys as estimated_keys
from twilight.runtime.serving.pipeline_cache import make_cache

ROOT = Path(__file__).resolve().parents[2]


def _cache(pipe, hkv=2, d=16, lengths=(40, 23), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache(pipe, hkv, d, dtype=dtype, initial_pages=2)
    ids = cache.add_requests(len(lengths))
    keys = []
    for rid, n in zip(ids, lengths, strict=True):
        k, v = torch.randn(hkv, n, d, generator=gen), torch.randn(hkv, n, d, generator=gen)
        cache.append(k.to(dtype), v.to(dtype), rid)
        keys.append(k.to(dtype).float())
    return cache, keys


def _q(b=2, hq=4, d=16, seed=1):
    return torch.randn(b, hq, d, generator=torch.Generator().manual_seed(seed))


@tw.score(per="token")
def oracle(q, k):
    return tw.dot(q, k)


# ---- the IR of the new constructs -------------------------------------------------------------
def test_integer_powers_are_products_and_others_pow() -> None:
    def key(f):
        return tw.score(per="token")(f).ir.expr.key()
    assert key(lambda q, k: tw.sum(q ** 2)) == key(lambda q, k: tw.sum(q * q))
    assert key(lambda q, k: tw.sum(k ** 3)) == key(lambda q, k: tw.sum(k * (k * k)))
    assert key(lambda q, k: tw.sum(k ** -1)) == key(lambda q, k: tw.sum(1.0 / k))
    assert key(lambda q, k: tw.sum(k ** 0.5)) == key(lambda q, k: tw.sum(tw.sqrt(k)))
    ops = {n.op for n in tw.score(per="token")(lambda q, k: tw.sum(tw.abs(k) ** 1.5)).ir.expr.walk()}
    assert "pow" in ops


def test_slices_are_channel_lists() -> None:
    a = tw.score(per="token")(lambda q, k: tw.dot(q[0:8], k[0:8])).ir.expr.key()
    b = tw.score(per="token")(lambda q, k: tw.dot(q[list(range(8))], k[list(range(8))])).ir
    assert a == b.expr.key()
    c = tw.score(per="token")(lambda q, k: tw.dot(q[2:12:3], k[[2, 5, 8, 11]])).ir.expr
    assert {n.attr("channels") for n in c.walk() if n.op == "take"} == {(2, 5, 8, 11)}


def test_a_full_vector_meets_a_subset_at_its_channels() -> None:
    sub = tw.score(per="token")(lambda q, k: tw.dot(q[[1, 4, 9]], k)).ir.expr.key()
    both = tw.score(per="token")(lambda q, k: tw.dot(q[[1, 4, 9]], k[[1, 4, 9]])).ir.expr.key()
    assert sub == both

    @tw.page_summary
    def part(k):
        return dict(top=tw.max(k[:, [0, 2]], axis=0))

    s = tw.score(per="page", summary=part)(lambda q, page: tw.dot(q, page.top)).ir.expr
    assert any(n.op == "take" and n.attr("channels") == (0, 2) for n in s.walk())


def test_query_channels_index_the_keys() -> None:
    s = tw.score(per="token")(lambda q, k: tw.dot(q[tw.top_channels(q, 4)], k)).ir.expr
    gathers = [n for n in s.walk() if n.op == "gather"]
    assert len(gathers) == 2 and all(g.inputs[1].op == "top_channels" for g in gathers)
    assert gathers[0].inputs[1] is gathers[1].inputs[1] or gathers[0].inputs[1] == gathers[1].inputs[1]


def test_top_channels_ranks_magnitude_ties_to_the_lower_channel() -> None:
    x = torch.tensor([[0.5, -3.0, 1.0, 3.0, -1.0, 0.0]])
    assert top_channels(x, 3).tolist() == [[1, 2, 3]]  # |−3| = |3| first, then 1.0 before −1.0
    assert top_channels(x, 1).tolist() == [[1]]


def test_new_fields_keep_the_keys_of_the_shipped_tuning_logs() -> None:
    """IR fields added later are left out of the key at their defaults: every shipped CPU
    tuning log still names the key of its built-in's defaults."""
    b = tw.builtins
    for name, pipe in {"dense": b.dense(), "quest_top_k": b.quest_top_k(),
                       "quest_twilight": b.quest_twilight(), "oracle_top_k": b.oracle_top_k(),
                       "streaming": b.streaming()}.items():
        log = json.loads((ROOT / "tuning_logs" / "cpu" / f"{name}.json").read_text())
        assert pipe.key() in {e["pipeline_key"] for e in log["entries"]}, name


def test_projection_matrices_round_trip_exactly() -> None:
    p = torch.randn(2, 16, 3)
    m = ir.Matrix.of(p)
    assert m.shape == (2, 16, 3) and torch.equal(torch.tensor(m.values()).view(2, 16, 3), p)
    pipe = tw.builtins.loki(p, budget=8)
    again = ir.from_data(json.loads(json.dumps(ir.to_data(pipe.ir))))
    assert again == pipe.ir and again.key() == pipe.key()


# ---- budgets, keep rules and selectors combined -----------------------------------------------
def test_budget_algebra() -> None:
    larger = tw.tokens(100) | tw.fraction(0.25)
    smaller = tw.tokens(100) & tw.fraction(0.25)
    assert (larger.kind, smaller.kind) == ("max", "min")
    assert [larger.tokens(n) for n in (200, 1000)] == [100, 250]
    assert [smaller.tokens(n) for n in (200, 1000)] == [50, 100]
    nested = tw.tokens(10) | tw.tokens(20) | tw.fraction(0.5)
    assert len(nested.parts) == 3 and nested.tokens(30) == 20
    assert (tw.tokens(10) | tw.fraction(0.5)) & tw.tokens(40) != larger  # nests the other kind
    with pytest.raises(tw.PipelineError, match="combine budgets"):
        tw.tokens(10) | 5


def test_keep_rules_combine_with_or_and_plus() -> None:
    assert tw.sink(4) + tw.window(8) == tw.sink(4) | tw.window(8) == ir.Keep(4, 8)


@pytest.mark.parametrize("budget,want", [(tw.tokens(6) | tw.fraction(0.25), lambda n: max(6, math.ceil(n / 4))),
                                         (tw.tokens(6) & tw.fraction(0.25), lambda n: min(6, math.ceil(n / 4)))])
def test_combined_budgets_keep_that_many(budget, want) -> None:
    pipe = tw.Pipeline(select=tw.top_k(oracle, budget))
    cache, keys = _cache(pipe, lengths=(40, 13))
    _, kept = tw.reference(pipe).run(_q(), cache, return_kept=True)
    assert kept.count.tolist() == [[want(40)] * 4, [want(13)] * 4]


@pytest.mark.parametrize("rule", ["union", "intersect"])
def test_selector_union_and_intersection(rule) -> None:
    @tw.score(per="token")
    def recent(q, k):
        return -tw.distance()
    a, b = tw.top_k(oracle, 10, group="none"), tw.threshold(recent, -5.0, group="none")
    pipe = tw.Pipeline(select=(a | b) if rule == "union" else (a & b))
    cache, _ = _cache(pipe)
    q = _q()
    masks = [tw.reference(tw.Pipeline(select=s)).run(q, cache, return_kept=True)[1].mask
             for s in (a, b)]
    want = masks[0] | masks[1] if rule == "union" else masks[0] & masks[1]
    _, kept = tw.reference(pipe).run(q, cache, return_kept=True)
    assert torch.equal(kept.mask, want)
    assert pipe.name == ("oracle|recent" if rule == "union" else "oracle&recent")


# ---- what the reference computes ---------------------------------------------------------------
def test_positions_score_recency() -> None:
    """``-tw.distance()`` ranks the latest tokens first: top-k of it is a window; per page the
    position is the page's first token."""
    @tw.score(per="token")
    def recent(q, k):
        return -tw.distance()
    pipe = tw.Pipeline(select=tw.top_k(recent, 7))
    cache, _ = _cache(pipe, lengths=(40, 23))
    _, kept = tw.reference(pipe).run(_q(), cache, return_kept=True)
    assert torch.equal(kept.mask, tw.reference(tw.Pipeline(select=tw.nothing(),
                       keep=tw.window(7))).run(_q(), cache, return_kept=True)[1].mask)

    @tw.score(per="page", summary=tw.builtins.minmax)
    def first_pages(q, page):
        return -tw.position() + 0.0 * tw.sum(page.kmin) + tw.query_position() * 0.0
    pipe = tw.Pipeline(select=tw.top_k(first_pages, 16), page_size=8)
    cache, _ = _cache(pipe, lengths=(40,))
    _, kept = tw.reference(pipe).run(_q(b=1), cache, return_kept=True)
    assert kept.mask[0, 0].nonzero().flatten().tolist() == list(range(16))


def test_score_math_matches_torch() -> None:
    @tw.score(per="token")
    def mixed(q, k):
        x = q * k
        cond = tw.where(x > 0, tw.sqrt(tw.abs(x)), -tw.log(1.0 + tw.abs(x)))
        return tw.sum(cond * tw.sign(k) + tw.tanh(x) ** 2) + (tw.max(k) >= 1.0) * 0.5
    pipe = tw.Pipeline(select=tw.threshold(mixed, 0.0, group="none"))
    cache, keys = _cache(pipe, lengths=(30,))
    q = _q(b=1)
    _, kept = tw.reference(pipe).run(q, cache, return_kept=True)
    qg = q[0].view(2, 2, 16)[:, :, None, :]  # [Hkv, G, 1, D]
    x = qg * keys[0][:, None]
    want = torch.where(x > 0, x.abs().sqrt(), -torch.log1p(x.abs()))
    s = (want * keys[0][:, None].sign() + torch.tanh(x) ** 2).sum(-1) \
        + (keys[0].amax(-1) >= 1.0)[:, None].float() * 0.5
    assert torch.equal(kept.mask[0], (s >= 0).reshape(4, 30))


def test_top_p_selector_is_the_minimal_mass_set() -> None:
    pipe = tw.Pipeline(select=tw.top_p(oracle, 0.7, group="none"))
    cache, keys = _cache(pipe, lengths=(50,))
    q = _q(b=1)
    _, kept = tw.reference(pipe).run(q, cache, return_kept=True)
    logits = torch.einsum("hgd,htd->hgt", q[0].view(2, 2, 16), keys[0]).reshape(4, 50)
    w = torch.softmax(logits, -1).double()
    for h in range(4):
        order = w[h].argsort(descending=True)
        cum = w[h][order].cumsum(0)
        n = int((cum < 0.7 * w[h].sum()).sum()) + 1
        assert set(kept.mask[0, h].nonzero().flatten().tolist()) == set(order[:n].tolist())


def test_selector_scores_low_bit_codes() -> None:
    """``estimate=`` on a selector: the score's ``k`` is the dequantized codes (here page INT4,
    per channel: each head's order follows the codes, not the keys)."""
    est = tw.quantized_keys(4, "page")
    pipe = tw.Pipeline(select=tw.top_k(oracle, 9, estimate=est, group="none"))
    cache, keys = _cache(pipe, lengths=(48,))
    assert tw.compiler.keycodes.KeyCodeSpec.of(est) in cache.key_codes
    q = _q(b=1)
    _, kept = tw.reference(pipe).run(q, cache, return_kept=True)
    kt = estimated_keys(est, cache, [0], None)[0]  # [Hkv, T, D]
    s = torch.einsum("hgd,htd->hgt", q[0].view(2, 2, 16), kt).reshape(4, 48)
    want = torch.zeros_like(kept.mask[0])
    want.scatter_(-1, s.sort(dim=-1, descending=True, stable=True).indices[:, :9], True)
    assert torch.equal(kept.mask[0], want)
    exact = tw.reference(tw.Pipeline(select=tw.top_k(oracle, 9, group="none"))).run(
        q, cache, return_kept=True)[1].mask
    assert not torch.equal(exact, kept.mask)  # the codes really are what was scored


def test_token_summaries_are_kept_per_token_on_append() -> None:
    p = torch.randn(2, 16, 3)

    @tw.token_summary
    def low(k):
        return dict(kp=k @ p, few=k[[0, 5]])

    @tw.score(per="token", summary=low)
    def approx(q, tok):
        return tw.dot(q @ p, tok.kp) + tw.sum(q * tok.few)
    pipe = tw.Pipeline(select=tw.top_k(approx, 5))
    whole = make_cache(pipe, 2, 16, dtype=torch.float16)
    chunked = make_cache(pipe, 2, 16, dtype=torch.float16)
    k, v = torch.randn(2, 37, 16).half(), torch.randn(2, 37, 16).half()
    whole.append(k, v, whole.add_request())
    rid = chunked.add_request()
    for a, b in ((0, 5), (5, 6), (6, 37)):
        chunked.append(k[:, a:b], v[:, a:b], rid)
    got = whole.gather_tokens(whole.token_summaries["low.kp"])[0][0]
    # the cache's fp32 matmul may sum in another order than this one: one fp16 ulp apart at most
    torch.testing.assert_close(got.float(), (k.float() @ p).half().float(), rtol=2**-10, atol=2**-14)
    assert torch.equal(got, chunked.gather_tokens(chunked.token_summaries["low.kp"])[0][0])
    assert torch.equal(whole.gather_tokens(whole.token_summaries["low.few"])[0][0],
                       k[:, :, [0, 5]])
    assert "token_summary:low.kp" in whole.memory_bytes()


def test_mean_value_sum_follows_appends_and_frees() -> None:
    pipe = tw.builtins.sparq(r=4, budget=4)
    cache = make_cache(pipe, 2, 16, dtype=torch.float32)
    a, b = cache.add_requests(2)
    va = torch.randn(2, 9, 16)
    cache.append(torch.randn(2, 9, 16), va, a)
    cache.append(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16), [a, b])
    cache.free_request(b)
    assert float(cache.v_sum[b].abs().sum()) == 0
    assert cache.add_request() == b and float(cache.v_sum[b].abs().sum()) == 0
    torch.testing.assert_close(cache.v_sum[a], cache.gather([a])[1][0].sum(1))
