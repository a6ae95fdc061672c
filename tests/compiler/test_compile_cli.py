"""`twilightc compile --dump`: every intermediate lands on disk, with no GPU."""

from __future__ import annotations

import json
import shutil

import pytest

from twilight.cli import main

SHAPE = "q_heads=8,kv_heads=2,head_dim=64,dtype=float16"


def _dump(tmp_path, backend, target, pipeline="quest_twilight"):
    out = tmp_path / f"{backend}-{target.replace(':', '_')}"
    assert main(["compile", "--pipeline", pipeline, "--backend", backend, "--target", target,
                 "--shape", SHAPE, "--dump", str(out)]) == 0
    return out, json.loads((out / "resources.json").read_text())


def test_triton_aot_dump_has_ptx_cubin_and_resources(tmp_path):
    out, res = _dump(tmp_path, "triton", "cuda:sm_90")
    assert json.loads((out / "ir.json").read_text())["ir"]["name"] == "quest_twilight"
    stages = {r["stage"] for r in res}
    assert {"select", "estimate", "prune", "attend", "append"} <= stages
    for r in res:
        names = set(r["files"])
        for ext in ("py", "ttir", "ttgir", "llir", "ptx", "cubin"):
            assert f"{r['name']}.{ext}" in names
        assert r["metadata"]["registers"] > 0 and r["metadata"]["spills"] == 0
    ptx = next((out / "attend").glob("*.ptx")).read_text()
    assert ".target sm_90" in ptx


def test_tvm_llvm_and_cuda_dumps(tmp_path):
    out, res = _dump(tmp_path, "tvm", "llvm", "quest_top_k(budget=256)")
    assert all({f"{r['name']}.tir", f"{r['name']}.lowered"} <= set(r["files"]) for r in res)
    out, res = _dump(tmp_path, "tvm", "cuda:sm_80")
    cuda = [p for p in out.rglob("*.cuda")]
    assert cuda and "__global__" in cuda[0].read_text()


def _exit_status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse and usage errors: exit 2
        return e.code


def test_bad_requests_are_clear_errors(tmp_path, capsys):
    assert _exit_status(["compile", "--pipeline", "quest_twilight", "--backend", "tvm",
                         "--target", "cuda", "--dump", str(tmp_path)]) == 2
    assert "name the CUDA arch" in capsys.readouterr().err
    assert main(["compile", "--pipeline", "ds_twilight", "--backend", "tvm", "--target",
                 "llvm", "--dump", str(tmp_path)]) == 1
    assert "needs calibrated channels" in capsys.readouterr().err
    assert _exit_status(["compile", "--pipeline", "quest_twilight", "--backend", "triton",
                         "--target", "llvm", "--dump", str(tmp_path)]) == 2
    assert "does not support" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_nvcc_compiles_the_dumped_tvm_cuda(tmp_path):
    import subprocess
    out, _ = _dump(tmp_path, "tvm", "cuda:sm_90", "quest_top_k(budget=256)")
    src = next(out.rglob("attend.cuda"))
    cu = src.with_suffix(".cu")
    cu.write_text(src.read_text())
    r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-o", str(cu.with_suffix(".cubin")),
                        str(cu)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
