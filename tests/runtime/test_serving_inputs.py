"""The serving boundary on the reference and both backends (TVM llvm, Triton interpreted):
the non-finite policy (``runtime/serving/checks.py``), a cache of another layout or pipeline,
empty batches, request ids and ``plan`` arguments — each one clear ``InputError`` line."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import twilight as tw
from twilight import knobs
from twilight.runtime.serving import decode_pipeline as decode_mod
from twilight.runtime.serving import load as load_mod
from twilight.runtime.serving.pipeline_cache import make_cache

PIPE = tw.builtins.quest_twilight(budget=32, page_size=4)
SHAPE = tw.Shape(4, 2, 8, 4, "float32")
BACKENDS = ["reference", "tvm", "triton"]


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    with knobs.scope(cache_dir=tmp_path_factory.mktemp("kernels"), tuning_logs=None):
        yield


def _load(backend: str, pipe=PIPE, shape=SHAPE):
    if backend == "triton":
        from twilight.compiler.triton import loader
        if not loader.interpreter_ready():
            pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", load_mod.DefaultScheduleWarning)
        return tw.load(pipe, shape=shape, backend=backend,
                       target="interpret" if backend == "triton" else None)


@pytest.fixture(scope="module", params=BACKENDS)
def runner(request, kernel_dir):
    """``run(q, cache, req=None)`` of PIPE on one backend (the reference's executor too)."""
    if request.param == "reference":
        return tw.reference(PIPE).run
    return _load(request.param).run


def _cache(pipe=PIPE, hkv=2, d=8, dtype=torch.float32, lengths=(9, 14, 6), seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache(pipe, hkv, d, dtype=dtype, initial_pages=2)
    for n in lengths:
        rid = cache.add_request()
        cache.append(torch.randn(hkv, n, d, generator=gen).to(dtype),
                     torch.randn(hkv, n, d, generator=gen).to(dtype), rid)
    return cache


def _q(b: int, seed: int = 1, hq: int = 4, d: int = 8) -> torch.Tensor:
    return torch.randn(b, hq, d, generator=torch.Generator().manual_seed(seed))


# ---- non-finite values -----------------------------------------------------------------------
@pytest.mark.parametrize("bad, kind", [(float("nan"), "NaN"), (float("inf"), "inf"),
                                       (-float("inf"), "inf")])
def test_non_finite_query_names_request_and_head(runner, bad, kind) -> None:
    cache = _cache()
    cache.free_request(1)  # live ids 0 and 2: row b of q is request req[b], not b
    q = _q(2)
    q[0, 3, 5] = bad
    with pytest.raises(tw.NonFiniteInputError,
                       match=rf"^q: request 2, query head 3 holds {kind}; ") as info:
        runner(q, cache, [2, 0])
    assert "\n" not in str(info.value)
    q[1, 0, 0] = bad
    with pytest.raises(tw.NonFiniteInputError, match="and 1 more"):
        runner(q, cache, [2, 0])


def test_finite_answers_agree_after_a_refused_append(runner) -> None:
    cache = _cache()
    k = torch.randn(2, 3, 8)
    k[1, 2, 0] = float("nan")
    with pytest.raises(tw.NonFiniteInputError, match="k: request 1, KV head 1, token position 16"):
        cache.append(k, torch.randn(2, 3, 8), 1)
    q = _q(3)
    out = runner(q, cache)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, tw.reference(PIPE).run(q, cache), atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", ["tvm", "triton"])
def test_the_backends_own_run_applies_the_policy_too(backend, kernel_dir) -> None:
    compiled = _load(backend).compiled  # what get_backend(...).lower(...) returns
    cache, q = _cache(), _q(3)
    q[2, 1, 4] = float("inf")
    with pytest.raises(tw.NonFiniteInputError, match="^q: request 2, query head 1 holds inf"):
        compiled.run(q, cache)


def test_the_knob_turns_the_query_check_off_for_serving(kernel_dir) -> None:
    dp = _load("tvm")
    cache, q = _cache(), _q(3)
    q[1, 2, 0] = float("nan")
    with knobs.scope(check_finite=False):
        dp.run(q, cache)  # unspecified output, no error: the check was skipped
    with knobs.scope(check_finite=True), pytest.raises(tw.NonFiniteInputError):
        dp.run(q, cache)
    with knobs.scope(check_finite=False), pytest.raises(tw.NonFiniteInputError):
        tw.reference(PIPE).run(q, cache)  # the reference always checks


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_head_with_nothing_kept_is_exactly_zero(backend, kernel_dir) -> None:
    """The one zero by design: nothing selected and no keep rule, or an empty request."""
    nothing = tw.Pipeline(select=tw.nothing(), page_size=4, name="nothing")
    for pipe, lengths, row in ((nothing, (9, 14, 6), slice(None)), (PIPE, (9, 0, 6), 1)):
        run = tw.reference(pipe).run if backend == "reference" else _load(backend, pipe).run
        out = run(_q(3), _cache(pipe, lengths=lengths))
        assert torch.equal(out[row], torch.zeros_like(out[row]))
        if pipe is PIPE:  # the other requests attend as usual
            assert (out[[0, 2]].abs().amax(-1) > 0).all()


# ---- a cache of another layout or pipeline -----------------------------------------------------
LAYOUTS = {
    "dtype": (lambda: _cache(dtype=torch.float16), "dtype torch.float16"),
    "heads": (lambda: _cache(hkv=1), "num_kv_heads 1"),
    "head_dim": (lambda: _cache(d=16), "head_dim 16"),
    "page_size": (lambda: _cache(tw.builtins.quest_twilight(32, page_size=8)), "page_size 8"),
    "dense": (lambda: _cache(tw.Pipeline(page_size=4)), "keeps no summary 'minmax.kmin'"),
    "codes": (lambda: _cache(tw.builtins.quest_twilight(32, page_size=4, granularity="token")),
              "keeps no int4_page key codes"),
}


@pytest.mark.parametrize("what", LAYOUTS)
def test_a_cache_of_another_layout_is_one_line(runner, what) -> None:
    make, says = LAYOUTS[what]
    cache = make()
    if runner.__self__.__class__.__name__ == "ReferenceExecutor" and what in (
            "dtype", "heads", "head_dim"):
        pytest.skip("the reference runs any dtype and head layout (q decides)")
    with pytest.raises(tw.InputError, match=r"^cache: .*" + says) as info:
        runner(_q(3), cache)
    assert "\n" not in str(info.value)


@tw.page_summary
def minmax(k):  # Quest's summary's name, other expressions
    return dict(kmin=tw.mean(k, axis=0), kmax=tw.absmax(k, axis=0))


@tw.score(per="page", summary=minmax)
def other(q, page):
    return tw.sum(q * page.kmin)


def test_a_same_named_summary_of_another_expression_is_refused(runner) -> None:
    impostor = tw.Pipeline(select=tw.top_k(other, tw.tokens(32)),
                           prune=tw.top_p(0.9, estimate=tw.quantized_keys(4, "page")),
                           page_size=4)
    with pytest.raises(tw.InputError, match="summary 'minmax.kmin' was made by another"):
        runner(_q(3), _cache(impostor))


def test_the_layout_is_checked_once_per_cache(kernel_dir, monkeypatch) -> None:
    dp = _load("tvm")
    calls = []
    real = decode_mod.check_cache
    monkeypatch.setattr(decode_mod, "check_cache", lambda *a: calls.append(1) or real(*a))
    a, b = _cache(), _cache(seed=3)
    for cache in (a, a, a, b, b):
        dp.run(_q(3), cache)
    assert len(calls) == 2


# ---- requests and plan() -------------------------------------------------------------------------
def test_an_empty_batch_is_refused(runner) -> None:
    cache = _cache()
    with pytest.raises(tw.InputError, match="^req: no requests to run"):
        runner(_q(0), cache, [])
    for rid in cache.request_ids:
        cache.free_request(rid)
    with pytest.raises(tw.InputError, match="^req: no requests to run"):
        runner(_q(0), cache)


def test_request_ids_of_any_integer_type(runner) -> None:
    cache, q = _cache(), _q(2)
    want = runner(q, cache, [2, 0])
    for req in (np.array([2, 0]), torch.tensor([2, 0]), [np.int64(2), torch.tensor(0)]):
        torch.testing.assert_close(runner(q, cache, req), want, atol=0, rtol=0)
    for bad in ([2.0, 0], [True, 0], [7, 0], "20"):
        with pytest.raises(tw.InputError, match="unknown request id"):
            runner(q, cache, bad)


@pytest.mark.parametrize("args", [(2.5, 100), (True, 100), (0, 100), (1, -5), ("1", 100),
                                  (1, 1e4)])
def test_plan_takes_whole_positive_numbers(args, kernel_dir) -> None:
    with pytest.raises(tw.InputError, match="^plan: "):
        _load("tvm").plan(*args)


def test_plan_and_load_bound_the_context(kernel_dir) -> None:
    with pytest.raises(tw.InputError, match="^plan: batch and max_context must be whole numbers "
                       "from 1 to 2147483647, got 1, 2147483648"):
        _load("tvm").plan(1, 2**31)
    with pytest.raises(tw.InputError, match="^load: .*batch"):
        tw.load(PIPE, shape=SHAPE, backend="tvm", batch=2.5)


@pytest.mark.parametrize("what", [None, 3, tw.sink(4), tw.builtins.ds_twilight()])
def test_something_that_is_not_a_pipeline_is_one_line(what) -> None:
    for call in (lambda: tw.load(what, shape=SHAPE), lambda: tw.reference(what),
                 lambda: make_cache(what, 2, 8)):
        with pytest.raises(tw.InputError, match="expected a tw.Pipeline|calibrat") as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("device", ["banana", "cuda:0"])
def test_a_device_that_is_not_here_is_one_line(device) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(tw.InputError, match=f"^PagedKVCache: device='{device}'"):
        make_cache(PIPE, 2, 8, device=device)


def test_plan_accepts_numpy_integers(kernel_dir) -> None:
    dp = _load("tvm").plan(np.int64(3), np.int32(64))
    dp.run(_q(3), _cache())


@pytest.mark.parametrize("q", [None, np.zeros((3, 4, 8), np.float32), torch.zeros(3, 4, 8,
                                                                                  dtype=torch.int32)])
def test_a_query_that_is_not_a_float_tensor_is_one_line(runner, q) -> None:
    with pytest.raises(tw.InputError, match="^q: "):
        runner(q, _cache())
