"""Where a loaded pipeline runs dense attention: the fallbacks against exact attention, the
threshold from the tuning log (per layer too), the kernel cache holding the fallback's kernels,
and the crossover rule."""

from __future__ import annotations

import warnings

import pytest
import torch

import twilight as tw
from twilight import knobs
from twilight.errors import InputError
from twilight.runtime.serving import load as load_mod
from twilight.runtime.serving.dense import KernelDense, SdpaDense, dense_ir, parse_kind
from twilight.runtime.store import tuning_log
from twilight.runtime.store.kernel_cache import CacheMissError, KernelCache
from twilight.runtime.tuning.crossover import crossover_point, ladder

PIPE = tw.builtins.quest_twilight(budget=64, p=0.9)
SHAPE = tw.Shape(8, 2, 32, 16, "float32")
LENGTHS = (300, 77, 1)


@pytest.fixture
def env(tmp_path):
    with knobs.scope(cache_dir=tmp_path / "cache", tuning_logs=tmp_path / "logs",
                     disable_compile=None):
        yield tmp_path


def load(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", load_mod.DefaultScheduleWarning)
        return tw.load(PIPE, shape=SHAPE, backend="tvm", **kw)


@pytest.fixture
def filled(fill_cache):
    f = fill_cache(PIPE, 2, 32, LENGTHS, seed=3)
    return f, f.query(8, seed=4)


@pytest.mark.parametrize("kind", ["kernels", "sdpa:float32", "sdpa:bfloat16"])
def test_every_fallback_is_exact_dense_attention(env, filled, dense_attention, kind):
    f, q = filled
    dp = load(dense_below=10_000, dense=kind).plan(len(LENGTHS), 512)
    assert dp.runs_dense(300) and dp.dense.kind == kind
    out, (idx, cnt) = dp.run(q, f.cache, f.ids, return_lists=True)
    want = dense_attention(q, f.keys, f.values)
    tol = 2e-2 if kind.endswith("bfloat16") else 1e-5
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    assert cnt.tolist() == [[n] * 8 for n in LENGTHS]  # every token, every head
    for b, n in enumerate(LENGTHS):
        assert idx[b, :, :n].tolist() == [list(range(n))] * 8


@pytest.mark.parametrize("kind", ["kernels", "sdpa:float32"])
@pytest.mark.parametrize("pipe", [tw.builtins.sparq(r=8, budget=32),
                                  tw.builtins.loki(torch.linalg.qr(torch.randn(
                                      32, 8, generator=torch.Generator().manual_seed(7)))[0],
                                      budget=32)], ids=["sparq", "loki"])
def test_fallback_of_mean_value_and_token_summary_pipelines_is_exact(env, fill_cache,
                                                                     dense_attention, pipe, kind):
    """Below the crossover SparQ's mean-value reallocation has nothing to reallocate (every
    token kept) and Loki's token summaries are not read: exact attention either way."""
    f = fill_cache(pipe, 2, 32, LENGTHS, seed=5)
    q = f.query(8, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", load_mod.DefaultScheduleWarning)
        dp = tw.load(pipe, shape=SHAPE, backend="tvm", dense_below=10_000, dense=kind)
    out = dp.plan(len(LENGTHS), 512).run(q, f.cache, f.ids)
    torch.testing.assert_close(out.double(), dense_attention(q, f.keys, f.values),
                               atol=1e-5, rtol=1e-5)


def test_threshold_switches_between_dense_and_the_pipeline(env, filled, dense_attention):
    f, q = filled
    sparse = load().plan(3, 512).run(q, f.cache, f.ids)
    dp = load(dense_below=301, dense="sdpa:float32")  # the longest request holds 300
    torch.testing.assert_close(dp.run(q, f.cache, f.ids).double(),
                               dense_attention(q, f.keys, f.values), atol=1e-5, rtol=1e-5)
    dp = load(dense_below=300, dense="sdpa:float32")
    assert not dp.runs_dense(300)
    torch.testing.assert_close(dp.run(q, f.cache, f.ids), sparse)
    assert torch.equal(load(dense_below=0).run(q, f.cache, f.ids), sparse)


def test_threshold_follows_the_cache_as_it_grows(env, filled):
    f, q = filled
    dp = load(dense_below=302, dense="sdpa:float32")
    dense_out = dp.run(q, f.cache, f.ids)
    f.cache.append(torch.randn(2, 1, 32), torch.randn(2, 1, 32), f.ids[0])  # 301 tokens
    assert dp.runs_dense(f.cache.longest(f.ids))
    f.cache.append(torch.randn(2, 1, 32), torch.randn(2, 1, 32), f.ids[0])  # 302: sparse now
    assert not dp.runs_dense(f.cache.longest(f.ids))
    assert dp.run(q, f.cache, f.ids).shape == dense_out.shape


def _log(root, rec_extra: dict, schedule=None):
    tuning_log.write_entry(root, "cpu", PIPE.ir.name, {
        "pipeline_key": PIPE.ir.key(), "backend": "tvm", "target": "llvm",
        "shape": tuning_log.shape_dict(SHAPE), "measured": True,
        "buckets": [{"bucket": "b3_t512", "batch": 3, "context": 512,
                     "schedule": schedule or {}, **rec_extra}]})


def test_load_reads_the_threshold_and_its_implementation_from_the_tuning_log(env):
    _log(env / "logs", {"dense_below": 1024, "dense_impl": "sdpa:float32",
                        "dense_below_layers": {"2": 4096, "15": 0}})
    dp = load(batch=3, context=512)
    assert dp.dense_below == 1024 and isinstance(dp.dense, SdpaDense)
    assert dp.dense_below_layers == {2: 4096, 15: 0}
    assert load(batch=3, context=512, layer=2).dense_below == 4096
    assert load(batch=3, context=512, layer=15).dense_below == 0
    assert load(batch=3, context=512, layer=7).dense_below == 1024  # no figure: the layout's
    assert load(batch=3, context=512, dense_below=0).dense is None
    assert load(schedule={}).dense_below == 0  # a given schedule: nothing was measured for it


def test_kernel_fallback_goes_through_the_kernel_cache(env, filled):
    f, q = filled
    _log(env / "logs", {"dense_below": 1024, "dense_impl": "kernels"})
    first = load(batch=3, context=512)
    assert isinstance(first.dense, KernelDense)
    want = first.run(q, f.cache, f.ids)
    cache = KernelCache(env / "cache")
    with knobs.scope(disable_compile=True):  # both the pipeline and its fallback are cached
        warm = load(batch=3, context=512, cache=cache)
        torch.testing.assert_close(warm.run(q, f.cache, f.ids), want)
    with knobs.scope(disable_compile=True, cache_dir=env / "empty"), \
            pytest.raises(CacheMissError):
        load(batch=3, context=512, cache=KernelCache(env / "empty"), schedule={},
             dense_below=100, dense="kernels")


def test_dense_ir_keeps_the_pipelines_attention():
    p = tw.builtins.quest_twilight(budget=64).ir
    capped = type(p.attend)(scale=0.2, softcap=30.0)
    d = dense_ir(type(p)(p.name, 32, p.select, p.prune, p.keep, capped))
    assert d.page_size == 32 and d.attend.scale == 0.2 and d.attend.softcap == 30.0
    assert d.select is None and not d.prune and d.name == "dense"


def test_bad_dense_settings_are_refused(env):
    with pytest.raises(ValueError, match="dense implementation 'sdpa:int8'"):
        parse_kind("sdpa:int8")
    for bad in (-1, 2.5, True):
        with pytest.raises(InputError, match=f"dense_below: expected a whole number.*{bad}"):
            load(dense_below=bad)


def test_crossover_rule():
    assert ladder(2048) == [128, 256, 512, 1024, 2048]
    assert ladder(3000) == [128, 256, 512, 1024, 2048, 3000]
    assert ladder(100) == [100]
    c = [128, 256, 512, 1024]
    assert crossover_point(c, [1, 1, 1, 1], [2, 2, 2, 2]) == 0  # the pipeline always wins
    assert crossover_point(c, [5, 5, 5, 5], [1, 2, 3, 4]) == 1025  # it never wins
    # dense wins at 256 (3 vs 2), the pipeline at 512 (3 vs 5): they cross at 256 + 256/3
    assert crossover_point(c, [3, 3, 3, 3], [1, 2, 5, 9]) == 352
    # a noisy win at 128 does not count: the last loss decides
    assert crossover_point(c, [1, 3, 3, 3], [2, 2, 5, 9]) == 352
