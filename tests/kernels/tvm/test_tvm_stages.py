"""Every TVM stage kernel (llvm) against its torch reference in ``compiler.stages``."""

from __future__ import annotations

import pytest
import torch

import twilight as tw
from twilight.compiler import ir, stages
from twilight.compiler.backend import Target, get_backend
from twilight.runtime.evaluation import reference_stages as RS

LLVM = Target.parse("llvm")
CHANNELS = ((0, 3, 5, 7, 9, 11, 13, 15), (1, 2, 4, 6, 8, 10, 12, 14))


def builtin(name: str):
    make = tw.builtins.PIPELINES[name]
    if name in ("double_sparsity", "ds_twilight"):
        return make(CHANNELS, budget=40)
    if name in ("dense", "streaming"):
        return make() if name == "dense" else make(4, 24)
    if name == "loki":
        return make(torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0)), budget=40)
    return make(budget=40)


NAMES = sorted(tw.builtins.PIPELINES)


def lower(pipe, hq=8, hkv=2, d=64, dtype="float32", **sched):
    sched.setdefault("top_p_strategy", "sort")
    return get_backend("tvm").lower(pipe.ir, ir.Shape(hq, hkv, d, pipe.ir.page_size, dtype),
                                    sched, LLVM)


def check_stages(pipe, k, q, cache, on_weights=None) -> None:
    """Every stage of ``k`` against its torch reference, in order: select, then each prune's
    estimate (``on_weights(w, reference weights)`` first, when given) and prune, then attend."""
    x = k.inputs(q, cache)
    ref_x = stages.stage_inputs(q, cache)
    t = x.max_len
    idx, cnt = k.select(x)
    cand = stages.lists_to_mask(idx, cnt, t)
    assert torch.equal(cand, RS.ref_select(pipe.ir, ref_x))
    assert bool(((idx[..., 1:] > idx[..., :-1]) | (idx[..., 1:] < 0)).all())  # ascending
    for i, _ in enumerate(pipe.ir.prune):
        w = k.estimate(i, x, idx, cnt)
        wd = stages.rows_to_dense(w, idx, cnt, t)
        wr = RS.ref_estimate(pipe.ir, i, ref_x, cand)
        if on_weights:
            on_weights(w, wr)
        torch.testing.assert_close(wd, wr, atol=2e-6, rtol=1e-4)
        idx, cnt = k.prune(i, x, w, idx, cnt)
        kept = stages.lists_to_mask(idx, cnt, t)
        assert torch.equal(kept, RS.ref_prune(pipe.ir, i, ref_x, wd, cand))
        cand = kept
    out = k.attend(x, idx, cnt)
    torch.testing.assert_close(out, RS.ref_attend(pipe.ir, ref_x, cand), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_stages_match_reference(name, fill_cache):
    pipe = builtin(name)
    f = fill_cache(pipe, 2, 64, [100, 37, 161], grid=True)
    check_stages(pipe, lower(pipe), f.query(8, seed=1), f.cache)


@pytest.mark.parametrize("split", [2, 4])
def test_split_kv_combine(split, fill_cache):
    pipe = tw.builtins.quest_twilight(budget=64)
    f = fill_cache(pipe, 2, 64, [300, 5])
    q = f.query(8)
    one = lower(pipe).run(q, f.cache)
    many = lower(pipe, split_kv=split, attend_block_n=8).run(q, f.cache)
    torch.testing.assert_close(many, one, atol=1e-5, rtol=1e-5)


def test_symbolic_shapes_reuse_kernels(fill_cache):
    """One compiled pipeline serves other batch sizes and contexts (no rebuild)."""
    from twilight.compiler.tvm import build
    pipe = tw.builtins.quest_top_k(budget=32)
    k = lower(pipe)
    before = build.STATS["builds"]
    for lengths in ([20], [100, 3, 64], [2100, 1]):
        f = fill_cache(pipe, 2, 64, lengths, grid=True)
        q = f.query(8)
        torch.testing.assert_close(k.run(q, f.cache), tw.reference(pipe).run(q, f.cache),
                                   atol=1e-5, rtol=1e-4)
    assert build.STATS["builds"] == before


def test_lowered_pipelines_are_cached():
    pipe = tw.builtins.quest_top_k(budget=32)
    assert lower(pipe) is lower(pipe)
    assert lower(pipe) is not lower(pipe, vector_width=8)


def test_misaligned_tensor_is_refused():
    from twilight.compiler.tvm.build import AlignmentError, check_aligned
    t = torch.zeros(65)[1:]
    with pytest.raises(AlignmentError, match="64-byte aligned"):
        check_aligned(t, "k")


def test_artifacts_have_tir_lowered_and_llvm():
    k = lower(tw.builtins.quest_twilight(budget=64))
    arts = {a.name: a for a in k.artifacts}
    assert {"score", "rank", "candidates", "estimate0", "decide0", "kept0", "attend"} <= set(arts)
    a = arts["attend"]
    assert a.stage == "attend" and "T.prim_func" in a.files["tir"]
    assert "T.parallel" in a.files["tir"]
    # every kernel is a function of the pipeline's one module, whose artifact holds the code
    assert a.metadata["module"] == "fused" and "attend_impl" in a.files["lowered"]
    assert "define" in arts["fused"].files["llvm"] and arts["fused"].files["lowered"]


@pytest.mark.parametrize("name", ["quest_twilight", "dense"])
def test_no_subnormal_weights(name, fill_cache):
    """Softmax weights far below the row's heaviest are 0, never subnormal floats (x86 computes
    with those ~100x slower; a strong attention sink put half a row there): the estimate's
    weights have none, and they and the attention still match the torch reference."""
    pipe = tw.builtins.quest_twilight(budget=1024) if name != "dense" else builtin(name)
    f = fill_cache(pipe, 2, 64, [400, 257], scale=2.0)
    q = f.query(8, seed=3, scale=12.0)  # logits spread over hundreds: many below 1e-38
    tiny = torch.finfo(torch.float32).tiny

    def no_subnormals(w, wr):
        assert int(((wr > 0) & (wr < tiny)).sum()) > 100  # the data reaches the range
        assert int(((w > 0) & (w < tiny)).sum()) == 0
    check_stages(pipe, lower(pipe), q, f.cache, no_subnormals)
