"""The TVM backend's schedule space (llvm and cuda), with the shared top-p strategies.

llvm: rows (request × head × split) run under ``T.parallel`` on ``threads`` workers, channel
loops are tiled by ``vector_width`` and vectorized (the head_dim tile), attention walks its kept
tokens in blocks of ``attend_block_n``; ``split_kv`` splits each row's context (candidates,
pages, kept list) over the threads — split-K, for layouts whose batch × kv_heads rows cannot
fill the cores.
cuda: rows bind to ``blockIdx.x × threadIdx.x`` with ``cuda_threads`` rows a block;
``cuda_attend_staging="smem"`` stages each block's queries in shared memory for attention.
"""

from __future__ import annotations

from .common import TOP_P
from .space import Param, Space

TVM_KERNELS = Space("tvm", (
    Param("vector_width", (4, 8, 16, 32), 16,
          doc="channel tile: vector lanes of every head_dim loop (float32 lanes)"),
    Param("attend_block_n", (4, 8, 16, 32, 64), 16,
          doc="kept tokens per online-softmax rescale in attention"),
    Param("split_kv", (0, 1, 2, 4, 8), 0,
          doc="splits of each row's context over the threads (estimate, score and attention "
              "rows; a combine merges attention's): 0 = as many as fill the cores when batch × "
              "kv_heads cannot (llvm; 1 on cuda)"),
    Param("threads", (0, 1, 2, 4, 8, 16, 32), 0,
          doc="llvm: CPU worker threads (0 = the whole pool: torch's thread count, or "
              "TVM_NUM_THREADS / OMP_NUM_THREADS where set; more than the pool run on the pool)"),
    Param("estimate_query", ("float32", "int8"), "float32",
          doc="llvm with AVX-512 VNNI: the query of a quantized-key estimate in float32, or "
              "rounded to int8 per head (a power-of-two step, at most 1/64 of its largest "
              "coefficient) so that whole tiles of codes take integer dot products "
              "(vpdpbusd): a faster, slightly coarser estimate, which the gate judges"),
    Param("cuda_threads", (32, 64, 128, 256), 64, doc="cuda: rows (threads) per block"),
    Param("cuda_attend_staging", ("none", "smem"), "none",
          doc="cuda: attention's queries from a per-thread fp32 copy (none) or a block-wide "
              "shared-memory tile loaded coalesced (smem)"),
))

TVM = TVM_KERNELS + TOP_P
"""The full space of ``get_backend("tvm")``: kernel knobs plus ``schedules.common.TOP_P``."""


def default_schedule() -> dict:
    return TVM.default()


def space(p, shape, target, vnni: bool = False) -> Space:
    """The parameters that matter for ``p`` on ``target``: no CPU thread count on cuda, no
    thread-block size on llvm, no top-p knobs without a top-p pruner, no ``estimate_query``
    without a quantized-key estimate on an llvm target with AVX-512 VNNI (``vnni``: the
    backend asks LLVM)."""
    drop = {"cuda_threads", "cuda_attend_staging"} if target.kind == "llvm" else {"threads"}
    if not any(pr.rule == "top_p" for pr in p.prune):
        drop |= {q.name for q in TOP_P.params}
    if not (target.kind == "llvm" and vnni
            and any(pr.estimator is not None and pr.estimator.kind == "quantized"
                    for pr in p.prune)):
        drop.add("estimate_query")
    return Space(f"tvm:{target.kind}", tuple(q for q in TVM.params if q.name not in drop))
