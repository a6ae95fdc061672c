"""CUDA source from the TVM backend for every stage of every built-in pipeline (default
schedule), and nvcc cubins for sm_80 and sm_90 when nvcc exists (each distinct kernel once)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import twilight as tw
from twilight.compiler import ir
from twilight.compiler.backend import Target, get_backend
from twilight.compiler.tvm.attend import reduce_plan
from twilight.compiler.tvm.build import cuda_source

SHAPE = ir.Shape(32, 8, 128, 16, "float16")
CHANNELS = tuple(tuple(range(h, 128, 8)) for h in range(8))
NVCC = shutil.which("nvcc")


def builtin_pipelines():
    b = tw.builtins
    return {"dense": b.dense(), "quest_top_k": b.quest_top_k(), "quest_twilight": b.quest_twilight(),
            "oracle_top_k": b.oracle_top_k(), "streaming": b.streaming(),
            "double_sparsity": b.double_sparsity(CHANNELS), "ds_twilight": b.ds_twilight(CHANNELS),
            # every key-code format: the published per-token codes, smoothed ones, per channel
            # within a group of pages (quest_twilight's default is per channel within a page)
            "quest_twilight_token": b.quest_twilight(granularity="token"),
            "quest_twilight_smooth": b.quest_twilight(granularity="token", smooth=True),
            "quest_twilight_group": b.quest_twilight(granularity="group", group_pages=4)}


def cuda_kernels(schedules=({},)) -> dict[str, tuple[str, str]]:
    """Distinct CUDA sources: sha → (a readable name, source)."""
    out = {}
    for name, pipe in builtin_pipelines().items():
        for sched in schedules:
            k = get_backend("tvm").lower(pipe.ir, SHAPE, sched, Target.parse("cuda:sm_90"))
            for kname, kern in k.kernels.items():
                src = cuda_source(kern)
                out.setdefault(hashlib.sha256(src.encode()).hexdigest(), (f"{name}.{kname}", src))
    return out


@pytest.fixture(scope="module")
def kernels():
    return cuda_kernels()


def test_every_stage_has_cuda_source(kernels):
    names = {n for n, _ in kernels.values()}
    for stage in ("score", "rank", "candidates", "estimate0", "decide0", "kept0", "attend",
                  "summary_minmax", "token_codes4", "token_codes4_smooth", "page_codes4",
                  "group_codes4_g4"):
        assert any(n.endswith("." + stage) for n in names), stage
    for _, src in kernels.values():
        assert "__global__" in src and "blockIdx.x" in src and "threadIdx.x" in src


def nvcc_cubin(src: str, arch: str, tmp) -> str:
    h = hashlib.sha256(src.encode()).hexdigest()[:16]
    cu = tmp / f"{h}.cu"
    cu.write_text(src)
    r = subprocess.run([NVCC, "-cubin", f"-arch={arch}", "-Xptxas", "-v", str(cu), "-o",
                        str(tmp / f"{h}_{arch}.cubin")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stderr


def _compile_all(kernels, tmp_path, archs=("sm_80", "sm_90")):
    jobs = [(src, arch) for _, src in kernels.values() for arch in archs]
    with ThreadPoolExecutor(2) as pool:
        logs = list(pool.map(lambda j: nvcc_cubin(j[0], j[1], tmp_path), jobs))
    assert all("Used" in log for log in logs)  # ptxas reported registers for every kernel


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: CUDA sources are generated "
                    "but not compiled to cubins here")
def test_nvcc_compiles_every_kernel(kernels, tmp_path):
    _compile_all(kernels, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
def test_nvcc_compiles_schedule_variants(tmp_path):
    scheds = [{"split_kv": 4}, {"top_p_strategy": "radix", "radix_bits": 11},
              {"top_p_strategy": "sort"}, {"top_p_strategy": "bisect", "bisect_stop": "iters"}]
    _compile_all(cuda_kernels(scheds), tmp_path)


def attend_source(staging: str) -> str:
    sched = {"cuda_attend_staging": staging}
    k = get_backend("tvm").lower(tw.builtins.quest_top_k().ir, SHAPE, sched,
                                 Target.parse("cuda:sm_90"))
    return cuda_source(k.kernels["attend"])


def test_key_code_formats_cuda_source():
    """Each estimate reads its own side data: per-token scale/zero (and the smoothing factors),
    or per-channel lo/hi in the cache dtype read as words of packed values (page, group)."""
    pipes = builtin_pipelines()
    est = {}
    for f in ("", "_token", "_smooth", "_group"):
        k = get_backend("tvm").lower(pipes[f"quest_twilight{f}"].ir, SHAPE, {},
                                     Target.parse("cuda:sm_90"))
        est[f] = cuda_source(k.kernels["estimate0"])
    assert "smooth" in est["_smooth"] and "smooth" not in est["_token"]
    for f in ("", "_group"):
        assert "klo" in est[f] and "khi" in est[f] and "ksc" not in est[f]
        assert "uint" in est[f]  # lo/hi read as words
    assert "ksc" in est["_token"] and "klo" not in est["_token"]
    assert est[""] != est["_group"]


def test_attend_smem_staging_source():
    """``cuda_attend_staging="smem"``: the block's queries sit in one ``__shared__`` tile, loaded
    before a barrier that every thread reaches; ``"none"`` keeps a per-thread copy."""
    none, smem = attend_source("none"), attend_source("smem")
    assert "__shared__" not in none and "__syncthreads" not in none and "qv" in none
    assert "__shared__" in smem and "__syncthreads" in smem and "qv_ptr" not in smem
    # outside the row guard: before the row is named (``r``), the guard, and its first use
    guard = re.search(r"int r = (.*);\n\s*if \(\1 < ", smem)
    assert guard and smem.index("__syncthreads") < guard.start()


def test_attend_staging_is_cuda_only():
    from twilight.schedules.tvm import space
    p = tw.builtins.quest_top_k().ir
    def names(t):
        return {q.name for q in space(p, SHAPE, Target.parse(t)).params}
    assert "cuda_attend_staging" in names("cuda:sm_90")
    assert "cuda_attend_staging" not in names("llvm")
    lower = get_backend("tvm").lower
    texts = [lower(p, SHAPE, {"cuda_attend_staging": v}, Target.parse("llvm")).kernels["attend"]
             .source.text for v in ("none", "smem")]
    assert texts[0] == texts[1]


PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
                   r"[\s\S]*?Used (\d+) registers")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
def test_nvcc_attend_staging_footprint(tmp_path):
    """Both stagings compile for sm_80 and sm_90; ptxas' figures for each are printed, and the
    shared-memory variant spills no more (and keeps no larger a stack frame) than ``"none"``."""
    jobs = [(st, arch) for st in ("none", "smem") for arch in ("sm_80", "sm_90")]
    srcs = {st: attend_source(st) for st in ("none", "smem")}
    with ThreadPoolExecutor(2) as pool:
        logs = list(pool.map(lambda j: nvcc_cubin(srcs[j[0]], j[1], tmp_path), jobs))
    fig = {}
    for (st, arch), log in zip(jobs, logs, strict=True):
        m = PTXAS.search(log)
        assert m, log
        stack, st_spill, ld_spill, regs = map(int, m.groups())
        fig[st, arch] = {"registers": regs, "stack": stack, "spill": st_spill + ld_spill}
        print(f"attend {st:4} {arch}: {regs} registers, {stack} B stack, "
              f"{st_spill}/{ld_spill} B spill stores/loads")
    for arch in ("sm_80", "sm_90"):
        assert fig["smem", arch]["spill"] <= fig["none", arch]["spill"]
        assert fig["smem", arch]["stack"] <= fig["none", arch]["stack"]


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32])
def test_attend_reduce_plan_sums_each_vector_into_its_lane(n):
    """``attend.reduce_plan``: the shuffle tree that turns a block's ``n`` partial dot-product
    vectors into its ``n`` logits — lane ``j`` holds vector ``j``'s sum, with ``n - 1`` adds."""
    gen = torch.Generator().manual_seed(n)
    v = torch.randn(n, n, generator=gen, dtype=torch.float64)
    red, adds = v.clone(), 0
    for seg, x, y in reduce_plan(n):
        new = red.clone()
        for j in range(seg):
            cat = torch.cat([red[j], red[j + seg]])
            new[j] = cat[x] + cat[y]
            adds += 1
        red = new
    torch.testing.assert_close(red[0], v.sum(1))
    assert adds == n - 1


