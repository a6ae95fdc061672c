"""CPU benchmark of the TVM backend (llvm) against torch on the same data, in one run.

For quest_twilight and quest_top_k at contexts 4k–32k, batch 1 and 4, 32 query heads / 8 KV heads,
head_dim 128, fp16 cache: medians over repeats of

* ``tvm``       — the whole pipeline in one compiled call (``TVMCompiled.call_fused``, what
  ``DecodePipeline.run`` does on the CPU) with the default schedule; ``stages`` — the same stage
  by stage;
* ``served``    — what a user gets: ``twilight.load(pipe, "cpu", shape, "tvm", batch=,
  context=)`` with the shipped (or your) tuning logs — the nearest bucket's schedule and its
  dense crossover — timed as ``tune`` and ``eval`` time (``measure.served_ms``);
* ``sdpa``      — the one dense baseline (``measure.fastest_sdpa``): the fastest torch
  ``scaled_dot_product_attention`` over the same contiguous K/V among float32, bfloat16 and
  float16 and both GQA layouts, converted before the timing (column ``sdpa`` says which);
* ``reference`` — ``twilight.reference(pipe).run`` (the torch sparse executor);
* ``flex``      — ``flex_attention`` under ``torch.compile`` with a block mask of the pipeline's kept
  pages (page-sized KV blocks, token-exact ``mask_mod``); the mask is built outside the timing;

plus each TVM stage alone (select, estimate, prune, attend) with the bytes it must read and the
flops it must do over its time as fractions of the machine's copy bandwidth and fp32 FMA peak,
both measured in the same run (``roofline.py``).

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
import os
import time
import warnings

import roofline  # a sibling script (benchmarks/ is on sys.path when run)
import torch
from roofline import machine, stage_costs

import twilight as tw
from twilight.compiler import ir
from twilight.compiler.backend import Target, get_backend
from twilight.compiler.stages import lists_to_mask
from twilight.runtime.evaluation.measure import Problem, fastest_sdpa, served_ms
from twilight.runtime.serving.pipeline_cache import make_cache

HQ, HKV, D, PS = 32, 8, 128, 16


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    return roofline.median_ms(fn, repeats, warmup)


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


def bench_one(name: str, pipe, batch: int, context: int, repeats: int, mach, flex: bool,
              data) -> dict:
    cache, q, k, v = data
    shape = ir.Shape(HQ, HKV, D, PS, "float16")
    t0 = time.perf_counter()
    kern = get_backend("tvm").lower(pipe.ir, shape, {}, Target.parse("llvm"))
    compile_s = time.perf_counter() - t0
    ids = cache.request_ids
    kern.plan(batch, context)
    out, (idx, cnt) = kern.call_fused(q, cache, ids, return_lists=True)
    cnt = cnt.clone()
    ref_exec = tw.reference(pipe)
    ref_out = ref_exec.run(q, cache)
    err = (out.float() - ref_out.float()).abs().max().item()
    row = {"pipeline": name, "context": context, "batch": batch, "compile_s": round(compile_s, 2),
           "kept_mean": round(cnt.float().mean().item(), 1), "max_err_vs_ref": err}
    row["tvm_ms"] = median_ms(lambda: kern.call_fused(q, cache, ids), repeats)
    row.update(served_row(pipe, shape, cache, q, batch, context, repeats))
    row["stages_ms"] = median_ms(lambda: kern.run(q, cache), repeats)
    row.update(stage_rows(kern, pipe, q, cache, batch, context, repeats, mach))
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
    row["served_x_vs_sdpa"] = row["sdpa_ms"] / row["served_ms"]
    return row


def served_row(pipe, shape, cache, q, batch: int, context: int, repeats: int) -> dict:
    """``twilight.load``'s pipeline for this bucket on the same cache: its ms per step and
    which tuning-log bucket (or ``"default"``) its schedule came from."""
    with warnings.catch_warnings():  # a layout nothing was tuned for: reported as "default"
        warnings.simplefilter("ignore")
        dp = tw.load(pipe, "cpu", shape, "tvm", batch=batch, context=context)
    prob = Problem(q, cache, list(cache.request_ids))
    return {"served_ms": served_ms(dp, prob, repeats), "served_from": dp.schedule_source,
            "served_dense_below": dp.dense_below}


def stage_rows(kern, pipe, q, cache, batch: int, context: int, repeats: int, mach) -> dict:
    """Each stage's time and its fractions of the machine's bandwidth and FMA peak."""
    x = kern.inputs(q, cache)
    lists = [kern.select(x)]
    fns = {"select": lambda: kern.select(x)}
    for i in range(len(pipe.ir.prune)):
        w = kern.estimate(i, x, *lists[-1])
        fns[f"estimate{i}"] = lambda i=i, li=lists[-1]: kern.estimate(i, x, *li)
        fns[f"prune{i}"] = lambda i=i, w=w, li=lists[-1]: kern.prune(i, x, w, *li)
        lists.append(tuple(t.clone() for t in kern.prune(i, x, w, *lists[-1])))
    fns["attend"] = lambda li=lists[-1]: kern.attend(x, *li)
    costs = stage_costs(pipe.ir, kern.ctx.shape, batch, context,
                        float(lists[0][1].float().mean()), float(lists[-1][1].float().mean()))
    row = {}
    for name, fn in fns.items():
        ms = row[f"{name}_ms"] = median_ms(fn, repeats)
        c = costs.get(name)
        if c is not None:
            row[f"{name}_bw_frac"] = c.bytes / ms / 1e6 / mach.bandwidth_gbs
            row[f"{name}_fma_frac"] = c.flops / ms / 1e6 / mach.fma_gflops
    return row


def pipelines():
    return {"quest_twilight": tw.builtins.quest_twilight(),
            "quest_top_k": tw.builtins.quest_top_k(budget=1024)}


def print_table(rows: list[dict], mach) -> None:
    cols = ["pipeline", "context", "batch", "kept_mean", "tvm_ms", "served_ms", "stages_ms",
            "sdpa_ms", "sdpa", "reference_ms", "flex_ms", "x_vs_sdpa", "served_x_vs_sdpa",
            "x_vs_reference", "x_vs_flex"]
    fmt = {c: (lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)) for c in cols}
    title = f"twilight tvm (llvm) vs torch — machine: {mach.describe()}"
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
        print("served: twilight.load's pipeline, from " +
              "; ".join(sorted({str(r.get("served_from")) for r in rows})))
    except ImportError:
        print(title)
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(fmt[c](r.get(c, "-")) for c in cols))
    print("stages: ms (fraction of copy bandwidth / of fp32 FMA peak)")
    for r in rows:
        parts = [f"{n[:-3]} {r[n]:.3f} ({r.get(n[:-3] + '_bw_frac', 0):.0%} / "
                 f"{r.get(n[:-3] + '_fma_frac', 0):.0%})" for n in r
                 if n.endswith("_ms") and n[:-3] in ("select", "attend")
                 or n.startswith(("estimate", "prune")) and n.endswith("_ms")]
        print(f"  {r['pipeline']} {r['batch']}x{r['context']}: " + ", ".join(parts))


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
    ap.add_argument("--threads", type=int, default=0,
                    help="torch's and TVM's thread count (default: theirs, one per core)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or the calling thread's CPU time (with --threads 1)")
    a = ap.parse_args(argv)
    if a.threads:  # before TVM's thread pool starts
        os.environ["TVM_NUM_THREADS"] = str(a.threads)
        torch.set_num_threads(a.threads)
    if a.clock == "cpu" and a.threads != 1:
        ap.error("--clock cpu measures the calling thread only: use it with --threads 1")
    roofline.use_clock(a.clock)
    if a.quick:
        a.contexts, a.batch, a.repeats = [8192], [1], 3
    torch.manual_seed(0)
    mach = machine()
    rows = []
    pipes = pipelines()
    for context in a.contexts:
        for batch in a.batch:
            data = make_data(pipes["quest_twilight"], batch, context)
            for name in a.pipelines:
                rows.append(bench_one(name, pipes[name], batch, context, a.repeats, mach,
                                      not a.no_flex, data))
                print(json.dumps({k: v for k, v in rows[-1].items()}), flush=True)
    print_table(rows, mach)
    real = None
    if a.snapshot:
        from real_attention import bench_snapshot, print_snapshot
        layers = [int(x) for x in a.snapshot_layers.split(",")] if a.snapshot_layers else None
        real = bench_snapshot(a.snapshot, layers=layers, repeats=a.repeats,
                              on_row=lambda r: print(json.dumps(r), flush=True))
        print_snapshot(real)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine_copy_gbs": mach.bandwidth_gbs, "fma_gflops": mach.fma_gflops,
                       "threads": mach.threads, "load_avg": os.getloadavg()[0], "rows": rows,
                       "snapshot": real}, f, indent=1)


if __name__ == "__main__":
    main()
