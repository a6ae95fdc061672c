"""Triton kernel tests run under the interpreter: TRITON_INTERPRET=1 must be set before the
first ``import triton`` of the session (Triton decides per function at decoration time).

Fixtures: ``triton_cache`` points twilight's generated-source cache at a fresh temp dir;
``lower(pipe, shape, schedule)`` lowers for ``Target("interpret")``; ``check_run`` runs a
lowered pipeline and the reference on one cache and compares outputs and kept sets.
"""

from __future__ import annotations

import os
import sys

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import twilight as tw  # noqa: E402
from twilight.compiler.backend import Target, get_backend  # noqa: E402
from twilight.compiler.stages import lists_to_mask  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="session", autouse=True)
def triton_cache(tmp_path_factory):
    from twilight.compiler.triton import loader
    if not loader.interpreter_ready():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)
    path = tmp_path_factory.mktemp("twilight_cache")
    old = os.environ.get("TWILIGHT_CACHE_DIR")
    os.environ["TWILIGHT_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TWILIGHT_CACHE_DIR", None)
    else:
        os.environ["TWILIGHT_CACHE_DIR"] = old


def _lower(pipe, hq: int, hkv: int, d: int, dtype=torch.float32, schedule=None):
    p = pipe.ir if hasattr(pipe, "ir") else pipe
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
    shape = tw.Shape(hq, hkv, d, p.page_size, name[dtype])
    return get_backend("triton").lower(p, shape, schedule or {}, Target("interpret"))


@pytest.fixture(scope="session")
def lower():
    return _lower


@pytest.fixture(scope="session")
def check_run(fill_cache):
    """Run ``pipe`` with the Triton backend and the reference; assert equal kept sets and
    close outputs. Returns ``(out, ref, kept_mask, ref_kept)``."""
    def check(pipe, hq, hkv, d, lengths, *, dtype=torch.float32, schedule=None, seed=0,
              grid=False, exact_mask=True):
        f = fill_cache(pipe, hkv, d, lengths, dtype=dtype, seed=seed, grid=grid)
        q = f.query(hq, seed=seed + 1)
        comp = _lower(pipe, hq, hkv, d, dtype, schedule)
        out, (idx, cnt) = comp.run(q, f.cache, return_lists=True)
        ref, kept = tw.reference(pipe).run(q, f.cache, return_kept=True)
        mask = lists_to_mask(idx, cnt, kept.mask.shape[-1])
        if exact_mask:
            assert torch.equal(mask, kept.mask), (cnt.tolist(), kept.count.tolist())
            torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype],
                                       rtol=TOL[dtype])
        assert out.dtype == q.dtype and out.shape == q.shape
        return out, ref, mask, kept
    return check
