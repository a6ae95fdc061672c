"""Bad arguments to the Python API are one clear ``TwilightError`` naming the argument:
``tw.Shape``, ``tw.load`` (backend, target, device, a pipeline named by a string) and
``plan``. Never a raw ``TypeError``/``KeyError`` from deep inside, never silent acceptance."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import twilight as tw
from twilight import knobs
from twilight.errors import InputError, TwilightError
from twilight.runtime.serving import load as load_mod

SHAPE = tw.Shape(4, 2, 32, 16, "float32")


@pytest.fixture
def env(tmp_path):
    with knobs.scope(cache_dir=tmp_path / "cache", tuning_logs=tmp_path / "logs",
                     disable_compile=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", load_mod.DefaultScheduleWarning)
            yield tmp_path


@pytest.mark.parametrize("args, match", [
    ((0, 1, 64), "q_heads=0"),
    ((4, 0, 64), "kv_heads=0"),
    ((4, 2, -64), "head_dim=-64"),
    ((4, 2, 64, 0), "page_size=0"),
    ((4.0, 2, 64), "q_heads=4.0"),
    ((True, 1, 64), "q_heads=True"),
    ((4, 2, 64, 16, "fp16"), "dtype='fp16'; expected one of float16, bfloat16, float32"),
    ((4, 2, 64, 16, "int8"), "dtype='int8'"),
])
def test_shape_refuses_what_no_kernel_is_built_for(args, match):
    with pytest.raises(InputError, match=match):
        tw.Shape(*args)


@settings(max_examples=60, deadline=None)
@given(st.tuples(*[st.one_of(st.integers(-3, 300), st.floats(allow_nan=True), st.text(max_size=3),
                             st.none(), st.booleans())] * 4),
       st.one_of(st.sampled_from(["float16", "bfloat16", "float32"]), st.text(max_size=8)))
def test_shape_is_valid_or_a_clear_error(fields, dtype):
    try:
        shape = tw.Shape(*fields, dtype)
    except InputError as e:
        assert str(e).startswith("Shape: ") and "expected" in str(e)
        return
    assert all(isinstance(v, int) and v >= 1 for v in fields[:4])
    assert (shape.q_heads, shape.kv_heads, shape.head_dim, shape.page_size) == fields
    assert shape.dtype == dtype


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="cuda"), "unknown backend 'cuda'; known: "),
    (dict(target="cuda:sm_90"), "needs a CUDA GPU and this machine has none"),
    (dict(target="banana"), "target='banana': unknown target"),
    (dict(backend="tvm", target="interpret"), r"tvm backend does not run on cpu \(interpret\)"),
    (dict(device="h100"), "device 'h100': this machine has"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(shape=None), "pass shape=tw.Shape"),
    (dict(shape=(4, 2, 32)), "pass shape=tw.Shape"),
    (dict(batch=0), "batch=0"),
    (dict(context=2.5), "context=2.5"),
])
def test_load_names_the_bad_argument(env, kwargs, match):
    if torch.cuda.is_available() and "CUDA GPU" in match:
        pytest.skip("this machine has a GPU")
    kwargs = {"shape": SHAPE, **kwargs}
    with pytest.raises(TwilightError, match=match):
        tw.load(tw.builtins.quest_top_k(budget=64), **kwargs)


def test_load_takes_a_pipeline_named_like_the_command_line(env):
    loaded = tw.load("quest_top_k(budget=64)", shape=SHAPE, backend="tvm")
    assert loaded.ir == tw.builtins.quest_top_k(budget=64).ir
    with pytest.raises(TwilightError, match="unknown pipeline 'nope'"):
        tw.load("nope", shape=SHAPE)
    with pytest.raises(InputError, match="ds_twilight needs calibration data first"):
        tw.load("ds_twilight", shape=SHAPE)
    with pytest.raises(InputError, match="expected a tw.Pipeline .* got a int"):
        tw.load(3, shape=SHAPE)


@pytest.mark.parametrize("batch, context", [(2.5, 64), (1, 0), (0, 64), (True, 64), ("1", 64)])
def test_plan_wants_whole_positive_numbers(env, batch, context):
    loaded = tw.load(tw.builtins.quest_top_k(budget=64), shape=SHAPE, backend="tvm")
    with pytest.raises(InputError, match="plan: batch and max_context must be whole numbers"):
        loaded.plan(batch, context)
