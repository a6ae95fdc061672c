"""DSL → IR: what each construct records, the defaults, and user-defined selectors written in a
few lines that run through the reference and keep what a direct computation keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import twilight as tw
from twilight.compiler import ir
from twilight.frontend.builtins import PIPELINES, quest


def _ops(e: ir.Expr) -> list[str]:
    return [n.op for n in e.walk()]


# ---- what the DSL records ----------------------------------------------------------------------
def test_quest_ir() -> None:
    s = tw.builtins.quest_top_k(256, page_size=32).ir
    assert s.page_size == 32 and s.select.rule == "top_k" and s.select.budget.value == 256.0
    assert s.select.score.per == "page" and s.summaries() == (quest.ir.summary,)
    fields = {f.name: f.expr for f in quest.ir.summary.fields}
    assert fields["kmin"].op == "reduce_min" and fields["kmin"].attr("axis") == "token"
    assert fields["kmax"].op == "reduce_max" and _ops(fields["kmax"]) == ["page_k", "reduce_max"]
    assert _ops(quest.ir.expr) == ["q", "summary", "mul", "q", "summary", "mul", "maximum",
                                   "reduce_sum"]
    assert quest.ir.expr.attr("axis") == "channel"


def test_constants_and_reflected_operators() -> None:
    @tw.score(per="token")
    def s(q, k):
        return tw.sum(2 * q - 1 / k + (-q) * abs(k))

    ops = _ops(s.ir.expr)
    assert {"const", "mul", "sub", "div", "neg", "abs", "add"} <= set(ops)
    consts = [n.attr("value") for n in s.ir.expr.walk() if n.op == "const"]
    assert consts == [2.0, 1.0] and all(type(c) is float for c in consts)
    assert s.ir.expr.inputs[0].op == "add"


def test_ops_module_functions() -> None:
    @tw.page_summary
    def summ(k):
        return dict(a=tw.absmax(k, axis=0), m=tw.mean(k, axis=0), s=tw.sum(k, axis=0))

    @tw.score(per="page", summary=summ)
    def sc(q, page):
        return tw.max(tw.minimum(tw.exp(q), page.a)) + tw.mean(q * page.m) + tw.min(page.s)

    assert _ops(summ.ir.fields[0].expr) == ["page_k", "abs", "reduce_max"]
    assert {"exp", "minimum", "reduce_max", "reduce_mean", "reduce_min"} <= set(_ops(sc.ir.expr))


@pytest.mark.parametrize("chans", [[3, 1, 2], (3, 1, 2), np.array([3, 1, 2]),
                                   torch.tensor([3, 1, 2])])
def test_channel_lists_normalize_to_tuples(chans) -> None:
    @tw.score(per="token")
    def s(q, k):
        return tw.dot(q[chans], k[chans])

    takes = [n for n in s.ir.expr.walk() if n.op == "take"]
    assert [t.attr("channels") for t in takes] == [(3, 1, 2)] * 2


def test_channel_table_normalizes_to_rows() -> None:
    pipe = tw.builtins.double_sparsity(channels=np.array([[0, 5], [1, 7]]), budget=8)
    take = next(n for n in pipe.ir.select.score.expr.walk() if n.op == "take")
    assert take.attr("channels") == ((0, 5), (1, 7))


def test_estimators() -> None:
    assert tw.exact_keys().name == "exact"
    assert tw.quantized_keys().name == "int4_token"
    assert tw.quantized_keys(8, "page").name == "int8_page"
    assert tw.quantized_keys(4, "group").name == "int4_group4"
    assert tw.quantized_keys(2, "group", pages=8).group_pages == 8
    assert tw.quantized_keys(4, smooth=True).name == "int4_token_smooth"
    assert tw.quantized_keys(4, smooth=0.5).name == "int4_token_smooth0.5"
    assert tw.quantized_keys(4, smooth=True).smooth == 1.0 and not tw.quantized_keys().smooth
    assert tw.top_p(0.9).estimator == ir.Estimator("quantized", 4, "token")


def test_rules_without_score_are_pruners() -> None:
    assert isinstance(tw.top_k(budget=tw.tokens(4)), ir.Prune)
    assert isinstance(tw.threshold(value=0.01), ir.Prune)
    assert isinstance(tw.top_k(tw.builtins.oracle, 4), ir.Select)
    assert tw.top_k(tw.builtins.oracle, 4).budget == tw.tokens(4)


def test_group_defaults_and_overrides() -> None:
    p = tw.Pipeline(select=tw.top_k(quest, 64), prune=tw.top_p(0.9)).ir
    assert (p.select.group, p.prune[0].group) == ("max", "union")
    p = tw.Pipeline(select=tw.top_k(quest, 64), prune=tw.top_p(0.9), group="kv").ir
    assert (p.select.group, p.prune[0].group) == ("kv", "kv")
    p = tw.Pipeline(select=tw.top_k(quest, 64, group="none"), prune=tw.top_p(0.9, group="mean"),
                    group="kv").ir
    assert (p.select.group, p.prune[0].group) == ("none", "mean")
    assert tw.Pipeline(select=tw.nothing(), group="max").ir.select.group == "none"


def test_keep_rules_compose() -> None:
    k = tw.sink(4) | tw.window(16) | tw.sink(2)
    assert (k.sink, k.window) == (4, 16)
    assert tw.Pipeline().ir.keep == ir.Keep(0, 0)


def test_pipeline_names_and_prune_lists() -> None:
    p = tw.Pipeline(select=tw.top_k(quest, 64),
                    prune=[tw.top_p(0.9), tw.top_k(budget=tw.tokens(8))])
    assert p.name == "quest+top_p+top_k" and len(p.ir.prune) == 2
    assert tw.Pipeline().name == "dense"
    assert tw.Pipeline(select=tw.nothing()).name == "keep_only"
    assert tw.Pipeline(name="mine").name == "mine"
    assert repr(p) == f"Pipeline('quest+top_p+top_k', key={p.key()[:12]})"
    assert p.key() == p.ir.key()


def test_attention_defaults() -> None:
    assert tw.Pipeline().ir.attend == ir.Attend(None, None)
    assert tw.attention(scale=1, softcap=30) == ir.Attend(1.0, 30.0)


def test_builtin_factories() -> None:
    assert set(PIPELINES) == {"dense", "quest_top_k", "quest_twilight", "oracle_top_k",
                              "streaming", "double_sparsity", "ds_twilight", "sparq", "loki"}
    assert isinstance(tw.builtins.loki(), tw.builtins.Calibrated)
    assert isinstance(tw.builtins.double_sparsity(), tw.builtins.Calibrated)
    q, k = torch.randn(5, 4, 16), torch.randn(2, 30, 16)
    pipe = tw.builtins.ds_twilight().make(q, k)
    take = next(n for n in pipe.ir.select.score.expr.walk() if n.op == "take")
    assert len(take.attr("channels")) == 2 and len(take.attr("channels")[0]) == 16
    assert tw.builtins.streaming(4, 64).ir.keep == ir.Keep(4, 64)


def test_calibrate_channels_ranks_by_magnitude() -> None:
    q = torch.ones(3, 2, 8)
    k = torch.ones(1, 10, 8)
    k[..., 6] = 50.0
    k[..., 2] = 20.0
    assert tw.builtins.calibrate_channels(q, k, r=2) == ((2, 6),)
    with pytest.raises(ValueError):
        tw.builtins.calibrate_channels(q, k, r=9)


# ---- user-defined selectors ------------------------------------------------------------------
@tw.page_summary
def kmean(k):
    return dict(kmean=tw.mean(k, axis=0))


@tw.score(per="page", summary=kmean)
def mean_key(q, page):  # a page scored by its mean key
    return tw.dot(q, page.kmean)


@tw.page_summary
def kabs(k):
    return dict(kabs=tw.absmax(k, axis=0))


@tw.score(per="page", summary=kabs)
def quest_abs(q, page):  # Quest with one magnitude bound per channel
    return tw.sum(tw.abs(q) * page.kabs)


CHANS = [0, 3, 6]


@tw.page_summary
def kpart(k):
    return dict(top=tw.max(k[:, CHANS], axis=0), low=tw.min(k[:, CHANS], axis=0))


@tw.score(per="page", summary=kpart)
def quest_part(q, page):  # Quest over three channels only
    return tw.sum(tw.maximum(q[CHANS] * page.top, q[CHANS] * page.low))


def _direct(name: str, q: torch.Tensor, page: torch.Tensor) -> torch.Tensor:
    """Page scores ``[G]`` of the group's queries ``q [G, D]`` for keys ``page [n, D]``."""
    if name == "mean_key":
        return q @ page.mean(0)
    if name == "quest_abs":
        return q.abs() @ page.abs().amax(0)
    sub, qs = page[:, CHANS], q[:, CHANS]
    return torch.maximum(qs * sub.amax(0), qs * sub.amin(0)).sum(-1)


