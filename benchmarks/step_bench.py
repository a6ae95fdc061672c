"""One layer's decode step at a model's head layout, stage by stage, against dense attention.

Times, interleaved in one process (medians over rounds):

* ``sdpa_float32/bfloat16/float16`` — torch SDPA over the same K/V converted to each dtype
  beforehand; the fastest is the dense baseline every ratio is against;
* ``append`` — ``PagedKVCache.append`` of one token (torch: K/V rows, the page's summaries and
  key codes re-encoded);
* ``select``, ``estimate0``, ``prune0``, ``attend`` — each stage alone (the stage-by-stage path,
  ``DecodePipeline.run_stages``, and its total ``stages``);
* ``run`` — ``DecodePipeline.run``: the fused pipeline, one compiled call (TVM on the CPU);
* ``step`` — ``DecodePipeline.step``: the append and the pipeline, one compiled call.

Beside each: the bytes it must read and the flops it must do (``roofline.stage_costs``), what
that is per second, and its fraction of the machine's copy bandwidth and fp32 FMA peak measured
in the same run. Data: random keys with a few heavy tokens per KV head aligned with the group's
queries (peaked attention, as ``cpu_bench``), or one layer of a real snapshot (``--snapshot``).

    python benchmarks/step_bench.py                       # SmolLM2-135M: 9/3 heads, d64, fp32
    python benchmarks/step_bench.py --pipeline dense
    python benchmarks/step_bench.py --shape 32 8 128 16 float16 --context 32768 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from roofline import Cost, machine, median_ms, sdpa_runners, stage_costs, use_clock

import twilight as tw
from twilight.compiler import ir
from twilight.compiler.keycodes import KeyCodeSpec

SMOLLM2 = ("9", "3", "64", "16", "float32")


def peaked_kv(batch: int, shape: ir.Shape, context: int, heavy: int = 32, seed: int = 0):
    """Queries ``[B, Hq, D]`` and K/V ``[B, Hkv, T, D]`` (float32): random, with ``heavy``
    keys per KV head along the group's mean query."""
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d = shape.q_heads, shape.kv_heads, shape.head_dim
    q = torch.randn(batch, hq, d, generator=gen)
    k = torch.randn(batch, hkv, context, d, generator=gen)
    v = torch.randn(batch, hkv, context, d, generator=gen)
    for b in range(batch):
        pos = torch.randint(0, context, (hkv, heavy), generator=gen)
        dirs = q[b].view(hkv, hq // hkv, d).mean(1)
        k[b].scatter_(1, pos[..., None].expand(-1, -1, d), dirs[:, None].expand(-1, heavy, -1)
                      * 4.0 + 0.3 * torch.randn(hkv, heavy, d, generator=gen))
    return q, k, v


def snapshot_kv(path: str, layer: int, batch: int):
    from twilight.runtime.evaluation.snapshot import load_snapshot
    snap = load_snapshot(path)
    t = int(snap.q_pos[-1]) + 1
    q = snap.q[layer, -1].float()[None].expand(batch, -1, -1).contiguous()
    k = snap.k[layer, :, :t].float()[None].expand(batch, -1, -1, -1).contiguous()
    v = snap.v[layer, :, :t].float()[None].expand(batch, -1, -1, -1).contiguous()
    return q, k, v, float(snap.scale[layer])


def setup(a):
    hq, hkv, d, ps, dt = a.shape
    shape = ir.Shape(int(hq), int(hkv), int(d), int(ps), dt)
    if a.snapshot:
        q, k, v, scale = snapshot_kv(a.snapshot, a.layer, a.batch)
        shape = ir.Shape(q.shape[1], k.shape[1], q.shape[2], int(ps), dt)
    else:
        q, k, v = peaked_kv(a.batch, shape, a.context)
    pipe = getattr(tw.builtins, a.pipeline)()
    dec = tw.load(pipe, shape=shape, backend="tvm", schedule=json.loads(a.schedule))
    dtype = dec.dtype
    cache = dec.make_cache(initial_pages=a.batch * (k.shape[2] // int(ps) + 64))
    ids = cache.add_requests(a.batch)
    cache.append(k.to(dtype), v.to(dtype), ids)
    dec.plan(a.batch, k.shape[2] + 4096)
    return dec, cache, ids, q.to(dtype), k, v


def candidates(dec, cache, ids, q):
    """The timed functions, by name, and the step's list lengths."""
    c, b = dec.compiled, len(ids)
    x = dec.stage_inputs(q, cache, ids)
    idx, cnt = c.select(x)
    lists, fns = [(idx, cnt)], {}
    fns["select"] = lambda: c.select(x)
    for i in range(len(dec.ir.prune)):
        w = c.estimate(i, x, *lists[-1])
        fns[f"estimate{i}"] = lambda i=i, li=lists[-1]: c.estimate(i, x, *li)
        fns[f"prune{i}"] = lambda i=i, w=w, li=lists[-1]: c.prune(i, x, w, *li)
        lists.append(tuple(t.clone() for t in c.prune(i, x, w, *lists[-1])))
    fns["attend"] = lambda li=lists[-1]: c.attend(x, *li)
    fns["stages"] = lambda: dec.run_stages(q, cache, ids)
    out = torch.empty_like(q)
    fns["run"] = lambda: dec.run(q, cache, ids, out=out)
    gen = torch.Generator().manual_seed(1)
    shape = (b, dec.shape.kv_heads, dec.shape.head_dim)
    k1 = torch.randn(*shape, generator=gen).to(dec.dtype)
    v1 = torch.randn(*shape, generator=gen).to(dec.dtype)
    fns["append"] = lambda: cache.append(k1[:, :, None], v1[:, :, None], ids)
    fns["step"] = lambda: dec.step(q, k1, v1, cache, ids, out=out)
    return fns, float(cnt.float().mean()), float(lists[-1][1].float().mean())


def bench(a) -> dict:
    dec, cache, ids, q, k, v = setup(a)
    m = machine()
    fns, n_cand, n_kept = candidates(dec, cache, ids, q)
    mask = None
    fns |= sdpa_runners(q.float(), k, v, mask)
    times = {n: [] for n in fns}
    for _ in range(a.rounds):
        for n, f in fns.items():
            times[n].append(median_ms(f, a.repeats))
    ms = {n: statistics.median(t) for n, t in times.items()}
    costs = stage_costs(dec.ir, dec.shape, len(ids), k.shape[2], n_cand, n_kept)
    sdpa = {n: t for n, t in ms.items() if n.startswith("sdpa_")}
    best = min(sdpa, key=sdpa.get)
    for n in sdpa:
        costs[n] = Cost(2 * k.numel() * _esize(n), len(ids) * dec.shape.q_heads * k.shape[2]
                        * dec.shape.head_dim * 4)
    return {"machine": m, "ms": ms, "costs": costs, "best_sdpa": best, "candidates": n_cand,
            "kept": n_kept, "context": k.shape[2], "batch": len(ids), "shape": dec.shape,
            "pipeline": a.pipeline, "schedule": dec.schedule, "load": os.getloadavg()[0],
            "clock": a.clock,
            "spread": {n: (min(t), max(t)) for n, t in times.items()},
            "codes": [s.name for s in KeyCodeSpec.of_pipeline(dec.ir)]}


def _esize(name: str) -> int:
    return 4 if name.endswith("float32") else 2


def report(r: dict) -> None:
    m, ms, costs = r["machine"], r["ms"], r["costs"]
    base = ms[r["best_sdpa"]]
    print(f"{r['pipeline']} {r['shape']}  batch {r['batch']} × {r['context']} tokens, "
          f"candidates {r['candidates']:.0f}, kept {r['kept']:.0f} per query head; "
          f"schedule {r['schedule']}")
    print(f"machine: {m.describe()}; load average {r['load']:.2f} (other processes share "
          f"the cores: medians of interleaved rounds; {r['clock']} clock)")
    print(f"{'':12s} {'ms':>8s} {'x sdpa':>7s} {'MB read':>8s} {'GB/s':>7s} {'%bw':>5s} "
          f"{'GFLOP/s':>8s} {'%peak':>6s}")
    for name, t in ms.items():
        c = costs.get(name)
        row = f"{name:12s} {t:8.3f} {base / t:7.2f}"
        if c is not None and c.bytes:
            gbs, gfl = c.bytes / t / 1e6, c.flops / t / 1e6
            row += (f" {c.bytes / 1e6:8.2f} {gbs:7.1f} {100 * gbs / m.bandwidth_gbs:5.0f} "
                    f"{gfl:8.1f} {100 * gfl / m.fma_gflops:6.0f}")
        print(row)
    print(f"dense baseline: {r['best_sdpa']} {base:.3f} ms. One step including the append: "
          f"fused {ms['step']:.3f} ms = {base / ms['step']:.2f}x; torch append + stages "
          f"{ms['append'] + ms['stages']:.3f} ms = {base / (ms['append'] + ms['stages']):.2f}x")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs=5, default=list(SMOLLM2),
                    metavar=("HQ", "HKV", "D", "PAGE", "DTYPE"))
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pipeline", default="quest_twilight")
    ap.add_argument("--schedule", default="{}", help="JSON schedule (default: the backend's)")
    ap.add_argument("--snapshot", help="a snapshot .npz: one of its layers' K/V and query")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch's and TVM's thread count (default: theirs, one per core)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or the calling thread's CPU time (with --threads 1: the "
                         "work each call does, robust to other processes on the machine)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    if a.threads:  # before TVM's thread pool starts
        os.environ["TVM_NUM_THREADS"] = str(a.threads)
        torch.set_num_threads(a.threads)
    if a.clock == "cpu" and a.threads != 1:
        ap.error("--clock cpu measures the calling thread only: use it with --threads 1")
    use_clock(a.clock)
    r = bench(a)
    report(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**{k: v for k, v in r.items() if k not in ("machine", "costs", "shape")},
                       "machine": vars(r["machine"]), "shape": str(r["shape"])}, f, indent=1)


if __name__ == "__main__":
    main()
