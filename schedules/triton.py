"""The Triton backend's schedule space: tiles, warps, stages, split-KV, top-p strategy.

Every parameter here is read by a stage generator in ``twilight.compiler.triton``:

* ``select_block_n`` / ``select_warps`` — pages (or tokens) scored per program, and its warps;
* ``select_radix_bits`` — bits resolved per histogram pass of the top-k radix search
  (selector top-k and the top-k pruner);
* ``scan_block`` / ``scan_warps`` — block of the per-row scans (decisions, list compaction);
* ``estimate_block_n`` / ``estimate_warps`` — candidates per step of the quantized-key GEMV;
* ``attend_block_n`` / ``attend_warps`` / ``attend_splits`` — flash-decoding tile, warps and
  split-KV count (1 = no combine kernel);
* ``num_stages`` — software pipelining depth of the GEMV/attention loops;
* ``fuse_prune_compact`` — a fusion choice: fold each pruner's kept-list compaction into its
  decide kernel (one launch per pruner instead of two; a ``union`` group stays unfused);
* the shared top-p space (``schedules.common.TOP_P``): sort / bisect (mass, eps or iters) / radix.

The default is what the AOT test checks for spills at head_dim 128, fp16, on sm_80 and sm_90.
"""

from __future__ import annotations

from .common import TOP_P
from .space import Param, Space

TRITON = Space("triton", (
    Param("select_block_n", (16, 32, 64, 128), 32, doc="units scored per program"),
    Param("select_warps", (1, 2, 4, 8), 4),
    Param("select_radix_bits", (4, 8), 8, doc="bits per pass of the top-k radix search"),
    Param("scan_block", (128, 256, 512, 1024), 256, doc="block of per-row scans"),
    Param("scan_warps", (1, 2, 4, 8), 4),
    Param("estimate_block_n", (16, 32, 64, 128), 32),
    Param("estimate_warps", (1, 2, 4, 8), 4),
    Param("attend_block_n", (8, 16, 32, 64), 16),
    Param("attend_warps", (1, 2, 4, 8), 4),
    Param("attend_splits", (1, 2, 4, 8, 16), 4, doc="split-KV count (1: no combine step)"),
    Param("num_stages", (1, 2, 3, 4), 2),
    Param("fuse_prune_compact", (False, True), False,
          doc="prune decide + kept-list compaction in one kernel (False: two launches)"),
)) + TOP_P

DEFAULT = TRITON.default()
