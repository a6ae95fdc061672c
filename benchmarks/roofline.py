"""What a decode step's stages must read and compute, and what this machine can do, measured in
the same run: the yardsticks ``step_bench.py`` and ``cpu_bench.py`` print beside each stage.

* ``machine()``: the bandwidth of a large copy (read + write bytes per second of 512 MiB, far
  past the caches) and the fp32 FMA peak as torch's 2048² matmul reaches it, both on the threads
  torch uses;
* ``stage_costs(...)``: per stage, the bytes it must read at least (each byte once) and the
  flops it must do, from the pipeline, the head layout and the list lengths of one step;
* ``fastest_sdpa(...)``: torch SDPA over the same K/V in float32, bfloat16 and float16
  (converted before timing), for interleaved timing; the fastest is the dense baseline.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from twilight.compiler import ir
from twilight.compiler.keycodes import KeyCodeSpec, packed_bytes
from twilight.runtime.evaluation.measure import WARM_CALLS, WARM_S

_ESIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = CLOCKS["wall"]


def use_clock(name: str) -> None:
    """Time with the wall clock (latency), or this thread's CPU time (``cpu``: the work done,
    whatever else runs on the machine; meaningful when everything runs on the calling thread,
    i.e. torch and TVM on one thread each)."""
    global _clock
    _clock = CLOCKS[name]


def median_ms(fn, repeats: int = 20, warmup: int = 2) -> float:
    """Median ms of ``repeats`` calls, after the warm-up ``measure.median_time`` gives a served
    figure in tune and eval: ``warmup`` calls and more, up to ``min(WARM_CALLS, repeats)``, while
    they take under ``WARM_S`` in all. One warm call was not enough right after a compile: the
    first row of a cpu_bench sweep read 0.87x where the same row alone read 1.43x."""
    n, start = 0, time.perf_counter()
    while n < warmup or (n < min(WARM_CALLS, repeats) and time.perf_counter() - start < WARM_S):
        fn()
        n += 1
    times = []
    for _ in range(repeats):
        t = _clock()
        fn()
        times.append((_clock() - t) * 1e3)
    return statistics.median(times)


@dataclass(frozen=True)
class Machine:
    bandwidth_gbs: float  # read + write bytes per second of a large copy
    fma_gflops: float  # fp32 matmul
    threads: int

    def describe(self) -> str:
        return (f"{self.threads} threads: copy {self.bandwidth_gbs:.1f} GB/s, fp32 matmul "
                f"{self.fma_gflops:.0f} GFLOP/s")


def machine(repeats: int = 5) -> Machine:
    bw = _copy_gbs(repeats)
    m = torch.randn(2048, 2048)
    gf = 2 * 2048 ** 3 / median_ms(lambda: m @ m, repeats, 1) / 1e6
    return Machine(bw, gf, torch.get_num_threads())


def _copy_gbs(repeats: int) -> float:
    a = torch.ones(128 * 1024 * 1024)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / median_ms(lambda: b.copy_(a), repeats, 1) / 1e6


@dataclass(frozen=True)
class Cost:
    bytes: float
    flops: float

    def floor_ms(self, m: Machine) -> float:
        """The stage's time at the machine's bandwidth or FMA peak, whichever binds."""
        return max(self.bytes / m.bandwidth_gbs, self.flops / m.fma_gflops) / 1e6


def stage_costs(p: ir.PipelineIR, shape: ir.Shape, batch: int, context: int,
                candidates: float, kept: float) -> dict[str, Cost]:
    """Bytes and flops per stage of one step over ``batch`` requests of ``context`` tokens, with
    ``candidates``/``kept`` the mean list lengths per query head."""
    e, d, hq, hkv, ps = _ESIZE[shape.dtype], shape.head_dim, shape.q_heads, shape.kv_heads, \
        shape.page_size
    pages = -(-context // ps) * batch
    out: dict[str, Cost] = {}
    sel = p.select
    if sel is not None and sel.score is not None:
        if sel.score.per == "page":
            fields = len(sel.score.summary.field_names())
            out["select"] = Cost(pages * hkv * fields * d * e, pages * hq * d * 2 * fields)
        else:
            out["select"] = Cost(batch * context * hkv * d * e, batch * context * hq * d * 2)
    rows = batch * hkv  # a GQA group reads each key once
    for i, pr in enumerate(p.prune):
        est = pr.estimator
        if est.kind == "exact":
            per_tok = d * e
        else:
            spec = KeyCodeSpec.of(est)
            per_tok = packed_bytes(d, est.bits) + (8 if spec.granularity == "token" else
                                                   2 * d * e / (ps * spec.group_pages))
        out[f"estimate{i}"] = Cost(rows * candidates * per_tok, batch * hq * candidates * d * 2)
        out[f"prune{i}"] = Cost(batch * hq * candidates * 4, batch * hq * candidates)
    out["attend"] = Cost(rows * kept * 2 * d * e, batch * hq * kept * d * 4)
    out["append"] = Cost(batch * hkv * (2 * d * e + ps * d * e), batch * hkv * ps * d * 4)
    return out


def dense_tensors(cache, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    k, v, valid = cache.gather(ids)
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    return k, v, mask


def sdpa_runners(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> dict:
    """``{"sdpa_<dtype>": fn}`` over copies of the same K/V in each dtype (made here, before any
    timing)."""
    out = {}
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        q4, kk, vv = q[:, :, None].to(dt), k.to(dt).contiguous(), v.to(dt).contiguous()

        def run(q4=q4, kk=kk, vv=vv):
            return torch.nn.functional.scaled_dot_product_attention(q4, kk, vv, attn_mask=mask,
                                                                    enable_gqa=True)
        out[f"sdpa_{str(dt).split('.')[1]}"] = run
    return out
