"""How long TVM's pool workers spin before they sleep (``TVM_THREAD_POOL_SPIN_COUNT``), against
a served step and the torch SDPA that runs right after twilight.

For each spin count, in a fresh process (TVM reads the variable once): the median of
``DecodePipeline.run`` (the served step, finite check included) on the synthetic problem, the
median of SDPA's first 10 calls right after a block of steps (what spinning workers would
slow), and SDPA's settled median. ``compiler/tvm/build.py: SPIN_COUNT`` is chosen from this.

    python benchmarks/pool_spin.py --spins 300 3000 30000 --shape 9,3,64 --bucket 1x8192
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time, warnings
import torch
warnings.simplefilter("ignore")
import twilight as tw
from twilight.compiler import ir
from twilight.runtime.evaluation.problems import make_problem
from twilight.runtime.store.tuning_log import ShapeBucket
hq, hkv, d, b, t = map(int, sys.argv[1:6])
pipe = tw.builtins.quest_twilight()
shape = ir.Shape(hq, hkv, d, 16, "float16")
prob = make_problem(pipe.ir, shape, ShapeBucket(b, t))
dp = tw.load(pipe, "cpu", shape, "tvm", batch=b, context=t)
dp.plan(b, t)
K = torch.randn(b, hkv, t, d)
V, Q = torch.randn_like(K), torch.randn(b, hkv, hq // hkv, d)
sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(Q, K, V)
def times(fn, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); out.append((time.perf_counter() - t0) * 1e3)
    return out
step, after, settled = [], [], []
for _ in range(6):
    step += times(lambda: dp.run(prob.q, prob.cache, prob.ids), 100)[20:]
    after += times(sdpa, 10)
    time.sleep(0.05)
    settled += times(sdpa, 30)[10:]
print(json.dumps([statistics.median(x) for x in (step, after, settled)]))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spins", type=int, nargs="+", default=[0, 300, 3000, 30000, 300000])
    ap.add_argument("--shape", default="9,3,64", help="q_heads,kv_heads,head_dim")
    ap.add_argument("--bucket", default="1x8192", help="batch x context")
    a = ap.parse_args()
    hq, hkv, d = a.shape.split(",")
    b, t = a.bucket.split("x")
    print(f"{a.shape} {a.bucket}: spin | served step ms | SDPA fp32 right after twilight ms | "
          "SDPA settled ms")
    for spin in a.spins:
        env = {**os.environ, "TVM_THREAD_POOL_SPIN_COUNT": str(spin)}
        done = subprocess.run([sys.executable, "-c", CHILD, hq, hkv, d, b, t], env=env,
                              capture_output=True, text=True, check=True)
        step, after, settled = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{spin:>8} | {step:.3f} | {after:.3f} | {settled:.3f}", flush=True)


if __name__ == "__main__":
    main()
