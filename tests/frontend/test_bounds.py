"""Bounds and misuse caught where the DSL is written: the documented limits of ``compiler.ir``
(int32 token counts, page sizes, head layouts), a selector passed as a pruner, a keep-only
pipeline. Each error names this file's offending line (tagged ``# <tag>``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import twilight as tw
from twilight import errors
from twilight.compiler import ir
from twilight.runtime.serving.paged_cache import PagedKVCache

HERE = Path(__file__)
LINES = HERE.read_text().splitlines()
B = tw.builtins
M = ir.MAX_TOKENS


def raises_at(cls: type, tag: str):
    """``pytest.raises(cls)`` whose error names the line tagged ``tag`` and quotes it."""
    line = next(i for i, t in enumerate(LINES, 1) if t.rstrip().endswith(f"# <{tag}>"))

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(cls)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            done = self.ctx.__exit__(*exc)
            msg = str(self.info.value)
            assert f"{HERE.name}:{line}:" in msg, msg
            assert LINES[line - 1].strip() in msg
            assert "\n" not in self.info.value.message  # the diagnosis is one line
            return done
    return _Check()


# ---- int32 token counts ------------------------------------------------------------------------
def test_budget_past_int32_is_refused_at_the_line() -> None:
    with raises_at(errors.BudgetError, "oracle-2**31"):
        B.oracle_top_k(budget=2**31)  # <oracle-2**31>
    with raises_at(errors.BudgetError, "tokens-2**31"):
        tw.tokens(M + 1)  # <tokens-2**31>


def test_sink_and_window_past_int32_are_refused_at_the_line() -> None:
    with raises_at(errors.BudgetError, "sink-2**40"):
        B.streaming(sink_tokens=2**40)  # <sink-2**40>
    with raises_at(errors.BudgetError, "window-2**31"):
        tw.window(2**31)  # <window-2**31>


def test_the_limits_themselves_are_accepted() -> None:
    assert B.oracle_top_k(budget=M).ir.select.budget.value == M
    assert B.streaming(M, M).ir.keep == ir.Keep(M, M)
    assert tw.Pipeline(page_size=ir.MAX_PAGE_SIZE).ir.page_size == ir.MAX_PAGE_SIZE


@pytest.mark.parametrize("bad", [True, 0.5, -1, 0, None, "8", float("nan")])
def test_tokens_takes_whole_positive_numbers_only(bad) -> None:
    with raises_at(errors.BudgetError, "tokens-bad"):
        tw.tokens(bad)  # <tokens-bad>


@pytest.mark.parametrize("bad", [True, False, float("nan"), 0, 1.5, "0.5"])
def test_fraction_refuses_bools_and_out_of_range(bad) -> None:
    with raises_at(errors.BudgetError, "fraction-bad"):
        tw.fraction(bad)  # <fraction-bad>


@pytest.mark.parametrize("kw", [dict(scale=True), dict(softcap=True)])
def test_attention_refuses_bools(kw) -> None:
    with raises_at(errors.BudgetError, "attention-bool"):
        tw.attention(**kw)  # <attention-bool>


# ---- pages, groups, Double Sparsity's r --------------------------------------------------------
@pytest.mark.parametrize("ps", [2**20, 2048, 24, 0, -16, True, 16.0])
def test_page_size_outside_the_limits_is_refused_at_the_line(ps) -> None:
    with raises_at(errors.StructureError, "page-size"):
        tw.Pipeline(page_size=ps)  # <page-size>


@pytest.mark.parametrize("bits", [4.0, True, 3])
def test_key_code_bits_are_whole_numbers(bits) -> None:
    with raises_at(errors.StructureError, "bits"):
        tw.quantized_keys(bits)  # <bits>


def test_group_of_too_many_pages_is_refused() -> None:
    with raises_at(errors.StructureError, "group-pages"):
        tw.quantized_keys(4, "group", pages=2 * ir.MAX_GROUP_PAGES)  # <group-pages>


@pytest.mark.parametrize("r", [0, -3, True, 2.5, 2**20])
def test_double_sparsity_r_is_checked_where_written(r) -> None:
    with raises_at(errors.ChannelIndexError, "ds-r"):
        B.ds_twilight(r=r)  # <ds-r>
    with raises_at(errors.ChannelIndexError, "dst-r"):
        B.double_sparsity(r=r)  # <dst-r>


def test_calibration_errors_are_input_errors() -> None:
    q, k = torch.randn(4, 4, 8), torch.randn(2, 10, 8)
    with pytest.raises(tw.InputError, match="r=9"):
        B.calibrate_channels(q, k, r=9)  # more channels than head_dim
    with pytest.raises(tw.InputError, match="mode='x'"):
        B.calibrate_channels(q, k, r=4, mode="x")
    with pytest.raises(tw.NonFiniteInputError):
        B.calibrate_channels(q, k.index_fill(1, torch.tensor([3]), float("nan")), r=4)


# ---- misuse --------------------------------------------------------------------------------------
def test_selector_passed_as_pruner_is_refused_at_the_line() -> None:
    with raises_at(errors.StructureError, "prune-selector") as info:
        tw.Pipeline(prune=tw.top_k(B.oracle, 64))  # <prune-selector>
    assert "select=" in info.value.hint
    with raises_at(errors.StructureError, "prune-in-list"):
        tw.Pipeline(prune=[tw.top_p(0.9), tw.top_k(B.oracle, 64)])  # <prune-in-list>


@pytest.mark.parametrize("kw", [dict(prune=3), dict(prune="top_p"), dict(keep=4),
                                dict(attend=tw.sink(2)), dict(name=7), dict(name=" ")])
def test_wrong_parts_are_refused_at_the_line(kw) -> None:
    with raises_at(errors.StructureError, "wrong-part"):
        tw.Pipeline(select=tw.top_k(B.oracle, 8), **kw)  # <wrong-part>


def test_keep_only_pipeline_is_refused_with_the_streaming_hint() -> None:
    with raises_at(errors.StructureError, "keep-only") as info:
        tw.Pipeline(keep=tw.sink(4) | tw.window(64))  # <keep-only>
    assert "tw.nothing()" in info.value.hint


def test_keep_with_a_pruner_or_a_selector_still_means_always_keep() -> None:
    pruned = tw.Pipeline(prune=tw.top_p(0.9), keep=tw.sink(4))  # dense candidates, pruned
    assert pruned.ir.select is None and pruned.ir.keep.sink == 4
    assert tw.Pipeline(select=tw.nothing(), keep=tw.window(8)).ir.keep.window == 8
    assert tw.Pipeline(keep=tw.sink(0)).ir.select is None  # keeps nothing extra: dense


# ---- Shape and cache construction ----------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    (dict(kv_heads=0), "kv_heads"), (dict(head_dim=0), "head_dim"), (dict(head_dim=-64), "head_dim"),
    (dict(q_heads="x"), "q_heads"), (dict(q_heads=3, kv_heads=2), "multiple"),
    (dict(dtype="fp16"), "dtype"), (dict(dtype="int8"), "dtype"), (dict(dtype=torch.float16), "dtype"),
    (dict(page_size=24), "page_size"), (dict(page_size=2**20), "page_size"),
    (dict(head_dim=True), "head_dim"), (dict(q_heads=4.0), "q_heads"),
])
def test_shape_is_checked_when_made(kw, field) -> None:
    args = dict(q_heads=4, kv_heads=2, head_dim=64, page_size=16, dtype="float16") | kw
    with pytest.raises(tw.InputError, match=f"^Shape: .*{field}") as info:
        tw.Shape(**args)
    assert "\n" not in str(info.value)


def test_shape_takes_numpy_integers_as_ints() -> None:
    s = tw.Shape(np.int64(4), np.int32(2), np.int64(64), np.int16(16))
    assert s == tw.Shape(4, 2, 64, 16) and type(s.q_heads) is int
    assert ir.content_key(s) == ir.content_key(tw.Shape(4, 2, 64, 16))


def test_page_size_hint_only_ever_names_a_valid_page_size() -> None:
    p = B.quest_top_k(page_size=16).ir
    with pytest.raises(tw.PipelineError) as info:
        tw.verify(p, tw.Shape(8, 4, 64, 8))
    assert info.value.hint == "pass page_size=8 to tw.Pipeline(...)"
    tw.Pipeline(page_size=8)  # what the hint says works


@pytest.mark.parametrize("kw", [dict(page_size=2**20), dict(page_size=24), dict(head_dim=0),
                                dict(initial_pages=0), dict(num_kv_heads=2.0),
                                dict(dtype=torch.int8)])
def test_cache_construction_errors_are_input_errors(kw) -> None:
    args = dict(num_kv_heads=2, head_dim=8, page_size=16) | kw
    with pytest.raises(tw.InputError, match="^PagedKVCache: "):
        PagedKVCache(args.pop("num_kv_heads"), args.pop("head_dim"), **args)


def test_a_cache_too_large_to_allocate_is_one_line() -> None:
    with pytest.raises(tw.InputError, match=r"^PagedKVCache: 4194304 pages \(131072.0 GiB of K "
                       r"and V\): could not be allocated \(.*\); ask for fewer initial_pages"):
        PagedKVCache(8, 1024, page_size=1024, initial_pages=2**22)  # 2^47 bytes