@pytest.mark.parametrize("name", ["mean_key", "quest_abs", "quest_part"])
@pytest.mark.parametrize("group", ["max", "none"])
def test_user_selector_keeps_what_a_direct_computation_keeps(fill_cache, name, group) -> None:
    score = {"mean_key": mean_key, "quest_abs": quest_abs, "quest_part": quest_part}[name]
    ps, budget, g = 4, 9, 2  # 3 pages of 4 tokens
    pipe = tw.Pipeline(select=tw.top_k(score, tw.tokens(budget), group=group), page_size=ps)
    lengths = [16, 10, 4, 2]  # page sizes 4 and 2: grid means stay exact
    f = fill_cache(pipe, 2, 8, lengths, grid=True, seed=7)
    q = torch.randint(-8, 9, (len(lengths), 2 * g, 8),
                      generator=torch.Generator().manual_seed(8)).float() / 4
    _, kept = tw.reference(pipe).run(q, f.cache, return_kept=True)
    for b, k in enumerate(f.keys):
        n = k.shape[1]
        for kvh in range(2):
            s = torch.stack([_direct(name, q[b, kvh * g : (kvh + 1) * g].double(),
                                     k[kvh, j : j + ps].double()) for j in range(0, n, ps)], -1)
            s = s.amax(0, keepdim=True).expand(g, -1) if group == "max" else s
            for i in range(g):
                order = sorted(range(s.shape[1]), key=lambda j: (-float(s[i, j]), j))[:3]
                want = torch.zeros(n, dtype=torch.bool)
                for j in order:
                    want[j * ps : (j + 1) * ps] = True
                assert torch.equal(kept.mask[b, kvh * g + i, :n], want), (b, kvh, i)
