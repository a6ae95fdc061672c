"""One conformance test for every registered backend (``compiler.backend``): the written
``Backend`` and ``StageKernels`` protocols, on the target each backend can run here (TVM's
llvm; Triton's interpreter), against the torch reference.

A new backend registers with ``register_backend`` and passes this file unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import twilight as tw
from twilight.compiler import passes
from twilight.compiler.backend import Backend, StageKernels, Target, backends
from twilight.compiler.keycodes import KeyCodeSpec
from twilight.compiler.stages import lists_to_mask, run_stages, stage_inputs
from twilight.errors import UnsupportedPipeline
from twilight.runtime.store.kernel_cache import KernelCache, cache_key
from twilight.version import source_stamp

BACKENDS = sorted(backends())
SHAPE = tw.Shape(4, 2, 32, 16, "float32")


def _runnable(name: str):
    b = backends()[name]
    t = b.local_target()
    if t is None:
        pytest.skip(f"the {name} backend runs nothing in this process")
    return b, t


def _pipe():  # every stage kind at once: page scores, a key-code estimate, top-p, keep rules
    return tw.builtins.quest_twilight(budget=64, p=0.9, sink_tokens=2, window_tokens=8)


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_declares_the_protocol(name):
    b = backends()[name]
    assert isinstance(b, Backend) and b.name == name and b.source_ext
    stamp = b.version_stamp()
    # keyed on its own generators: editing one changes the stamp (and so every cache key)
    here = Path(type(b).__module__.replace("twilight.", "").replace(".", "/"))
    root = Path(tw.__file__).resolve().parent
    assert stamp["codegen_sources"] == source_stamp(root / here, root / "compiler" / "ir.py")
    space = b.space(_pipe().ir, SHAPE, _any_target(b))
    assert b.complete({}) == b.complete(space.default())  # defaults fill a partial schedule


def _any_target(b: Backend) -> Target:
    """A target ``b`` lowers for (running it may need a device)."""
    return next(t for t in (Target("llvm"), Target("interpret"), Target("cuda", "sm_90"))
                if b.supports(t))


@pytest.mark.parametrize("name", BACKENDS)
def test_stage_kernels_agree_with_the_reference(name, fill_cache):
    b, target = _runnable(name)
    pipe = _pipe()
    k = b.lower(pipe.ir, SHAPE, {}, target)
    assert isinstance(k, StageKernels)
    f = fill_cache(pipe, 2, 32, [40, 150], seed=3)
    q = f.query(4, seed=4)
    k.plan(2, 256)
    out, (idx, cnt) = run_stages(k, stage_inputs(q, f.cache), len(pipe.ir.prune), True)
    ref, kept = tw.reference(pipe).run(q, f.cache, return_kept=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert torch.equal(lists_to_mask(idx, cnt, kept.mask.shape[-1]), kept.mask)
    # no list is wider than the shared pass allows for its context
    assert int(cnt.max()) <= passes.candidate_width(pipe.ir, SHAPE.group_size, 150)


@pytest.mark.parametrize("name", BACKENDS)
def test_refresh_kernels_match_the_torch_cache(name, fill_cache):
    b, target = _runnable(name)
    pipe = tw.builtins.quest_twilight(budget=64)  # a page summary and page codes
    k = b.lower(pipe.ir, SHAPE, {}, target)
    f = fill_cache(pipe, 2, 32, [37], seed=5)
    c = f.cache
    pages = torch.nonzero(c.page_fill > 0).flatten()
    want = {n: t.clone() for n, t in c.summaries.items()}
    codes = {sp: c.key_codes[sp].packed.clone() for sp in KeyCodeSpec.of_pipeline(pipe.ir)}
    for t in c.summaries.values():
        t.zero_()
    for sp in codes:
        c.key_codes[sp].packed.zero_()
    k.refresh_pages(c, pages)
    for n, t in want.items():
        assert torch.equal(c.summaries[n][pages], t[pages]), n
    for sp, t in codes.items():
        assert torch.equal(c.key_codes[sp].packed[pages], t[pages]), sp.name


@pytest.mark.parametrize("name", BACKENDS)
def test_gqa_support_is_one_rule(name):
    """Both backends refuse a merged decision over per-head lists with the same error."""
    b = backends()[name]
    sel = tw.top_k(tw.builtins.quest, budget=tw.tokens(64), group="none")
    pipe = tw.Pipeline(select=sel, prune=tw.top_p(0.9, estimate=tw.exact_keys(), group="max"),
                       name="none_then_max")
    with pytest.raises(UnsupportedPipeline, match=f"the {name} backend cannot lower pruner 0"):
        b.lower(pipe.ir, SHAPE, {}, _any_target(b))


@pytest.mark.parametrize("name", BACKENDS)
def test_export_round_trip(name, tmp_path, fill_cache):
    b, target = _runnable(name)
    if not b.exports(target):
        pytest.skip(f"the {name} backend keeps no kernels on disk for {target}")
    pipe = _pipe()
    sched = b.complete({})
    k = b.lower(pipe.ir, SHAPE, sched, target)
    cache = KernelCache(tmp_path)
    key = cache_key(pipe.ir.key(), sched, target, name, b.version_stamp())
    entry = cache.get_or_build(key, lambda out: b.export(k, out))
    again = b.load_exported(pipe.ir, SHAPE, sched, target, entry)
    f = fill_cache(pipe, 2, 32, [90], seed=6)
    q = f.query(4, seed=7)
    torch.testing.assert_close(b.fresh(again).run(q, f.cache), k.run(q, f.cache))
