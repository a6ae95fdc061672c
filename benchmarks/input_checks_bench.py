"""What the serving boundary's checks cost (runtime/serving/checks.py), at batch 1 × 8k tokens.

For quest_twilight on the TVM backend (fp16 cache), per head layout:

* ``step_on_ms`` / ``step_off_ms`` — ``DecodePipeline.run`` with ``TWILIGHT_CHECK_FINITE`` on and
  off, interleaved (A/B/A/B…), medians;
* ``q_check_us`` — the query check alone (``check_query_finite``), median of many calls, and
  its share of the step;
* ``kv_check_us`` — the K/V NaN/inf check of a one-token decode append alone
  (``refuse_non_finite_kv``), beside ``append_us``, the median of the whole append.

    python benchmarks/input_checks_bench.py                 # 9/3 x 64 and 32/8 x 128
    python benchmarks/input_checks_bench.py --repeats 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch

import twilight as tw
from twilight import knobs
from twilight.runtime.serving import checks


def _once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ab(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Medians (seconds) of ``fn_a`` and ``fn_b`` run alternately after one warm-up each."""
    fn_a(), fn_b()
    a, b = [], []
    for _ in range(repeats):
        a.append(_once(fn_a))
        b.append(_once(fn_b))
    return statistics.median(a), statistics.median(b)


def bench(hq: int, hkv: int, d: int, context: int, repeats: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tw.load(tw.builtins.quest_twilight(), shape=tw.Shape(hq, hkv, d, 16, "float16"),
                       backend="tvm")
    cache = pipe.make_cache(initial_pages=context // 16 + 64)
    rid = cache.add_request()
    gen = torch.Generator().manual_seed(0)
    cache.append(torch.randn(hkv, context, d, generator=gen).half(),
                 torch.randn(hkv, context, d, generator=gen).half(), rid)
    q = torch.randn(1, hq, d, generator=gen).half()
    pipe.plan(1, context + 4 * repeats)

    def run_with(on: bool):
        def run():
            with knobs.scope(check_finite=on):
                pipe.run(q, cache)
        return run
    on, off = ab(run_with(True), run_with(False), repeats)
    n = 2000
    check = statistics.median(_once(lambda: [checks.check_query_finite(q, cache, None)
                                             for _ in range(n)]) / n for _ in range(5))
    k1 = torch.randn(1, hkv, 1, d, generator=gen).half()
    old = cache.lengths[[rid]]
    kv_check = statistics.median(_once(lambda: [checks.refuse_non_finite_kv(k1, k1, [rid], old)
                                                for _ in range(n)]) / n for _ in range(5))
    appends = [_once(lambda: cache.append(k1[0], k1[0], rid)) for _ in range(repeats)]
    return {"shape": f"{hq}/{hkv}x{d}", "context": context,
            "step_on_ms": round(on * 1e3, 3), "step_off_ms": round(off * 1e3, 3),
            "q_check_us": round(check * 1e6, 2), "q_check_share": round(check / off, 5),
            "kv_check_us": round(kv_check * 1e6, 2),
            "append_us": round(statistics.median(appends) * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = [bench(hq, hkv, d, args.context, args.repeats)
            for hq, hkv, d in ((9, 3, 64), (32, 8, 128))]
    load = os.getloadavg()[0]
    for r in rows:
        print(f"{r['shape']:>10} 1x{r['context']}: step {r['step_on_ms']:.2f} ms checked / "
              f"{r['step_off_ms']:.2f} ms unchecked; q check {r['q_check_us']:.1f} us "
              f"({100 * r['q_check_share']:.3f}% of a step); K/V check of a one-token append "
              f"{r['kv_check_us']:.1f} us (the append: {r['append_us']:.0f} us)")
    print(f"(load average {load:.1f} on {os.cpu_count()} cores)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "load": load}, f, indent=1)


if __name__ == "__main__":
    main()
