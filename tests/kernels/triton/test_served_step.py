"""A served decode step on the Triton backend, as a GPU would run it (here: the interpreter):

* ``DecodePipeline.run`` reads nothing back from the device — no ``.item()``, ``int(t)``,
  ``bool(t)``, ``.tolist()`` or host tensor built from Python data — so a CUDA graph can
  capture a step (context growth is the cache's host bookkeeping: ``PagedKVCache.longest``);
* ``PagedKVCache.append`` runs through the pipeline's generated append kernels
  (``refresh_*``) and leaves exactly what the torch append leaves.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

import twilight as tw
from twilight import knobs
from twilight.compiler.triton.pipeline import TritonCompiled
from twilight.runtime.serving.load import DefaultScheduleWarning

READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu",
         "tensor"}


class HostReads(TorchFunctionMode):
    """Records every torch call that reads a tensor's data on the host (a device sync on a
    GPU) or builds a tensor from Python data (a host-to-device copy)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def kernels_unobserved(monkeypatch):
    """Kernel launches run outside the spy: the interpreter reads tensors on the host to
    emulate the GPU; a real launch does not."""
    launch = TritonCompiled._launch

    def quiet(self, *a, **k):
        with torch._C.DisableTorchFunction():
            return launch(self, *a, **k)
    monkeypatch.setattr(TritonCompiled, "_launch", quiet)


def _load(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefaultScheduleWarning)
        return tw.load(tw.builtins.quest_twilight(budget=48, p=0.9),
                       shape=tw.Shape(4, 2, 32, 16, "float16"), backend="triton",
                       target="interpret", **kw)


def _decode(dp, generated: bool, steps: int = 2):
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).half()  # noqa: E731
    cache = dp.make_cache(initial_pages=4, generated_append=generated)
    ids = cache.add_requests(2)
    cache.append(rnd(2, 2, 61, 32), rnd(2, 2, 61, 32), ids)
    outs = []
    dp.plan(2, 128)
    for _ in range(steps):
        cache.append(rnd(2, 2, 1, 32), rnd(2, 2, 1, 32), ids)
        outs.append(dp.run(rnd(2, 4, 32), cache, ids))
    return cache, ids, outs


@pytest.mark.parametrize("dense", [None, "sdpa:float32", "kernels"])
def test_a_step_reads_nothing_back_from_the_device(kernels_unobserved, dense):
    dp = _load(dense_below=10_000 if dense else 0, dense=dense)
    cache, ids, _ = _decode(dp, generated=True)
    q = torch.randn(2, 4, 32).half()
    with knobs.scope(check_finite=False), HostReads() as spy:  # what a captured step runs
        dp.run(q, cache, ids)
        cache_len = cache.longest(ids)
    assert spy.seen == [] and cache_len == 63


def test_the_query_finite_check_is_a_steps_one_host_read(kernels_unobserved):
    """``TWILIGHT_CHECK_FINITE`` (on by default) reads one scalar back per step, as its
    documentation says; nothing else in the step does."""
    dp = _load()
    cache, ids, _ = _decode(dp, generated=True)
    with HostReads() as spy:
        dp.run(torch.randn(2, 4, 32).half(), cache, ids)
    assert spy.seen == ["item"]


def test_append_runs_the_generated_kernels_bit_exactly(monkeypatch):
    dp = _load()
    calls = []
    for name in ("refresh_pages", "refresh_tokens", "refresh_groups"):
        orig = getattr(TritonCompiled, name)
        monkeypatch.setattr(TritonCompiled, name, lambda self, *a, _o=orig, _n=name, **k: (
            calls.append(_n), _o(self, *a, **k))[1])
    ours, _, out_ours = _decode(dp, generated=True)
    assert "refresh_pages" in calls and ours.appender is not None
    torch_cache, _, out_torch = _decode(dp, generated=False)
    assert torch_cache.appender is None
    for name, t in torch_cache.summaries.items():
        assert torch.equal(ours.summaries[name], t), name
    for spec, codes in torch_cache.key_codes.items():
        for mine, want in zip(ours.key_codes[spec].tensors(), codes.tensors(), strict=True):
            assert torch.equal(mine, want), spec
    for a, b in zip(out_ours, out_torch, strict=True):
        assert torch.equal(a, b)


def test_generated_append_keeps_token_summaries_and_the_v_sum():
    """Loki's per-token projections through ``refresh_tokens``, SparQ's running V sum in torch
    beside it: the same cache, and the same step outputs, as the torch append."""
    proj = torch.linalg.qr(torch.randn(32, 8, generator=torch.Generator().manual_seed(1)))[0]
    both = tw.Pipeline(select=tw.top_k(tw.builtins.loki_score(proj), 48, group="none"),
                       attend=tw.attention(mean_value=True), name="loki_mean_value")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefaultScheduleWarning)
        dp = tw.load(both, shape=tw.Shape(4, 2, 32, 16, "float16"), backend="triton",
                     target="interpret")
    ours, _, out_ours = _decode(dp, generated=True)
    torch_cache, _, out_torch = _decode(dp, generated=False)
    assert ours.appender is not None and torch_cache.appender is None
    assert ours.token_summaries and ours.v_sum is not None
    for name, t in torch_cache.token_summaries.items():
        torch.testing.assert_close(ours.token_summaries[name], t, atol=0, rtol=1e-3)
    assert torch.equal(ours.v_sum, torch_cache.v_sum)
    for a, b in zip(out_ours, out_torch, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_a_copied_cache_shares_its_kernels_not_its_data():
    import copy
    dp = _load()
    cache, ids, _ = _decode(dp, generated=True, steps=1)
    twin = copy.deepcopy(cache)
    assert twin.appender is cache.appender and twin.k_pages is not cache.k_pages
    spec = next(iter(cache.key_codes))
    assert twin.key_codes[spec].lo is twin.summaries[cache.minmax_summaries[0]]  # still linked
    before = cache.summaries[cache.minmax_summaries[0]].clone()
    twin.append(torch.ones(2, 2, 1, 32).half() * 9, torch.ones(2, 2, 1, 32).half(), ids)
    assert torch.equal(cache.summaries[cache.minmax_summaries[0]], before)
    assert twin.longest(ids) == cache.longest(ids) + 1
