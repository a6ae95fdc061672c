"""``torch.ops.twilight.decode``: eager, under ``torch.compile(fullgraph=True)``, and opcheck."""

from __future__ import annotations

import warnings

import pytest
import torch

import twilight as tw
from twilight import knobs
from twilight.compiler.backend import CPU_THREADS
from twilight.runtime.serving import torch_op

PIPE = tw.builtins.quest_twilight(budget=64, p=0.9)
SHAPE = tw.Shape(8, 2, 64, 16, "float32")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with knobs.scope(cache_dir=tmp_path_factory.mktemp("cache"), disable_compile=None), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = tw.load(PIPE, shape=SHAPE, backend="tvm")
    cache = dec.make_cache()
    gen = torch.Generator().manual_seed(0)
    for n in (300, 120):
        rid = cache.add_request()
        cache.append(torch.randn(2, n, 64, generator=gen), torch.randn(2, n, 64, generator=gen),
                     rid)
    return dec, cache


def test_eager_matches_reference(setup):
    dec, cache = setup
    h = torch_op.bind(dec, cache, req=[1])
    q = torch.randn(1, 8, 64)
    torch.testing.assert_close(torch.ops.twilight.decode(q, h), tw.reference(PIPE).run(q, cache,
                               req=1), atol=2e-5, rtol=0)
    with pytest.raises(tw.InputError, match="no pipeline bound"):
        torch.ops.twilight.decode(q, "nobody")


def test_cpu_threads_around_the_call(setup, monkeypatch):
    """The op runs inside a model: its kernels on half of torch's threads by default (as
    ``hf_attention.install``), the schedule's with ``cpu_threads=0``; restored after the call."""
    dec, cache = setup
    seen = []
    run = type(dec).run

    def spy(self, *a, **k):
        seen.append(CPU_THREADS.get())
        return run(self, *a, **k)
    monkeypatch.setattr(type(dec), "run", spy)
    q = torch.randn(1, 8, 64)
    for kw, want in (({}, max(1, torch.get_num_threads() // 2)), ({"cpu_threads": 0}, 0),
                     ({"cpu_threads": 3}, 3)):
        seen.clear()
        out = torch.ops.twilight.decode(q, torch_op.bind(dec, cache, req=[1], **kw))
        assert seen == [want] and CPU_THREADS.get() == 0
        torch.testing.assert_close(out, tw.reference(PIPE).run(q, cache, req=1), atol=2e-5,
                                   rtol=0)
    with pytest.raises(ValueError, match="cpu_threads=-1"):
        torch_op.bind(dec, cache, cpu_threads=-1)


def test_inside_torch_compile_fullgraph(setup):
    dec, cache = setup
    h = torch_op.bind(dec, cache, name="layer0")
    w = torch.randn(64, 64) / 8

    def block(x):  # a projection, the op, and a residual: one graph, no breaks
        q = (x @ w).view(2, 8, 64)
        return torch.ops.twilight.decode(q, h).reshape(2, 8 * 64) + x.reshape(2, 8 * 64)

    x = torch.randn(2, 8, 64)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x), atol=1e-5, rtol=0)
    ref = tw.reference(PIPE).run((x @ w).view(2, 8, 64), cache).reshape(2, -1) + x.reshape(2, -1)
    torch.testing.assert_close(compiled(x), ref, atol=2e-5, rtol=0)


def test_inductor_and_append(setup):
    dec, cache = setup
    cache2 = dec.make_cache()
    rid = cache2.add_request()
    cache2.append(torch.randn(2, 200, 64), torch.randn(2, 200, 64), rid)
    h = torch_op.bind(dec, cache2, req=[rid])

    def step(q, k, v):
        return torch.ops.twilight.decode(q * 1.0, h, k, v).sum(-1)

    compiled = torch.compile(step, fullgraph=True)
    q, k, v = torch.randn(1, 8, 64), torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64)
    got = compiled(q, k, v)
    assert int(cache2.lengths[rid]) == 201  # appended once, inside the compiled call
    torch.testing.assert_close(got, tw.reference(PIPE).run(q, cache2).sum(-1), atol=1e-4, rtol=0)


def test_opcheck(setup):
    dec, cache = setup
    h = torch_op.bind(dec, cache)
    torch.library.opcheck(torch.ops.twilight.decode.default, (torch.randn(2, 8, 64), h),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_static"))
