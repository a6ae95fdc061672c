"""Top-p pruning: ``top_p_mask`` alone, and end to end through the reference executor.

The contract (runtime/evaluation/reference.py): the minimal set of each row whose float64 mass is ≥ p of
the row's total; equal weights keep the lower index first; zero weights are never kept.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import twilight as tw
from twilight.runtime.evaluation.reference import top_p_mask

SLACK = Fraction(1, 10**9)  # relative: the executor sums in float64, rounding the last bits

# Zeros, 60 decades of dynamic range, and tiny normals; rows of subnormals only are left out:
# there p · total itself rounds to a few ulps (see test_subnormal_row_keeps_its_heaviest).
weights = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-30, 1e30), st.floats(0.0, 1.0, allow_subnormal=False),
              st.just(2.5e-308)), min_size=1, max_size=40)
probabilities = st.one_of(st.floats(0.01, 1.0), st.sampled_from([0.5, 0.9, 0.99, 1.0]))


def _mask(w: list[float], p: float) -> list[bool]:
    return top_p_mask(torch.tensor([w], dtype=torch.float64), p)[0].tolist()


def _check_top_p(w: list[float], p: float, kept: list[bool]) -> None:
    # exact rational arithmetic: no rounding or underflow on the test's side
    need = Fraction(p) * sum(map(Fraction, w))
    kept_w = [Fraction(x) for x, k in zip(w, kept, strict=True) if k]
    assert all(x > 0 for x in kept_w), "a zero weight was kept"
    if p >= 1:
        assert kept == [x > 0 for x in w]
        return
    assert sum(kept_w) >= need * (1 - SLACK)
    assert sum(kept_w) - min(kept_w) < need * (1 + SLACK), "not minimal"
    # the kept ones are the heaviest; among equal weights the lower index goes first
    for i, (wi, ki) in enumerate(zip(w, kept, strict=True)):
        for j, (wj, kj) in enumerate(zip(w, kept, strict=True)):
            if ki and not kj and wj > 0:
                assert wi > wj or (wi == wj and i < j), (i, j)


@settings(max_examples=200, deadline=None)
@given(w=weights, p=probabilities)
def test_minimal_set_with_mass_p(w: list[float], p: float) -> None:
    assume(any(x > 0 for x in w))
    _check_top_p(w, p, _mask(w, p))


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(weights.filter(lambda r: len(r) == 12), min_size=1, max_size=4),
       p=probabilities)
def test_rows_are_independent(rows: list[list[float]], p: float) -> None:
    batched = top_p_mask(torch.tensor(rows, dtype=torch.float64), p)
    for r, row in enumerate(rows):
        assert batched[r].tolist() == _mask(row, p)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 300), p=probabilities, c=st.sampled_from([2.0**-20, 0.25, 1.0, 64.0]))
def test_all_equal_keeps_ceil_p_n_lowest_indices(n: int, p: float, c: float) -> None:
    # c is a power of two, so every partial sum and p·total are exact: the minimal set is
    # ceil(p·n) tokens with p·n rounded once in float64, as in the executor.
    kept = _mask([c] * n, p)
    m = math.ceil(p * n)
    assert kept == [True] * m + [False] * (n - m)


def test_float32_weights_are_summed_in_float64() -> None:
    w = torch.full((1, 3000), 1.0, dtype=torch.float32)
    assert int(top_p_mask(w, 0.5).sum()) == 1500


@pytest.mark.parametrize("p", [0.01, 0.5, 1.0])
def test_one_token(p: float) -> None:
    assert _mask([0.3], p) == [True]
    assert _mask([0.0], p) == [False]


def test_ties_keep_lower_index() -> None:
    assert _mask([0.25, 0.5, 0.25], 0.6) == [True, True, False]
    assert _mask([0.2, 0.2, 0.2, 0.2, 0.2], 0.5) == [True, True, True, False, False]


def test_p_one_keeps_every_positive_weight_despite_dynamic_range() -> None:
    w = [1e30, 0.0, 1e-30, 1.0, 0.0, 5e-324]
    assert _mask(w, 1.0) == [True, False, True, True, False, True]


def test_subnormal_row_keeps_its_heaviest() -> None:
    # p · total underflows to 0 here; a row with mass must still keep something
    assert _mask([5e-324], 0.5) == [True]
    assert _mask([0.0, 5e-324, 1e-323], 0.1) == [False, False, True]


def test_all_zero_row_keeps_nothing() -> None:
    assert _mask([0.0, 0.0], 0.9) == [False, False]


def test_exact_boundary_is_enough() -> None:
    # mass 0.5 of 1.0 already reaches p = 0.5: the second token is not needed
    assert _mask([0.5, 0.25, 0.25], 0.5) == [True, False, False]


# ---- end to end: Kept.est_mass ------------------------------------------------------------------
def _pipe(p: float, estimate, page_size: int = 4, group: str | None = None) -> tw.Pipeline:
    return tw.Pipeline(select=tw.top_k(tw.builtins.quest, tw.tokens(10_000)),
                       prune=tw.top_p(p, estimate=estimate, group=group), page_size=page_size)


ESTIMATES = {"exact": tw.exact_keys, "int4": lambda: tw.quantized_keys(4),
             "int8_page": lambda: tw.quantized_keys(8, "page")}


@pytest.mark.parametrize("estimate", sorted(ESTIMATES))
@pytest.mark.parametrize("group", ["union", "none", "kv"])
@pytest.mark.parametrize("p", [0.3, 0.8, 0.95])
def test_est_mass_reaches_p(fill_cache, estimate: str, group: str, p: float) -> None:
    f = fill_cache(_pipe(p, ESTIMATES[estimate](), group=group), 2, 16, [1, 4, 5, 37],
                   scale=2.0)
    q = f.query(4, scale=2.0)
    _, kept = tw.reference(_pipe(p, ESTIMATES[estimate](), group=group)).run(
        q, f.cache, return_kept=True)
    assert kept.est_mass.shape == (4, 4)
    assert (kept.est_mass >= p - 1e-5).all()
    assert (kept.mask <= kept.candidates).all()
    # p is relative to the candidates: a one-token request keeps its token with all the mass
    assert kept.mask[0, :, 0].all() and torch.allclose(kept.est_mass[0], torch.ones(4))


@pytest.mark.parametrize("group", ["none", "union", "kv"])
def test_est_mass_is_relative_to_each_heads_candidates(fill_cache, group: str) -> None:
    """Heads of a group holding different candidates (select group='none')."""
    pipe = tw.Pipeline(select=tw.top_k(tw.builtins.oracle, tw.tokens(4), group="none"),
                       prune=tw.top_p(0.9, estimate=tw.exact_keys(), group=group))
    f = fill_cache(pipe, 1, 8, [30], scale=3.0)
    _, kept = tw.reference(pipe).run(f.query(4, scale=3.0), f.cache, return_kept=True)
    assert not (kept.candidates == kept.candidates[:, :1]).all()
    assert (kept.est_mass >= 0.9 - 1e-5).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0.05, 0.99),
       lengths=st.lists(st.integers(1, 24), min_size=1, max_size=3),
       hkv=st.integers(1, 2), g=st.integers(1, 3))
def test_per_head_top_p_is_minimal(fill_cache, seed, p, lengths, hkv, g) -> None:
    """group='none' with exact keys: each head keeps its own minimal set of mass ≥ p."""
    pipe = _pipe(p, tw.exact_keys(), group="none")
    f = fill_cache(pipe, hkv, 8, lengths, seed=seed, scale=3.0)
    q = f.query(hkv * g, seed=seed + 1, scale=3.0)
    _, kept = tw.reference(pipe).run(q, f.cache, return_kept=True)
    for b, k in enumerate(f.keys):
        logits = torch.einsum("hgd,htd->hgt", q[b].double().view(hkv, g, -1), k.double())
        w = torch.softmax(logits / math.sqrt(8), -1).reshape(hkv * g, -1)
        for h in range(hkv * g):
            row = kept.mask[b, h, : len(w[h])]
            mass = float(w[h][row].sum())
            assert mass >= p - 1e-5
            assert abs(mass - float(kept.est_mass[b, h])) < 1e-5
            assert mass - float(w[h][row].min()) < p + 1e-5, "not minimal"


@pytest.mark.parametrize("length", [1, 4])  # one token; exactly one page
def test_one_token_and_one_page(fill_cache, length: int) -> None:
    pipe = _pipe(0.5, tw.quantized_keys(4))
    f = fill_cache(pipe, 1, 8, [length])
    _, kept = tw.reference(pipe).run(f.query(2), f.cache, return_kept=True)
    assert kept.mask.shape == (1, 2, length)
    assert kept.candidates.all()
    assert (kept.count >= 1).all() and (kept.est_mass >= 0.5 - 1e-6).all()


def test_p_one_keeps_every_candidate(fill_cache) -> None:
    pipe = _pipe(1.0, tw.quantized_keys(2))
    f = fill_cache(pipe, 2, 16, [3, 33], scale=4.0)
    _, kept = tw.reference(pipe).run(f.query(4, scale=4.0), f.cache, return_kept=True)
    assert torch.equal(kept.mask, kept.candidates)
    assert torch.allclose(kept.est_mass, torch.ones(2, 4), atol=1e-5)
