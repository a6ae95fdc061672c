"""Dense attention over a pipeline's own paged cache: what a loaded pipeline runs where dense
attention is faster than the sparse stages (short contexts, flat layers).

A serving process holds K/V only in the paged cache, so both implementations read from it:

* :class:`KernelDense` (``"kernels"``) — the backend's own kernels for the dense pipeline
  (every token kept) with the pipeline's attention (scale, softcap), reading pages in place;
* :class:`SdpaDense` (``"sdpa:<dtype>"``) — each step gathers the requests' pages into
  contiguous K/V in ``dtype`` (float32 on a CPU, where float16 SDPA is slow) and runs torch SDPA
  with the GQA group as query rows; the gather is part of its cost.

Which one, and below which context, the tuner measures (``runtime.tuning.crossover``) and writes
to the tuning log; :func:`twilight.load` builds the one recorded (``DecodePipeline.dense``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ...compiler import ir
from ...compiler.stages import StageInputs, run_stages
from ...errors import InputError

__all__ = ["KernelDense", "SdpaDense", "dense_ir", "parse_kind", "sdpa_dense", "supports"]

SDPA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dense_ir(p: ir.PipelineIR) -> ir.PipelineIR:
    """The dense pipeline with ``p``'s page size and attention (scale, softcap): the exact
    answer ``p`` approximates. A mean-value attention (SparQ) drops its reallocation: with
    every token kept the selector's mass is 1, so the mean of V gets weight 0 — and a dense
    pipeline has no selector scores to read it from."""
    return ir.PipelineIR("dense", p.page_size, None, (), ir.Keep(),
                         dataclasses.replace(p.attend, mean_value=False))


def parse_kind(kind: str) -> tuple[str, torch.dtype | None]:
    """``"kernels"`` or ``"sdpa:float32"`` (any dtype name) → ``(name, dtype)``."""
    name, _, dt = kind.partition(":")
    if name == "kernels" and not dt:
        return name, None
    if name != "sdpa" or dt not in SDPA_DTYPES:
        raise InputError(f"dense implementation {kind!r}: expected 'kernels' or "
                         "'sdpa:float32|bfloat16|float16'")
    return name, SDPA_DTYPES[dt]


class KernelDense:
    """The backend's compiled dense pipeline, run on the same planned stage inputs."""

    def __init__(self, compiled):
        self.compiled, self.kind = compiled, "kernels"

    def __call__(self, x: StageInputs, longest: int, return_lists: bool = False):
        return run_stages(self.compiled, x, 0, return_lists)

    def __repr__(self) -> str:
        return "twilight's dense kernels"


class SdpaDense:
    """torch SDPA over the requests' pages, gathered each step into contiguous ``dtype`` K/V."""

    def __init__(self, dtype: torch.dtype, page_size: int, scale: float | None):
        self.dtype, self.page_size, self.scale = dtype, page_size, scale
        self.kind = f"sdpa:{str(dtype).removeprefix('torch.')}"

    def __repr__(self) -> str:
        return f"torch SDPA {self.kind[5:]} over the gathered pages"

    def gather(self, pages: Tensor, x: StageInputs, n_pages: int) -> Tensor:
        """``pages [cap, Hkv, ps, D]`` of the batch as ``[B, Hkv, n_pages·ps, D]`` in ``dtype``."""
        b = x.page_table.shape[0]
        pt = x.page_table[:, :n_pages].clamp(min=0).flatten().long()
        g = pages.index_select(0, pt).view(b, n_pages, *pages.shape[1:])  # [B, NP, Hkv, ps, D]
        hkv, ps, d = pages.shape[1:]
        out = torch.empty(b, hkv, n_pages, ps, d, dtype=self.dtype, device=pages.device)
        return out.copy_(g.transpose(1, 2)).view(b, hkv, n_pages * ps, d)

    def __call__(self, x: StageInputs, longest: int, return_lists: bool = False):
        b, hq, d = x.q.shape
        n_pages = max(1, math.ceil(longest / self.page_size))
        k = self.gather(x.cache.k_pages, x, n_pages)
        v = self.gather(x.cache.v_pages, x, n_pages)
        hkv, t = k.shape[1], k.shape[2]
        pos = torch.arange(t, device=k.device)
        mask = (pos < x.lengths[:, None])[:, None, None, :]  # ragged lengths, partial pages
        q = x.q.to(self.dtype).view(b, hkv, hq // hkv, d)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                               scale=self.scale)
        out = out.reshape(b, hq, d).to(x.q.dtype)
        if not return_lists:
            return out
        live = (pos < x.lengths[:, None])[:, None, :].expand(b, hq, t)
        idx = torch.where(live, pos.to(torch.int32), -1)
        return out, (idx, x.lengths[:, None].expand(b, hq).to(torch.int32).contiguous())


def supports(p: ir.PipelineIR, kind: str) -> bool:
    """Whether ``kind`` computes ``p``'s attention: SDPA has no logit softcap."""
    name, _ = parse_kind(kind)
    return name == "kernels" or p.attend.softcap is None


def sdpa_dense(p: ir.PipelineIR, kind: str) -> SdpaDense:
    _, dtype = parse_kind(kind)
    return SdpaDense(dtype, p.page_size, p.attend.scale)
