"""Every generated Triton kernel AOT-compiles for sm_80 and sm_90 with no GPU, and the
default schedule does not spill at head_dim 128, fp16 (registers from ``cuobjdump``)."""

from __future__ import annotations

import os
import sys

if "triton" not in sys.modules:  # lets this file share a session with the interpreter tests
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import twilight as tw  # noqa: E402
from twilight.compiler.backend import Target, get_backend  # noqa: E402
from twilight.compiler.triton.aot import compile_artifacts  # noqa: E402
from twilight.frontend import builtins as B  # noqa: E402

SHAPE = tw.Shape(32, 8, 128, 16, "float16")
PER_HEAD = tuple(tuple(range(h, 128, 8)) for h in range(8))
PROJECTION = tuple(tuple(tuple(((h + i + j) % 7 - 3) / 8 for j in range(32)) for i in range(128))
                   for h in range(8))  # Loki's [kv_heads, head_dim, d_f]


def _pipelines():
    return [B.dense(), B.quest_top_k(), B.quest_twilight(), B.oracle_top_k(), B.streaming(),
            B.double_sparsity(channels=PER_HEAD),
            B.ds_twilight(channels=PER_HEAD, granularity="page", bits=2),
            B.quest_twilight(bits=8, granularity="page"), B.sparq(r=16),
            B.loki(PROJECTION, d_f=32, budget=1024)]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TWILIGHT_CACHE_DIR", str(tmp_path))


def _check(pipe, target, schedule=None, shape=SHAPE):
    comp = get_backend("triton").lower(pipe.ir, shape, schedule or {}, target)
    arts = compile_artifacts(comp)
    for a in arts:
        assert set(a.files) >= {"ttir", "ttgir", "llir", "ptx", "cubin"}, a.name
        assert a.files["cubin"][:4] == b"\x7fELF"
        assert f".target sm_{target.sm}" in a.files["ptx"]
        assert a.metadata["registers"] > 0
        assert a.metadata["spills"] == 0, f"{pipe.name}/{a.name} spills on {target}"
    return arts


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_builtins_default_schedule_compile_without_spills(arch):
    for pipe in _pipelines():
        _check(pipe, Target("cuda", arch))


@pytest.mark.parametrize("schedule", [{"top_p_strategy": "sort"},
                                      {"top_p_strategy": "radix", "radix_bits": 11},
                                      {"top_p_strategy": "bisect", "bisect_stop": "iters"},
                                      {"attend_splits": 1, "num_stages": 3}])
def test_schedule_variants_compile(schedule):
    _check(B.quest_twilight(), Target("cuda", "sm_90"), schedule)


@pytest.mark.parametrize("group", ["none", "mean"])
def test_fused_prune_compact_compiles_without_spills(group):
    """``fuse_prune_compact`` (default top-p strategy, and a top-k pruner): one decide kernel
    per pruner that also writes the kept lists, no spills on sm_90."""
    pipe = tw.Pipeline(select=tw.top_k(B.quest, tw.tokens(8192)),
                       prune=[tw.top_p(0.9, estimate=tw.quantized_keys(4, "token")),
                              tw.top_k(budget=tw.tokens(1024))],
                       keep=tw.sink(4) | tw.window(64), group=group)
    arts = _check(pipe, Target("cuda", "sm_90"), {"fuse_prune_compact": True})
    names = {a.name for a in arts}
    assert {"prune0_decide", "prune1_decide"} <= names
    assert not {"prune0_compact", "prune1_compact"} & names


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_key_code_formats_compile_without_spills(dtype):
    """The page, group and smoothed-token estimate kernels (one pruner each, a ``kv`` group
    among them) and their append kernels compile for sm_80 without spills."""
    ests = [tw.quantized_keys(4, "page"), tw.quantized_keys(2, "group", pages=4),
            tw.quantized_keys(8, "group", pages=2), tw.quantized_keys(4, smooth=True)]
    pipe = tw.Pipeline(select=tw.top_k(B.quest, tw.tokens(8192)),
                       prune=[tw.top_p(0.95, estimate=e, group="kv" if i == 1 else None)
                              for i, e in enumerate(ests)], group="mean")
    arts = _check(pipe, Target("cuda", "sm_80"), shape=tw.Shape(32, 8, 128, 16, dtype))
    names = {a.name for a in arts}
    assert {f"estimate{i}" for i in range(4)} <= names
    assert {"append_codes_int4_page", "append_codes_int2_group4", "append_codes_int8_group2",
            "append_codes_int4_token_smooth"} <= names


def test_user_selector_compiles_at_odd_head_dim():
    @tw.score(per="token")
    def odd(q, k):
        return tw.sum(tw.exp(tw.minimum(q * k, 1.0)) / (1.0 + tw.abs(k)))

    pipe = tw.Pipeline(select=tw.top_k(odd, tw.tokens(64)), prune=tw.top_p(0.9),
                       attend=tw.attention(softcap=30.0))
    _check(pipe, Target("cuda", "sm_90"), shape=tw.Shape(12, 4, 96, 16, "bfloat16"))


@pytest.mark.slow
@pytest.mark.parametrize("d", [64, 256])
def test_other_head_dims(d):
    shape = tw.Shape(32, 8, d, 16, "float16")
    for pipe in _pipelines()[:4]:
        comp = get_backend("triton").lower(pipe.ir, shape, {}, Target("cuda", "sm_90"))
        assert all(a.files["cubin"] for a in compile_artifacts(comp))
