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


PIPES = """
import twilight as tw
pipelines = {"big_pages": tw.builtins.quest_top_k(budget=128, page_size=32),
             "oracle": tw.builtins.oracle_top_k(64)}
"""


def test_the_pipelines_page_size_and_a_dict_entry(tmp_path, capsys):
    src = tmp_path / "mine.py"
    src.write_text(PIPES)
    out = tmp_path / "dump"
    assert main(["compile", "--pipeline", f"{src}:pipelines[big_pages]", "--backend", "tvm",
                 "--target", "llvm", "--shape", SHAPE, "--dump", str(out)]) == 0
    assert json.loads((out / "ir.json").read_text())["ir"]["page_size"] == 32
    assert "// 32" in next(out.rglob("score.tir")).read_text()  # pages of 32 in the kernel
    # quoted keys too; a dict without a key names its keys; a wrong page size says what to do
    assert main(["compile", "--pipeline", f"{src}:pipelines['oracle']", "--backend", "tvm",
                 "--target", "llvm", "--shape", SHAPE, "--dump", str(tmp_path / "d2")]) == 0
    assert main(["compile", "--pipeline", f"{src}:pipelines", "--backend", "tvm", "--target",
                 "llvm", "--dump", str(tmp_path / "d3")]) == 1
    assert "big_pages, oracle" in capsys.readouterr().err
    assert _exit_status(["compile", "--pipeline", f"{src}:pipelines[big_pages]", "--backend",
                         "tvm", "--target", "llvm", "--shape", SHAPE + ",page_size=16",
                         "--dump", str(tmp_path / "d4")]) == 2  # a usage error
    err = capsys.readouterr().err
    assert "built for page_size=32" in err and "drop page_size from --shape" in err


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_tvm_cuda_dump_has_a_cubin_and_resources(tmp_path):
    out, res = _dump(tmp_path, "tvm", "cuda:sm_90", "quest_top_k(budget=256)")
    for r in res:
        assert f"{r['name']}.cubin" in r["files"], r["name"]
        assert r["metadata"]["registers"] > 0 and r["metadata"]["functions"] >= 1
        assert {"spills", "shared", "stack"} <= set(r["metadata"])
    assert (out / "attend" / "attend.cubin").read_bytes()[:4] == b"\x7fELF"


def test_ptxas_report_is_read():
    from twilight.compiler.tvm.nvcc import ptxas_usage
    log = ("ptxas info    : Compiling entry function 'k0' for 'sm_90'\n"
           "ptxas info    : Function properties for k0\n"
           "    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem\n"
           "ptxas info    : Compiling entry function 'k1' for 'sm_90'\n"
           "    0 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 72 registers\n")
    assert ptxas_usage(log) == {"registers": 72, "stack": 16, "spills": 12, "spill_loads": 12,
                                "shared": 2048, "functions": 2}
