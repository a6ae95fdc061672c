"""DSL errors: the specific class, and a message naming this file and the offending line.

Each offending line carries a ``# <tag>`` comment; ``raises_at`` looks its number up, so the
tests do not break when lines move.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import twilight as tw
from twilight import errors
from twilight.runtime.serving.paged_cache import PagedKVCache
from twilight.runtime.serving.pipeline_cache import make_cache

HERE = Path(__file__)
LINES = HERE.read_text().splitlines()


def line_of(tag: str) -> int:
    hits = [i for i, text in enumerate(LINES, 1) if text.rstrip().endswith(f"# <{tag}>")]
    assert len(hits) == 1, f"tag {tag} must mark exactly one line"
    return hits[0]


@contextmanager
def raises_at(cls: type, tag: str):
    """Expect exactly ``cls``, located at the line tagged ``tag`` of this file."""
    with pytest.raises(cls) as info:
        yield info
    err, line = info.value, line_of(tag)
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}"
    assert isinstance(err, tw.PipelineError) and isinstance(err, tw.TwilightError)
    assert err.loc is not None and Path(err.loc.file).name == HERE.name
    assert f"{HERE.name}:{line}:" in str(err), str(err)
    assert LINES[line - 1].strip() in str(err), "the message quotes the offending line"


@tw.page_summary
def minmax(k):
    return dict(kmin=tw.min(k, axis=0), kmax=tw.max(k, axis=0))


# ---- axes ----------------------------------------------------------------------------------------
def test_summary_must_reduce_tokens() -> None:
    with raises_at(errors.AxisError, "summary-axis"):
        @tw.page_summary
        def bad(k):
            return dict(kmin=tw.min(k, axis=1))  # <summary-axis>


def test_score_must_reduce_channels() -> None:
    with raises_at(errors.AxisError, "score-axis"):
        @tw.score(per="token")
        def bad(q, k):
            return tw.sum(q * k, axis=2)  # <score-axis>


def test_summary_indexes_keys_by_channel() -> None:
    with raises_at(errors.AxisError, "summary-index"):
        @tw.page_summary
        def bad(k):
            return dict(first=tw.max(k[[0, 1]], axis=0))  # <summary-index>


def test_reducing_a_scalar() -> None:
    with raises_at(errors.AxisError, "scalar-reduce"):
        @tw.score(per="token")
        def bad(q, k):
            return tw.sum(tw.dot(q, k))  # <scalar-reduce>


# ---- summaries and scores ----------------------------------------------------------------------
def test_unknown_summary_field() -> None:
    with raises_at(errors.UnknownSummaryError, "field") as info:
        @tw.score(per="page", summary=minmax)
        def bad(q, page):
            return tw.sum(q * page.kmid)  # <field>
    assert "kmin, kmax" in str(info.value)


def test_page_score_needs_a_summary() -> None:
    with raises_at(errors.StructureError, "no-summary"):
        @tw.score(per="page")  # <no-summary>
        def bad(q, page):
            return tw.sum(q)


def test_token_score_takes_no_summary() -> None:
    with raises_at(errors.StructureError, "token-summary"):
        tw.score(per="token", summary=minmax)  # <token-summary>


def test_score_returning_a_vector() -> None:
    with raises_at(errors.ExprTypeError, "vector"):
        @tw.score(per="token")
        def bad(q, k):
            return q * k  # <vector>


def test_python_if_on_a_traced_value() -> None:
    with raises_at(errors.ExprTypeError, "if"):
        @tw.score(per="token")
        def bad(q, k):
            s = tw.dot(q, k)
            if s > 0:  # <if>
                return s
            return -s


def test_python_truth_value_of_a_traced_value() -> None:
    with raises_at(errors.ExprTypeError, "bool"):
        @tw.score(per="token")
        def bad(q, k):
            s = tw.dot(q, k)
            return s if s else -s  # <bool>


def test_python_max_of_two_traced_values() -> None:
    with raises_at(errors.ExprTypeError, "py-max2"):
        @tw.score(per="token")
        def bad(q, k):
            return max(tw.dot(q, k), tw.sum(k))  # <py-max2>


def test_python_max_on_a_traced_value() -> None:
    with raises_at(errors.ExprTypeError, "py-max"):
        @tw.score(per="token")
        def bad(q, k):
            return max(q * k)  # <py-max>


def test_mixing_channel_counts() -> None:
    with raises_at(errors.ExprTypeError, "widths"):
        @tw.score(per="token")
        def bad(q, k):
            return tw.sum(q[[0, 1]] * k[[0, 1, 2]])  # <widths>


def test_mixing_two_subsets_with_full_head_dim() -> None:
    """A full vector meeting a subset is read at the subset's channels; a subset made of two
    channel lists leaves those channels unclear."""
    with raises_at(errors.ExprTypeError, "subset-full"):
        @tw.score(per="token")
        def bad(q, k):
            mixed = q[[0, 1]] * k[[2, 3]]
            return tw.dot(mixed, k)  # <subset-full>


def test_projection_with_full_head_dim() -> None:
    with raises_at(errors.ExprTypeError, "proj-full"):
        @tw.score(per="token")
        def bad(q, k):
            return tw.dot(q @ [[1.0], [2.0]], k)  # <proj-full>


def test_channels_selected_twice() -> None:
    with raises_at(errors.ExprTypeError, "twice"):
        @tw.score(per="token")
        def bad(q, k):
            return tw.dot(q[[0, 1, 2]][[0, 1]], k[[0, 1]])  # <twice>


def test_non_finite_constant() -> None:
    with raises_at(errors.ExprTypeError, "inf-const"):
        @tw.score(per="token")
        def bad(q, k):
            return tw.dot(q, k) * float("inf")  # <inf-const>


def test_summary_must_return_a_dict_of_vectors() -> None:
    with raises_at(errors.ExprTypeError, "summary-dict"):
        @tw.page_summary  # <summary-dict>
        def bad(k):
            return tw.min(k, axis=0)
    with raises_at(errors.ExprTypeError, "summary-scalar"):
        @tw.page_summary
        def bad2(k):
            return dict(s=tw.sum(tw.min(k, axis=0)))  # <summary-scalar>


def test_score_takes_two_arguments() -> None:
    with raises_at(errors.StructureError, "arity"):
        @tw.score(per="token")  # <arity>
        def bad(q):
            return tw.sum(q)


# ---- budgets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0, 0.0, 1.5, -1, float("nan"), True])
def test_p_outside_unit_interval(p) -> None:
    with raises_at(errors.BudgetError, "p"):
        tw.top_p(p)  # <p>


@pytest.mark.parametrize("n", [0, -5, 2.5, True])
def test_budget_must_be_positive_tokens(n) -> None:
    with raises_at(errors.BudgetError, "tokens"):
        tw.tokens(n)  # <tokens>


def test_int_budget_of_top_k_is_checked_at_the_call() -> None:
    with raises_at(errors.BudgetError, "top-k-int"):
        tw.top_k(tw.builtins.oracle, 0)  # <top-k-int>
    with raises_at(errors.BudgetError, "top-k-none"):
        tw.top_k(tw.builtins.oracle)  # <top-k-none>


@pytest.mark.parametrize("f", [0, 0.0, 2, -0.5, float("inf")])
def test_fraction_outside_unit_interval(f) -> None:
    with raises_at(errors.BudgetError, "fraction"):
        tw.fraction(f)  # <fraction>


@pytest.mark.parametrize("call", ["sink", "window"])
def test_negative_keep(call: str) -> None:
    with raises_at(errors.BudgetError, "keep"):
        getattr(tw, call)(-1)  # <keep>


@pytest.mark.parametrize("kw", [dict(scale=0), dict(scale=-1.0), dict(softcap=float("inf"))])
def test_attention_scale_and_softcap(kw) -> None:
    with raises_at(errors.BudgetError, "attend"):
        tw.attention(**kw)  # <attend>


def test_threshold_must_be_finite() -> None:
    with raises_at(errors.BudgetError, "threshold"):
        tw.threshold(tw.builtins.oracle, float("nan"))  # <threshold>


# ---- structure -----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["top_k", "top_p", "threshold", "pipeline"])
def test_bad_group_name(where: str) -> None:
    make = {"top_k": lambda: tw.top_k(tw.builtins.oracle, 8, group="bogus"),  # <group-top-k>
            "top_p": lambda: tw.top_p(0.9, group="heads"),  # <group-top-p>
            "threshold": lambda: tw.threshold(value=0.1, group="all"),  # <group-threshold>
            "pipeline": lambda: tw.Pipeline(group="Max")}  # <group-pipeline>
    with raises_at(errors.StructureError, f"group-{where.replace('_', '-')}"):
        make[where]()


@pytest.mark.parametrize("ps", [12, 0, 3, -4, 2.0])
def test_page_size_must_be_a_power_of_two(ps) -> None:
    with raises_at(errors.StructureError, "page-size"):
        tw.Pipeline(select=tw.top_k(tw.builtins.quest, 64), page_size=ps)  # <page-size>


def test_pieces_in_the_wrong_slot() -> None:
    with raises_at(errors.StructureError, "select-slot"):
        tw.Pipeline(select=tw.top_p(0.9))  # <select-slot>
    sel = tw.top_k(tw.builtins.oracle, 8)
    with raises_at(errors.StructureError, "prune-slot"):
        tw.Pipeline(prune=[tw.top_p(0.9), sel])  # <prune-slot>


def test_top_k_needs_a_score_function() -> None:
    with raises_at(errors.StructureError, "not-a-score"):
        tw.top_k(lambda q, k: q, 8)  # <not-a-score>


@pytest.mark.parametrize("kw", [dict(bits=3), dict(granularity="channel"),
                                dict(granularity="group", pages=3), dict(granularity="page", pages=2),
                                dict(granularity="group", pages=1), dict(granularity="page", smooth=True),
                                dict(smooth=1.5), dict(smooth="yes")])
def test_quantized_keys_options(kw) -> None:
    with raises_at(errors.StructureError, "quant"):
        tw.quantized_keys(**kw)  # <quant>


def test_estimate_must_be_an_estimator() -> None:
    with raises_at(errors.StructureError, "estimate"):
        tw.top_p(0.9, estimate="int4")  # <estimate>


# ---- channels --------------------------------------------------------------------------------------
def _wide_channel_pipeline():
    @tw.score(per="token")
    def wide(q, k):
        return tw.dot(q[[0, 40]], k[[0, 40]])  # <wide>
    return tw.Pipeline(select=tw.top_k(wide, 8))


def test_channel_beyond_head_dim_found_by_verify() -> None:
    pipe = _wide_channel_pipeline()
    tw.verify(pipe.ir, tw.Shape(4, 2, 64, 16))  # fits a 64-channel head
    with raises_at(errors.ChannelIndexError, "wide") as info:
        tw.verify(pipe.ir, tw.Shape(4, 2, 32, 16))
    assert "40" in str(info.value) and "32" in str(info.value)
    with raises_at(errors.ChannelIndexError, "wide"):
        make_cache(pipe, 2, 32)


def test_channel_beyond_head_dim_found_at_run_time() -> None:
    pipe = _wide_channel_pipeline()
    cache = PagedKVCache(2, 32, page_size=16, dtype=torch.float32)  # head_dim 32 < 41
    rid = cache.add_request()
    cache.append(torch.randn(2, 5, 32), torch.randn(2, 5, 32), rid)
    with raises_at(errors.ChannelIndexError, "wide"):
        tw.reference(pipe).run(torch.randn(1, 4, 32), cache)


def test_summary_channel_beyond_head_dim() -> None:
    @tw.page_summary
    def part(k):
        return dict(top=tw.max(k[:, [1, 70]], axis=0))  # <summary-wide>

    @tw.score(per="page", summary=part)
    def s(q, page):
        return tw.dot(q[[1, 70]], page.top)
    with raises_at(errors.ChannelIndexError, "summary-wide"):
        tw.verify(tw.Pipeline(select=tw.top_k(s, 8)).ir, tw.Shape(2, 2, 64, 16))


def test_channel_table_with_wrong_number_of_rows() -> None:
    table = ((0, 1), (2, 3), (4, 5))  # three KV heads' rows

    @tw.score(per="token")
    def ds(q, k):
        return tw.dot(q[table], k[table])  # <rows>
    pipe = tw.Pipeline(select=tw.top_k(ds, 8))
    tw.verify(pipe.ir, tw.Shape(6, 3, 8, 16))
    with raises_at(errors.ChannelIndexError, "rows") as info:
        tw.verify(pipe.ir, tw.Shape(4, 2, 8, 16))
    assert "3 rows" in str(info.value) and "2 KV heads" in str(info.value)


def test_ragged_or_negative_channels() -> None:
    with raises_at(errors.ChannelIndexError, "ragged"):
        @tw.score(per="token")
        def ragged(q, k):
            return tw.dot(q[((0, 1), (2,))], k[((0, 1), (2,))])  # <ragged>
    with raises_at(errors.ChannelIndexError, "negative"):
        @tw.score(per="token")
        def negative(q, k):
            return tw.dot(q[[0, -1]], k[[0, -1]])  # <negative>
    with raises_at(errors.ChannelIndexError, "empty"):
        @tw.score(per="token")
        def empty(q, k):
            return tw.dot(q[[]], k[[]])  # <empty>


def test_builtin_double_sparsity_points_at_the_callers_line() -> None:
    pipe = tw.builtins.double_sparsity(channels=[[0, 1], [2, 3]])  # <ds-call>
    with raises_at(errors.ChannelIndexError, "ds-call"):
        tw.verify(pipe.ir, tw.Shape(4, 4, 8, 16))


def test_hint_is_rendered() -> None:
    with pytest.raises(errors.UnknownSummaryError) as info:
        @tw.score(per="page", summary=minmax)
        def bad(q, page):
            return tw.sum(q * page.kmid)
    assert str(info.value).splitlines()[-1].startswith("hint: ")
