"""Cold compile vs warm load of a pipeline through ``twilight.load`` (the kernel cache).

Every measurement is a separate Python process that imports torch and twilight, then times one
``twilight.load(...)`` call — everything it takes to get from a pipeline to kernels that run,
including whatever it imports (``tvm`` to compile; only ``tvm_ffi`` to load). The process then
runs one decode step and checks it against the reference, so a "load" that returned broken
kernels would fail here.

* cold: a fresh, empty ``TWILIGHT_CACHE_DIR`` per process (TVMScript parse, ``tvm.compile``,
  ``export_library`` of every kernel);
* warm: the cache the first cold run filled (manifest and checksums, ``tvm_ffi.load_module``).

Usage::

    python benchmarks/load_bench.py                       # quest_twilight, SmolLM2's heads
    python benchmarks/load_bench.py --no-settle           # GC pauses may land in load()
    python benchmarks/load_bench.py --no-bytecode         # honour PYTHONDONTWRITEBYTECODE=1
    python benchmarks/load_bench.py --cold 3 --warm 7 --q-heads 32 --kv-heads 8 --head-dim 128
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def child(args: argparse.Namespace) -> None:
    import torch

    import twilight as tw

    t_import = time.perf_counter() - T0
    pipe = getattr(tw.builtins, args.pipeline)(budget=args.budget)
    shape = tw.Shape(args.q_heads, args.kv_heads, args.head_dim, 16, "float32")
    if not args.no_settle:  # pay the garbage collection that importing torch left owing
        gc.collect()
    t = time.perf_counter()
    dec = tw.load(pipe, shape=shape, backend=args.backend, schedule={})
    load_s = time.perf_counter() - t
    cache = dec.make_cache()
    rid = cache.add_request()
    gen = torch.Generator().manual_seed(0)
    kv = [torch.randn(args.kv_heads, 2048, args.head_dim, generator=gen) for _ in range(2)]
    cache.append(*kv, rid)
    q = torch.randn(1, args.q_heads, args.head_dim, generator=gen)
    t = time.perf_counter()
    out = dec.plan(1, 2048).run(q, cache)
    first_s = time.perf_counter() - t
    err = (out - tw.reference(pipe).run(q, cache)).abs().max().item()
    print(json.dumps({"load_s": load_s, "origin": dec.origin, "import_s": t_import,
                      "first_run_s": first_s, "max_err": err,
                      "tvm_imported": "tvm" in sys.modules}))


def run_child(argv: list[str], cache_dir: str) -> dict:
    env = {**os.environ, "TWILIGHT_CACHE_DIR": cache_dir, "PYTHONWARNINGS": "ignore"}
    if BYTECODE:  # a deployed package has its .pyc files: let the children write and use them
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", *argv], env=env, check=True,
                         capture_output=True, text=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec["process_s"] = time.perf_counter() - t
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="quest_twilight")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--backend", default="tvm")
    ap.add_argument("--q-heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--cold", type=int, default=3, help="cold processes (fresh cache each)")
    ap.add_argument("--warm", type=int, default=5, help="warm processes")
    ap.add_argument("--no-settle", action="store_true",
                    help="no gc.collect() before the timed load (a full collection may then "
                         "fall inside it: ~75 ms after importing torch)")
    ap.add_argument("--no-bytecode", action="store_true",
                    help="keep PYTHONDONTWRITEBYTECODE as it is (imports then compile every "
                         "module from source, cold and warm alike)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global BYTECODE
    BYTECODE = not args.no_bytecode
    if args.child:
        return child(args)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("cold", "warm", "child", "no_settle", "no_bytecode")]
    argv += ["--no-settle"] if args.no_settle else []
    with tempfile.TemporaryDirectory(prefix="tw-load-bench-") as root:
        warm_dir = os.path.join(root, "warm")
        if BYTECODE:  # one untimed process writes the .pyc files everyone then reads
            run_child(argv, os.path.join(root, "pyc"))
        cold = [run_child(argv, warm_dir if i == 0 else os.path.join(root, f"cold{i}"))
                for i in range(args.cold)]
        warm = [run_child(argv, warm_dir) for _ in range(args.warm)]
    assert all(r["origin"] == "built" for r in cold), cold
    assert all(r["origin"] == "disk" for r in warm), warm
    med = {n: statistics.median(r["load_s"] for r in rs) for n, rs in (("cold", cold),
                                                                        ("warm", warm))}
    print(f"{args.pipeline} (budget {args.budget}), {args.backend}, heads {args.q_heads}/"
          f"{args.kv_heads} d{args.head_dim}; {os.cpu_count()} CPUs; one process per load; "
          f"gc.collect() before it: {not args.no_settle}; .pyc files: {BYTECODE}")
    for name, rs in (("cold", cold), ("warm", warm)):
        loads = ", ".join(f"{r['load_s'] * 1e3:.0f}" for r in rs)
        print(f"  {name}: load() median {med[name] * 1e3:8.1f} ms  [{loads}]  "
              f"process {statistics.median(r['process_s'] for r in rs):.2f} s, "
              f"tvm imported: {rs[0]['tvm_imported']}, max err {max(r['max_err'] for r in rs):.1e}")
    print(f"  warm/cold: {med['cold'] / med['warm']:.0f}x faster")


T0 = time.perf_counter()
BYTECODE = True
if __name__ == "__main__":
    main()