def test_scalars_assigned_once_are_bound_not_buffers():
    """``bind_once``: a name assigned once in its scope, or in sibling scopes, becomes an
    immutable ``T.let`` binding (a register); one assigned again where the first is visible,
    buffers and symbolic dims stay as written."""
    from twilight.compiler.tvm.dialect import bind_once
    text = "\n".join([
        "def f(x_h: T.handle):",
        "    N = T.int32()",
        "    buf = T.alloc_buffer((4,), \"float32\", scope=\"global\")",
        "    for r in T.parallel(N):",
        "        b = r // 2",
        "        m = b + 1",
        "        if b > 0:",
        "            t = b * 3",
        "            m = t",
        "        else:",
        "            t = b - 1",
        "        buf[0] = m",
    ])
    got = bind_once(text).split("\n")
    assert got[1] == "    N = T.int32()" and got[2].startswith("    buf = T.alloc_buffer(")
    assert got[4] == "        b: T.let = r // 2"
    assert got[5] == "        m = b + 1" and got[8] == "            m = t"  # assigned again
    assert got[7] == "            t: T.let = b * 3" and got[10] == "            t: T.let = b - 1"


def test_generated_kernels_bind_their_row_scalars():
    """The attend kernel (llvm) names its row's request, head and count by bindings: none of
    them is a one-element buffer, which TVM would take from its workspace pool per row."""
    k = get_backend("tvm").lower(tw.builtins.quest_twilight().ir, SHAPE, {},
                                 Target.parse("llvm"))
    text = k.kernels["attend"].source.text
    for name in ("b", "hkv", "n", "lo", "hi"):
        assert re.search(rf"^\s+{name}: T.let = ", text, re.M), name
        assert not re.search(rf"^\s+{name} = ", text, re.M), name


