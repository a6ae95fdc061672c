"""The decode pipeline as a ``torch.library`` custom op, ``torch.ops.twilight.decode``, so a
model compiled with ``torch.compile`` (``fullgraph=True`` included) calls it as one opaque node.

A paged KV cache is state, not a tensor argument (it grows, and holds a page table and side
data), so the op names it by a *handle* — a string ``bind()`` hands out for a loaded pipeline,
its cache and the requests — as vLLM's attention op names its layer. The handle is a constant of
the traced graph; the fake (meta) kernel gives the output's shape and dtype (those of ``q``)
without touching the cache. With ``k``/``v`` the op first appends the step's keys and values
(``[B, Hkv, n, D]``) to the bound requests, then attends — for one token (``n = 1``, or
``[B, Hkv, D]``) through ``DecodePipeline.step``: one compiled call where the backend fuses the
append and the pipeline (TVM on the CPU).

Example::

    >>> import torch, twilight as tw
    >>> from twilight.runtime.serving import torch_op
    >>> dec = tw.load(tw.builtins.quest_twilight(budget=64), backend="tvm",
    ...               shape=tw.Shape(8, 2, 64, 16, "float32"))             # doctest: +SKIP
    >>> cache = dec.make_cache(); rid = cache.add_request()                 # doctest: +SKIP
    >>> cache.append(torch.randn(2, 300, 64), torch.randn(2, 300, 64), rid) # doctest: +SKIP
    >>> handle = torch_op.bind(dec, cache, req=[rid])                       # doctest: +SKIP
    >>> f = torch.compile(lambda q: torch.ops.twilight.decode(q, handle), fullgraph=True)
    >>> f(torch.randn(1, 8, 64)).shape                                      # doctest: +SKIP
    torch.Size([1, 8, 64])
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ...compiler.backend import CPU_THREADS
from ...errors import InputError
from .decode_pipeline import in_model_threads
from .load import DecodePipeline
from .paged_cache import PagedKVCache

__all__ = ["bind", "bound", "decode", "unbind"]


@dataclass
class Binding:
    pipeline: DecodePipeline
    cache: PagedKVCache
    req: list[int] | None
    cpu_threads: int = 0  # CPU threads of its kernels (0: the schedule's; see ``bind``)


_BOUND: dict[str, Binding] = {}
_COUNTER = itertools.count()


def bind(pipeline: DecodePipeline, cache: PagedKVCache, req: int | Sequence[int] | None = None,
         name: str | None = None, cpu_threads: int | None = None) -> str:
    """A handle for ``torch.ops.twilight.decode``: ``pipeline`` over ``cache`` for the
    requests ``req`` (None: every live request at call time). Re-binding a name replaces it.

    ``cpu_threads``: the threads the op's CPU kernels run on. The op runs inside a model, between
    its torch ops, so by default on half of torch's threads, as ``hf_attention.install`` does
    (``decode_pipeline.in_model_threads``); 0 runs them on the tuned schedule's threads."""
    threads = in_model_threads(cpu_threads)
    name = name or f"{pipeline.ir.name}#{next(_COUNTER)}"
    ids = None if req is None else cache.resolve_ids(req)
    _BOUND[name] = Binding(pipeline, cache, ids, threads)
    return name


def bound(handle: str) -> Binding:
    try:
        return _BOUND[handle]
    except KeyError:
        raise InputError(f"twilight::decode: no pipeline bound to handle {handle!r}; make one "
                         "with twilight.runtime.serving.torch_op.bind(pipeline, cache)") from None


def unbind(handle: str) -> None:
    _BOUND.pop(handle, None)


@torch.library.custom_op("twilight::decode", mutates_args=())
def decode(q: Tensor, handle: str, k: Tensor | None = None, v: Tensor | None = None) -> Tensor:
    """Attention ``[B, Hq, D]`` of ``q`` over the bound cache (after appending ``k``/``v``)."""
    b = bound(handle)
    if (k is None) != (v is None):
        raise InputError("twilight::decode: pass both k and v, or neither")
    token = CPU_THREADS.set(b.cpu_threads)
    try:
        return _decode(b, q, k, v)
    finally:
        CPU_THREADS.reset(token)


def _decode(b: Binding, q: Tensor, k: Tensor | None, v: Tensor | None) -> Tensor:
    if k is not None:  # append and attend: one compiled call where the backend fuses them
        ids = b.req if b.req is not None else b.cache.request_ids
        if k.dim() == 4 and k.shape[2] != 1:
            b.cache.append(k.contiguous(), v.contiguous(), ids)
        else:
            return b.pipeline.step(q, k, v, b.cache, ids)
    return b.pipeline.run(q, b.cache, b.req)


@decode.register_fake
def _decode_fake(q: Tensor, handle: str, k: Tensor | None = None,
                 v: Tensor | None = None) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
