"""Cost of every key estimator on the CPU (TVM, llvm), measured in one run.

For each estimator choice of ``twilightc calibrate`` (exact; INT8/4/2 per token, smoothed per
token, per page channel, per channel within 4 pages) the pipeline ``quest_twilight`` with that
estimator is compiled for this machine and timed on the same cache and queries:

* ``estimate_ms`` — the estimate stage alone (the stage the choice changes), median of repeats;
* ``pipeline_ms`` — the whole step (select → estimate → top-p → attend);
* ``x_vs_token``  — ``estimate_ms`` of INT4 per token (the published estimator) over this one's;
* ``x_vs_sdpa``   — the one dense baseline (``measure.fastest_sdpa``: the fastest torch SDPA
  over the same K/V among float32/bfloat16/float16 and both GQA layouts) over ``pipeline_ms``;
* ``bytes/token`` — bytes the estimate reads per candidate token and KV head;
* ``max_err``     — the estimate's largest deviation from the torch reference's weights.

Data: random fp16 keys with outlier channels (3 channels 10-30x the rest, as in Llama-family
models) and a few heavy tokens per KV head aligned with the queries.

    python benchmarks/estimator_bench.py --context 4096 --batch 1 --repeats 7
    python benchmarks/estimator_bench.py --only int4_token int4_page --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

import twilight as tw
from twilight.compiler import ir
from twilight.compiler.backend import Target, get_backend
from twilight.compiler.stages import rows_to_dense, run_stages
from twilight.runtime.evaluation.estimators import est_bytes
from twilight.runtime.evaluation.measure import fastest_sdpa, median_time
from twilight.runtime.evaluation.reference_stages import ref_estimate, ref_select
from twilight.runtime.serving.pipeline_cache import make_cache
from twilight.runtime.store.estimator_choice import CHOICES, with_estimator


def median_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` (the tuner's own timer: warmed up, synchronized)."""
    return median_time(fn, repeats=repeats, max_seconds=30.0) * 1e3


def make_data(p: ir.PipelineIR, shape: ir.Shape, batch: int, context: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hkv, d = shape.kv_heads, shape.head_dim
    cache = make_cache(p, hkv, d, dtype=torch.float16,
                       initial_pages=batch * context // p.page_size + 8)
    ids = cache.add_requests(batch)
    q = torch.randn(batch, shape.q_heads, d, generator=gen)
    chans = torch.tensor([3, 17, 40]) % d
    for i, rid in enumerate(ids):
        k = torch.randn(hkv, context, d, generator=gen)
        k[:, :, chans] = torch.tensor([12.0, -25.0, 30.0]) * (1 + 0.05 * torch.randn(
            hkv, context, 3, generator=gen))
        pos = torch.randint(0, context, (hkv, 32), generator=gen)
        dirs = q[i].view(hkv, -1, d).mean(1)
        k.scatter_add_(1, pos[..., None].expand(-1, -1, d), dirs[:, None].expand(-1, 32, -1) * 3)
        cache.append(k.half(), torch.randn(hkv, context, d, generator=gen).half(), rid)
    return cache, ids, q.half()


def measure(p: ir.PipelineIR, shape: ir.Shape, batch: int, context: int, repeats: int) -> dict:
    est = p.prune[0].estimator
    cache, ids, q = make_data(p, shape, batch, context)
    kern = get_backend("tvm").lower(p, shape, {}, Target.parse("llvm"))
    x = kern.inputs(q, cache, ids)
    idx, cnt = kern.select(x)
    w = kern.estimate(0, x, idx, cnt)
    want = ref_estimate(p, 0, x, ref_select(p, x))
    err = (rows_to_dense(w, idx, cnt, x.max_len) - want).abs().max().item()
    k, v, _ = cache.gather(ids)
    base = fastest_sdpa(q, k, v, timer=lambda fn: median_ms(fn, repeats))
    sdpa_ms = base.ms
    row = {"estimator": est.name, "bytes/token": est_bytes(est, shape.head_dim, p.page_size),
           "estimate_ms": median_ms(lambda: kern.estimate(0, x, idx, cnt), repeats),
           "pipeline_ms": median_ms(lambda: run_stages(kern, x, len(p.prune)), repeats),
           "sdpa_ms": sdpa_ms, "sdpa": str(base), "max_err": err}
    return row | {"x_vs_sdpa": sdpa_ms / row["pipeline_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", default="32,8,128", help="q_heads,kv_heads,head_dim")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", nargs="*", default=None, metavar="NAME")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    shape = ir.Shape(hq, hkv, d, 16, "float16")
    base = tw.builtins.quest_twilight().ir
    rows = []
    for est in CHOICES:
        if args.only and est.name not in args.only:
            continue
        row = measure(with_estimator(base, est), shape, args.batch, args.context, args.repeats)
        rows.append(row)
        print(f"{row['estimator']:18s} {row['bytes/token']:6.1f} B/token  estimate "
              f"{row['estimate_ms']:8.3f} ms  pipeline {row['pipeline_ms']:8.3f} ms "
              f"({row['x_vs_sdpa']:.2f}x SDPA {row['sdpa_ms']:.3f} ms)  "
              f"max_err {row['max_err']:.2e}", flush=True)
    tok = next((r["estimate_ms"] for r in rows if r["estimator"] == "int4_token"), None)
    if tok:
        for r in rows:
            r["x_vs_token"] = tok / r["estimate_ms"]
        print("estimate speed vs int4_token (higher is faster): " + ", ".join(
            f"{r['estimator']} {r['x_vs_token']:.2f}x" for r in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"context": args.context, "batch": args.batch, "shape": [hq, hkv, d],
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