def test_int8_query_is_offered_where_the_cpu_has_vnni():
    """``estimate_query`` is in the space of a quantized-key estimate on an llvm target with
    AVX-512 VNNI (as LLVM sees the CPU), nowhere else; lowered for a CPU without it, an int8
    schedule keeps the float query and says so."""
    from twilight.schedules.tvm import space
    quant, exact = tw.builtins.quest_twilight().ir, tw.builtins.quest_top_k().ir
    llvm, cuda = Target.parse("llvm"), Target.parse("cuda:sm_90")
    def names(p, t, vnni):
        return {q.name for q in space(p, SHAPE, t, vnni=vnni).params}
    assert "estimate_query" in names(quant, llvm, True)
    assert "estimate_query" not in names(quant, llvm, False)
    assert "estimate_query" not in names(quant, cuda, True)
    assert "estimate_query" not in names(exact, llvm, True)
    tvm = get_backend("tvm")
    old, new = Target("llvm", "skylake"), Target("llvm", "sapphirerapids")
    assert "estimate_query" not in {q.name for q in tvm.space(quant, SHAPE, old).params}
    assert "estimate_query" in {q.name for q in tvm.space(quant, SHAPE, new).params}
    text = tvm.lower(quant, SHAPE, {"estimate_query": "int8"}, new).kernels["estimate0"] \
        .source.text
    assert "llvm.x86.avx512.vpdpbusd.512" in text and "qi8" in text
    with pytest.warns(RuntimeWarning, match="needs AVX-512 VNNI"):
        slow = tvm.lower(quant, SHAPE, {"estimate_query": "int8"}, old)
    assert slow.kernels["estimate0"].source.text == \
        tvm.lower(quant, SHAPE, {}, old).kernels["estimate0"].source.text


def test_host_vnni_from_cpu_flags_is_what_llvm_sees():
    """``has_vnni`` answers for the host from /proc/cpuinfo (a warm process imports no TVM);
    LLVM, which compiles the kernels, must see the same CPU."""
    from tvm.target import codegen

    from twilight.compiler.tvm.build import has_vnni, tvm_target
    host = Target("llvm")
    assert has_vnni(host) == bool(codegen.llvm_cpu_has_features(["avx512vnni", "avx512vl"],
                                                                 tvm_target(host)))
