"""Python a score cannot trace, and the newer DSL pieces used wrongly: the specific error
class, at this file's offending line (tagged ``# <tag>``), saying what to write instead."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import twilight as tw
from twilight import errors
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
    assert err.loc is not None and Path(err.loc.file).name == HERE.name
    assert f"{HERE.name}:{line}:" in str(err), str(err)
    assert LINES[line - 1].strip() in str(err), "the message quotes the offending line"


@tw.page_summary
def minmax(k):
    return dict(kmin=tw.min(k, axis=0), kmax=tw.max(k, axis=0))


# ---- Python constructs inside a score: the user's line and what to write instead ---------------
@tw.score(per="token")
def dot_score(q, k):
    return tw.dot(q, k)


def _hint(info) -> str:
    return info.value.hint or ""


def test_a_traced_exponent() -> None:
    with raises_at(errors.ExprTypeError, "pow-traced") as info:
        @tw.score(per="token")
        def bad(q, k):
            return tw.sum(q ** k)  # <pow-traced>
    assert "tw.exp(b * tw.log(a))" in _hint(info)


def test_float_of_a_traced_value() -> None:
    with raises_at(errors.ExprTypeError, "float") as info:
        @tw.score(per="token")
        def bad(q, k):
            return tw.dot(q, k) * float(tw.sum(q))  # <float>
    assert "tw.exp" in _hint(info)


def test_math_exp_of_a_traced_value() -> None:
    with raises_at(errors.ExprTypeError, "math-exp") as info:
        @tw.score(per="token")
        def bad(q, k):
            return math.exp(tw.dot(q, k))  # <math-exp>
    assert "tw.exp" in _hint(info)


def test_numpy_on_a_traced_value() -> None:
    with raises_at(errors.ExprTypeError, "np-sqrt") as info:
        @tw.score(per="token")
        def bad(q, k):
            return tw.sum(np.sqrt(q * k))  # <np-sqrt>
    assert "np.sqrt" in str(info.value) and "tw.sqrt" in _hint(info)
    with raises_at(errors.ExprTypeError, "np-sum") as info:
        @tw.score(per="token")
        def bad2(q, k):
            return np.sum(q * k)  # <np-sum>
    assert "tw.sum" in _hint(info)


def test_torch_on_a_traced_value() -> None:
    with raises_at(errors.ExprTypeError, "torch-sum") as info:
        @tw.score(per="token")
        def bad(q, k):
            return torch.sum(q * k)  # <torch-sum>
    assert "torch.sum" in str(info.value) and "tw.sum" in _hint(info)


def test_dunder_summary_field() -> None:
    with raises_at(errors.UnknownSummaryError, "dunder"):
        @tw.score(per="page", summary=minmax)
        def bad(q, page):
            return tw.sum(q * page.__kmin__)  # <dunder>


def test_a_score_calling_itself() -> None:
    with raises_at(errors.ExprTypeError, "self-call") as info:
        @tw.score(per="token")
        def again(q, k):
            return again(q, k)  # <self-call>
    assert "call itself" in _hint(info)


def test_a_score_calling_a_score() -> None:
    with raises_at(errors.ExprTypeError, "score-call") as info:
        @tw.score(per="token")
        def bad(q, k):
            return dot_score(q, k) * 2.0  # <score-call>
    assert "plain Python function" in _hint(info)


def _forever(x):
    return _forever(x + 1.0)  # <recursion>


def test_a_helper_that_recurses_forever() -> None:
    with raises_at(errors.ExprTypeError, "recursion"):
        @tw.score(per="token")
        def bad(q, k):
            return tw.sum(_forever(q * k))


@pytest.mark.parametrize("tag", ["len", "floordiv", "iterate"])
def test_other_python_constructs(tag) -> None:
    with raises_at(errors.ExprTypeError, tag):
        @tw.score(per="token")
        def bad(q, k):
            if tag == "len":
                return tw.sum(q * k) / len(q)  # <len>
            if tag == "floordiv":
                return tw.sum(q // 2.0)  # <floordiv>
            return sum(x for x in q)  # <iterate>


def test_an_unknown_python_error_names_the_line() -> None:
    with raises_at(errors.ExprTypeError, "attr") as info:
        @tw.score(per="token")
        def bad(q, k):
            return q.norm()  # <attr>
    assert "AttributeError" in str(info.value)


def test_open_channel_slice() -> None:
    with raises_at(errors.ChannelIndexError, "open-slice"):
        @tw.score(per="token")
        def bad(q, k):
            return tw.dot(q[16:], k[16:])  # <open-slice>


def test_top_channels_of_the_keys() -> None:
    with raises_at(errors.ExprTypeError, "tc-keys"):
        @tw.score(per="token")
        def bad(q, k):
            return tw.dot(q[tw.top_channels(q * k, 4)], k)  # <tc-keys>


def test_projecting_keys_inside_a_score() -> None:
    with raises_at(errors.ExprTypeError, "proj-keys") as info:
        @tw.score(per="token")
        def bad(q, k):
            return tw.dot(q @ [[1.0]] * 0.0 + 1.0, k @ [[1.0]])  # <proj-keys>
    assert "token_summary" in _hint(info)


def test_position_outside_a_score() -> None:
    with raises_at(errors.ExprTypeError, "pos-summary"):
        @tw.page_summary
        def bad(k):
            return dict(x=tw.max(k, axis=0) + tw.position())  # <pos-summary>


def test_top_p_over_a_plain_function_is_short() -> None:
    def forgot_the_decorator(q, k):
        return tw.dot(q, k)
    with raises_at(errors.StructureError, "top-p-fn") as info:
        tw.top_p(forgot_the_decorator, 0.9)  # <top-p-fn>
    assert "@tw.score" in _hint(info) and "<function" not in str(info.value)


def test_top_p_of_a_score_with_a_bad_p() -> None:
    with raises_at(errors.BudgetError, "top-p-score"):
        tw.top_p(dot_score, 1.5)  # <top-p-score>


def test_selector_estimate_needs_a_key_score() -> None:
    with raises_at(errors.StructureError, "sel-est"):
        tw.top_k(tw.builtins.quest, 64, estimate=tw.quantized_keys(4))  # <sel-est>


def test_mean_value_needs_a_token_selector() -> None:
    with pytest.raises(errors.StructureError, match="mean_value"):
        tw.Pipeline(select=tw.top_k(tw.builtins.quest, 64),
                    attend=tw.attention(mean_value=True))


def test_projection_matrix_checked_against_the_shape() -> None:
    pipe = tw.builtins.loki(torch.randn(3, 16, 4), budget=8)
    with pytest.raises(errors.ExprTypeError, match="expected \\[16, R\\] or \\[2, 16, R\\]"):
        make_cache(pipe, 2, 16)
