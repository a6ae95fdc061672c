"""The loader: generated source in a real file, imported for the interpreter and for AOT in
one process, in both orders; artifacts carry each kernel's source."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import twilight as tw
from twilight.compiler.triton import loader
from twilight.frontend import builtins as B

SCRIPT = textwrap.dedent("""
    import os, sys, torch
    import twilight as tw
    from twilight.compiler.backend import Target, get_backend
    from twilight.compiler.triton.aot import compile_artifacts
    from twilight.runtime.serving.pipeline_cache import make_cache
    pipe = tw.builtins.quest_twilight(budget=32)
    shape = tw.Shape(2, 1, 16, 16, "float32")
    def interp():
        k = get_backend("triton").lower(pipe.ir, shape, {}, Target("interpret"))
        c = make_cache(pipe, 1, 16, dtype=torch.float32)
        r = c.add_request()
        c.append(torch.randn(1, 40, 16), torch.randn(1, 40, 16), r)
        q = torch.randn(1, 2, 16)
        assert torch.allclose(k.run(q, c), tw.reference(pipe).run(q, c), atol=1e-5)
    def aot():
        k = get_backend("triton").lower(pipe.ir, shape, {}, Target("cuda", "sm_80"))
        arts = compile_artifacts(k)
        assert all(a.files["cubin"] and a.metadata["spills"] == 0 for a in arts)
    for step in sys.argv[1].split(","):
        {"i": interp, "a": aot}[step]()
    print("ok")
""")


@pytest.mark.parametrize("order", ["i,a", "a,i"])
def test_interpret_and_aot_in_one_process(order, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", TWILIGHT_CACHE_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", SCRIPT, order], env=env, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_source_file_reused(triton_cache, lower):
    comp = lower(B.quest_top_k(budget=16), 2, 1, 16)
    path = loader.source_path(comp.source)
    assert path.parent == triton_cache / "triton_src" and path.read_text() == comp.source
    mtime = path.stat().st_mtime_ns
    assert loader.source_path(comp.source).stat().st_mtime_ns == mtime
    assert loader.load(comp.source, True) is loader.load(comp.source, True)
    assert loader.load(comp.source, False) is not loader.load(comp.source, True)


def test_user_formula_is_spliced_into_the_score_kernel(lower):
    @tw.score(per="token")
    def odd(q, k):
        return tw.sum(tw.exp(q) / (1.0 + tw.abs(k)))

    comp = lower(tw.Pipeline(select=tw.top_k(odd, tw.tokens(8))), 2, 1, 16)
    src = comp.specs["select_score"].source
    assert "tl.exp(" in src and "tl.abs(" in src and "tl.sum(" in src
    assert {a.stage for a in comp.artifacts} == {"select", "attend"}
