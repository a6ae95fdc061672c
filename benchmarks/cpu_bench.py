"""CPU benchmark of the TVM backend (llvm) against torch on the same data, in one run.

For quest_twilight and quest_top_k at contexts 4k–32k, batch 1 and 4, 32 query heads / 8 KV heads,
head_dim 128, fp16 cache: medians over repeats of

* ``tvm``       — ``get_backend("tvm").lower(...).run(q, cache)`` (whole pipeline);
* ``sdpa``      — the one dense baseline (``measure.fastest_sdpa``): the fastest torch
  ``scaled_dot_product_attention`` over the same contiguous K/V among float32, bfloat16 and
  float16 and both GQA layouts, converted before the timing (column ``sdpa`` says which);
* ``reference`` — ``twilight.reference(pipe).run`` (the torch sparse executor);
* ``flex``      — ``flex_attention`` under ``torch.compile`` with a block mask of the pipeline's kept
  pages (page-sized KV blocks, token-exact ``mask_mod``); the mask is built outside the timing;

plus the TVM attention stage alone and its achieved bandwidth (K/V bytes it must read over its
time) as a fraction of the machine's, measured in the same run by a large torch copy.

Data: random keys with a few "heavy" tokens per KV head aligned with the group's queries, so the
attention is peaked as in real models (top-p keeps a few percent, not most of the budget).
With ``--snapshot F`` every layer of a real attention snapshot (e.g. SmolLM2 at 8k, captured with
``scripts/capture_snapshot.py``) runs beside the synthetic sweep (``real_attention.py``).

    python benchmarks/cpu_bench.py --quick
    python benchmarks/cpu_bench.py --contexts 32768 --batch 1 4 --repeats 5 --json out.json
    python benchmarks/cpu_bench.py --quick --snapshot smollm2_8k.npz
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import twilight as tw
from twilight.compiler import ir
from twilight.compiler.backend import Target, get_backend
from twilight.compiler.stages import lists_to_mask
from twilight.runtime.evaluation.measure import fastest_sdpa
from twilight.runtime.serving.pipeline_cache import make_cache

HQ, HKV, D, PS = 32, 8, 128, 16


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def machine_bandwidth_gbs() -> float:
    """Read + write bytes per second of a 512 MiB torch copy (well past the L3 cache)."""
    a = torch.ones(128 * 1024 * 1024)
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), 5)
    return 2 * a.numel() * 4 / ms / 1e6


def make_data(pipe, batch: int, context: int, heavy: int = 32, seed: int = 0):
    """A cache holding ``batch`` requests of ``context`` tokens, the dense K/V, and queries."""
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache(pipe, HKV, D, dtype=torch.float16, initial_pages=batch * context // PS + 8)
    ids = cache.add_requests(batch)
    q = torch.randn(batch, HQ, D, generator=gen)
    ks, vs = [], []
    for i, rid in enumerate(ids):
        k = torch.randn(HKV, context, D, generator=gen)
        v = torch.randn(HKV, context, D, generator=gen)
        pos = torch.randint(0, context, (HKV, heavy), generator=gen)
        dirs = q[i].view(HKV, HQ // HKV, D).mean(1)  # the group's mean query
        k.scatter_(1, pos[..., None].expand(-1, -1, D), dirs[:, None].expand(-1, heavy, -1) * 4.0
                   + 0.3 * torch.randn(HKV, heavy, D, generator=gen))
        k, v = k.half(), v.half()
        cache.append(k, v, rid)
        ks.append(k)
        vs.append(v)
    return cache, q.half(), torch.stack(ks), torch.stack(vs)


def flex_runner(q, k, v, kept_mask):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    t = k.shape[2]
    mask = kept_mask  # bool [B, Hq, T]

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[b, h, kv_idx]
    bm = create_block_mask(mask_mod, q.shape[0], HQ, 1, t, device="cpu", BLOCK_SIZE=(1, PS))
    fn = torch.compile(flex_attention, dynamic=False)
    q4 = q[:, :, None]
    return lambda: fn(q4, k, v, block_mask=bm, enable_gqa=True)


def bench_one(name: str, pipe, batch: int, context: int, repeats: int, bw: float, flex: bool,
              data) -> dict:
    cache, q, k, v = data
    shape = ir.Shape(HQ, HKV, D, PS, "float16")
    t0 = time.perf_counter()
    kern = get_backend("tvm").lower(pipe.ir, shape, {}, Target.parse("llvm"))
    compile_s = time.perf_counter() - t0
    out, (idx, cnt) = kern.run(q, cache, return_lists=True)
    ref_exec = tw.reference(pipe)
    ref_out = ref_exec.run(q, cache)
    err = (out.float() - ref_out.float()).abs().max().item()
    row = {"pipeline": name, "context": context, "batch": batch, "compile_s": round(compile_s, 2),
           "kept_mean": round(cnt.float().mean().item(), 1), "max_err_vs_ref": err}
    row["tvm_ms"] = median_ms(lambda: kern.run(q, cache), repeats)
    x = kern.inputs(q, cache)
    row["tvm_attend_ms"] = median_ms(lambda: kern.attend(x, idx, cnt), repeats)
    row["attend_gbs"] = attend_bytes(kern, idx, cnt) / row["tvm_attend_ms"] / 1e6
    row["attend_bw_frac"] = row["attend_gbs"] / bw
    base = fastest_sdpa(q, k, v, timer=lambda fn: median_ms(fn, repeats))
    row["sdpa_ms"], row["sdpa"] = base.ms, str(base)
    row["reference_ms"] = median_ms(lambda: ref_exec.run(q, cache), max(1, min(repeats, 3)), 0)
    if flex:
        mask = lists_to_mask(idx, cnt, context)
        try:
            run = flex_runner(q, k, v, mask)
            row["flex_ms"] = median_ms(run, repeats, warmup=2)
        except Exception as e:  # report, do not die: FlexAttention on CPU is young
            row["flex_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    for base in ("sdpa", "reference", "flex"):
        if f"{base}_ms" in row:
            row[f"x_vs_{base}"] = row[f"{base}_ms"] / row["tvm_ms"]
    return row


def attend_bytes(kern, idx, cnt) -> float:
    """K and V bytes the attention stage must read: each kept token's rows once per KV head
    when a group shares its list (as the kernel does), once per query head otherwise."""
    from twilight.compiler.tvm.attend import attend_rows
    rows, gh = attend_rows(kern.ctx)
    per_row = cnt[:, ::gh].sum().item()
    return per_row * 2 * D * 2


def pipelines():
    return {"quest_twilight": tw.builtins.quest_twilight(),
            "quest_top_k": tw.builtins.quest_top_k(budget=1024)}


def print_table(rows: list[dict], bw: float) -> None:
    cols = ["pipeline", "context", "batch", "kept_mean", "tvm_ms", "tvm_attend_ms", "sdpa_ms",
            "reference_ms", "flex_ms", "x_vs_sdpa", "x_vs_reference", "x_vs_flex",
            "attend_bw_frac"]
    fmt = {c: (lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)) for c in cols}
    title = f"twilight tvm (llvm) vs torch — machine copy bandwidth {bw:.1f} GB/s"
    try:
        from rich.console import Console
        from rich.table import Table
        t = Table(title=title)
        for c in cols:
            t.add_column(c)
        for r in rows:
            t.add_row(*[fmt[c](r.get(c, "-")) for c in cols])
        Console(width=220).print(t)
        print("sdpa: the fastest torch SDPA per row: " +
              ", ".join(sorted({r["sdpa"] for r in rows if "sdpa" in r})))
    except ImportError:
        print(title)
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(fmt[c](r.get(c, "-")) for c in cols))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pipelines", nargs="+", default=list(pipelines()))
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (slow compile)")
    ap.add_argument("--quick", action="store_true", help="context 8k, batch 1, 3 repeats")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--snapshot", metavar="F", help="also every layer of this attention "
                    "snapshot through twilight.load, against the same baseline")
    ap.add_argument("--snapshot-layers", metavar="I,J", help="only these layer slots")
    a = ap.parse_args(argv)
    if a.quick:
        a.contexts, a.batch, a.repeats = [8192], [1], 3
    torch.manual_seed(0)
    bw = machine_bandwidth_gbs()
    rows = []
    pipes = pipelines()
    for context in a.contexts:
        for batch in a.batch:
            data = make_data(pipes["quest_twilight"], batch, context)
            for name in a.pipelines:
                rows.append(bench_one(name, pipes[name], batch, context, a.repeats, bw,
                                      not a.no_flex, data))
                print(json.dumps({k: v for k, v in rows[-1].items()}), flush=True)
    print_table(rows, bw)
    real = None
    if a.snapshot:
        from real_attention import bench_snapshot, print_snapshot
        layers = [int(x) for x in a.snapshot_layers.split(",")] if a.snapshot_layers else None
        real = bench_snapshot(a.snapshot, layers=layers, repeats=a.repeats,
                              on_row=lambda r: print(json.dumps(r), flush=True))
        print_snapshot(real)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine_copy_gbs": bw, "threads": torch.get_num_threads(),
                       "rows": rows, "snapshot": real}, f, indent=1)


if __name__ == "__main__":
    main()
