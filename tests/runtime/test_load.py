"""``twilight.load``: schedules from tuning logs, the kernel cache on a cold and a warm start,
corrupt and mismatched entries, keys, many processes at once, and plan()/run()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import twilight as tw
from twilight import knobs
from twilight.runtime.serving import load as load_mod
from twilight.runtime.store import kernel_key, tuning_log
from twilight.runtime.store.kernel_cache import CacheMissError, CorruptEntryWarning, KernelCache

PIPE = tw.builtins.quest_twilight(budget=64, p=0.9)
SHAPE = tw.Shape(8, 2, 64, 16, "float32")


@pytest.fixture
def env(tmp_path):
    """A fresh kernel cache and an empty user tuning-log root."""
    with knobs.scope(cache_dir=tmp_path / "cache", tuning_logs=tmp_path / "logs",
                     disable_compile=None):
        yield tmp_path


def load(cache_dir: Path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", load_mod.DefaultScheduleWarning)
        return tw.load(PIPE, shape=SHAPE, backend="tvm", cache=KernelCache(cache_dir), **kw)


def problem(dec, lengths=(300, 77), seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = dec.make_cache(initial_pages=4)
    for n in lengths:
        rid = cache.add_request()
        cache.append(torch.randn(2, n, 64, generator=gen), torch.randn(2, n, 64, generator=gen),
                     rid)
    return cache, torch.randn(len(lengths), 8, 64, generator=gen)


def assert_runs(dec, **kw):
    cache, q = problem(dec, **kw)
    out = dec.plan(q.shape[0], 512).run(q, cache)
    torch.testing.assert_close(out, tw.reference(PIPE).run(q, cache), atol=2e-5, rtol=0)


def entry_dir(cache_dir: Path, key: str) -> Path:
    return cache_dir / "kernels" / key[:2] / key


def test_cold_then_warm_then_memory(env):
    cold = load(env / "cache")
    assert cold.origin == "built" and cold.schedule_source == "default"
    assert_runs(cold)
    files = sorted(p.name for p in entry_dir(env / "cache", cold.key).iterdir())
    libs = [f for f in files if f.endswith(".so")]  # every kernel: a function of one module
    assert "kernels.json" in files and len(libs) == 1 and libs[0].startswith("fused.")
    warm = load(env / "cache")  # a new KernelCache object: nothing in memory
    assert warm.origin == "disk" and warm.key == cold.key
    assert all(k.prim_func is None for k in warm.compiled.kernels.values())  # not compiled
    assert_runs(warm, lengths=(1, 40, 513), seed=1)
    same = KernelCache(env / "cache")
    tw.load(PIPE, shape=SHAPE, backend="tvm", cache=same)
    assert tw.load(PIPE, shape=SHAPE, backend="tvm", cache=same).origin == "memory"


def test_warm_process_neither_compiles_nor_imports_tvm(env):
    load(env / "cache")
    script = textwrap.dedent("""
        import sys, torch, twilight as tw
        dec = tw.load(tw.builtins.quest_twilight(budget=64, p=0.9), backend="tvm",
                      shape=tw.Shape(8, 2, 64, 16, "float32"))
        print(dec.origin, "tvm" in sys.modules)
    """)
    env_vars = {**os.environ, "TWILIGHT_DISABLE_COMPILE": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", script], env=env_vars, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["disk", "False"]


def test_disable_compile_turns_a_miss_into_an_error(env):
    with knobs.scope(disable_compile=True), pytest.raises(CacheMissError, match="tvm"):
        load(env / "cache")


@pytest.mark.parametrize("damage", ["truncate_so", "garble_index", "garble_manifest"])
def test_damaged_entry_is_rebuilt(env, damage):
    key = load(env / "cache").key
    d = entry_dir(env / "cache", key)
    if damage == "truncate_so":
        so = next(d.glob("fused.*.so"))
        so.write_bytes(so.read_bytes()[:1000])
    elif damage == "garble_index":
        blob = (d / "kernels.json").read_bytes()
        (d / "kernels.json").write_bytes(blob[:10] + b"#" * (len(blob) - 10))
    else:
        (d / "manifest.json").write_text("{not json")
    with pytest.warns(CorruptEntryWarning):
        again = load(env / "cache")
    assert again.origin == "built" and again.key == key
    assert_runs(again)
    assert KernelCache(env / "cache").verify() == []


def test_entry_holding_other_kernels_is_rebuilt(env):
    """Checksums intact, but the libraries were built from other sources: never loaded."""
    key = load(env / "cache").key
    d = entry_dir(env / "cache", key)
    index = json.loads((d / "kernels.json").read_text())
    index["kernels"]["attend"]["source_sha256"] = "0" * 64
    (d / "kernels.json").write_text(json.dumps(index))
    manifest = json.loads((d / "manifest.json").read_text())
    blob = (d / "kernels.json").read_bytes()
    import hashlib
    manifest["files"]["kernels.json"] = {"sha256": hashlib.sha256(blob).hexdigest(),
                                         "size": len(blob)}
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(CorruptEntryWarning, match="does not hold this pipeline's kernels"):
        again = load(env / "cache")
    assert again.origin == "built"
    assert_runs(again)


def test_version_stamp_and_schedule_give_new_keys(env, monkeypatch):
    base = load(env / "cache")
    other = load(env / "cache", schedule={"vector_width": 8})
    assert other.key != base.key and other.origin == "built"
    assert other.schedule["vector_width"] == 8 and other.schedule_source == "given"
    assert load(env / "cache", schedule={"vector_width": 16}).key == base.key  # the default
    monkeypatch.setattr(kernel_key, "twilight_version", lambda: "999.0")
    bumped = load(env / "cache")
    assert bumped.key != base.key and bumped.origin == "built"
    from twilight.compiler import tvm as tvm_backend
    monkeypatch.setattr(tvm_backend, "_version_stamp", lambda: {"codegen_sources": "edited"})
    assert load(env / "cache").key not in (base.key, bumped.key)


def test_schedule_from_user_log_nearest_bucket(env):
    rec = lambda ctx, vw: {"bucket": f"b1_t{ctx}", "batch": 1, "context": ctx,  # noqa: E731
                           "schedule": {"vector_width": vw, "attend_block_n": 8}}
    tuning_log.write_entry(env / "logs", "cpu", PIPE.ir.name, {
        "pipeline_key": PIPE.ir.key(), "backend": "tvm", "target": "llvm",
        "shape": tuning_log.shape_dict(SHAPE), "measured": True,
        "buckets": [rec(1024, 4), rec(16384, 8)]})
    near_short = load(env / "cache", context=2048)
    assert near_short.schedule["vector_width"] == 4 and "b1_t1024" in near_short.schedule_source
    near_long = load(env / "cache", context=32768)
    assert near_long.schedule["vector_width"] == 8 and near_long.schedule["attend_block_n"] == 8
    assert_runs(near_long)


def test_default_schedule_is_announced_once(env):
    load_mod._TOLD.clear()
    pipe = tw.builtins.quest_top_k(budget=48)
    shape = tw.Shape(8, 2, 64, 16, "float32")
    with pytest.warns(load_mod.DefaultScheduleWarning, match="no tuning log"):
        tw.load(pipe, shape=shape, backend="tvm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", load_mod.DefaultScheduleWarning)
        tw.load(pipe, shape=shape, backend="tvm")


def test_plan_run_batches_subsets_and_growth(env):
    dec = load(env / "cache")
    cache, q = problem(dec, lengths=(300, 77, 5))
    ref = tw.reference(PIPE)
    dec.plan(batch=3, max_context=64)  # too short: run() re-plans by itself
    torch.testing.assert_close(dec.run(q, cache), ref.run(q, cache), atol=2e-5, rtol=0)
    sub = q[[2, 0]]
    torch.testing.assert_close(dec.run(sub, cache, req=[2, 0]), ref.run(sub, cache, req=[2, 0]),
                               atol=2e-5, rtol=0)
    strided = torch.randn(1, 64, 8).transpose(1, 2)  # not contiguous: staged, not refused
    torch.testing.assert_close(dec.run(strided, cache, req=1), ref.run(strided, cache, req=1),
                               atol=2e-5, rtol=0)
    cache.append(torch.randn(2, 2000, 64), torch.randn(2, 2000, 64), 1)  # the context grows
    torch.testing.assert_close(dec.run(q, cache), ref.run(q, cache), atol=2e-5, rtol=0)
    with pytest.raises(tw.InputError, match="expected"):
        dec.run(q.half(), cache)
    with pytest.raises(tw.InputError, match=r"q: expected device cpu \(the cache's\), got meta"):
        dec.run(q.to("meta"), cache)


def test_load_needs_a_shape_that_fits():
    with pytest.raises(tw.InputError, match="shape="):
        tw.load(PIPE)
    with pytest.raises(tw.InputError, match="page_size"):
        tw.load(PIPE, shape=tw.Shape(8, 2, 64, 32, "float32"))


CHILD = textwrap.dedent("""
    import sys, torch, twilight as tw
    from twilight.runtime.store.kernel_cache import KernelCache
    sys.stdin.read(1)  # start together
    torch.manual_seed(0)  # bisection may keep eps-ties the exact reference drops: fixed data
    pipe = tw.builtins.quest_twilight(budget=64, p=0.9)
    dec = tw.load(pipe, shape=tw.Shape(8, 2, 64, 16, "float32"), backend="tvm")
    cache = dec.make_cache()
    rid = cache.add_request()
    cache.append(torch.randn(2, 200, 64), torch.randn(2, 200, 64), rid)
    q = torch.randn(1, 8, 64)
    err = (dec.plan(1, 256).run(q, cache) - tw.reference(pipe).run(q, cache)).abs().max()
    print(dec.origin, float(err))
""")


def test_eight_processes_one_build(env):
    env_vars = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env=env_vars, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(8)]
    results = [p.communicate("g", timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    origins = sorted(out.split()[0] for out, _ in results)
    assert origins == ["built"] + ["disk"] * 7, origins
    assert max(float(out.split()[1]) for out, _ in results) < 2e-5
    cache = KernelCache(env / "cache")
    assert cache.verify() == [] and len(cache.ls()) == 1
