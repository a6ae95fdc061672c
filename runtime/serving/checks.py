"""What twilight checks where a decode step's inputs enter, and its one non-finite policy.

**Non-finite values** — one policy for the torch reference and every backend (TVM, Triton):

* *Queries.* ``run`` refuses a query holding NaN or ±inf with ``NonFiniteInputError`` naming
  the first request and query head that holds one (``check_query_finite``, in
  ``compiler/stages.py`` so that the backends' own ``Compiled.run`` apply it too). The
  reference always checks; ``DecodePipeline.run`` (``tw.load``, the torch op, the transformers
  backend) and the backends' ``run`` check unless ``TWILIGHT_CHECK_FINITE=0``. The check is
  one float64 sum of ``q [B, Hq, D]`` (exact: finite values cannot overflow a float64 sum),
  under 0.1% of a CPU decode step (README, "Inputs: limits and non-finite values"); on a GPU
  it is one host sync per step, which serving may turn off, accepting unspecified output for
  a non-finite query.
* *Keys and values* are refused by ``PagedKVCache.append`` (naming request, KV head and token
  position) before anything is stored. A cache never holds a non-finite value, so no kernel
  and no reference path has to decide what NaN means, and nothing is ever replaced by zero.
* *Zero on purpose*, in one place only: a head with nothing to attend to (``tw.nothing()``
  without a keep rule, or an empty request) gives an exactly-zero output row, in the
  reference and every backend.
* *What finite inputs can still do:* a score expression that evaluates to NaN (``0/0`` in a
  user's score) ranks last in every backend; logits beyond float32's range (``|scale·q·k| >
  3.4e38``, reachable only with float32/bfloat16 values near 1e19) are outside the contract —
  the reference then returns NaN, never zero.

**The step's boundary.** A cache made for another layout (dtype, KV heads, head_dim, page
size) or for another pipeline (a summary or key-code format missing, or a summary of the same
name made by another expression) is refused with one line naming what differs
(:func:`check_cache`; ``DecodePipeline`` checks once per cache, not every step), and so is an
empty batch (:func:`batch_ids`).
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from ...compiler import ir
from ...compiler.keycodes import KeyCodeSpec
from ...compiler.stages import PagedCache, check_query_finite
from ...errors import InputError, NonFiniteInputError

__all__ = ["batch_ids", "cache_problem", "check_cache", "check_query_finite",
           "refuse_non_finite_kv"]


def _is_cache(cache) -> bool:
    return all(hasattr(cache, n) for n in ("resolve_ids", "summaries", "key_codes", "dtype",
                                           "num_kv_heads", "head_dim", "page_size"))


def batch_ids(cache: PagedCache, req) -> list[int]:
    """The request ids of one step (``req``; None: every live request), never empty."""
    if not _is_cache(cache):
        raise InputError(f"cache: expected a PagedKVCache (pipe.make_cache()), got "
                         f"{type(cache).__name__}")
    ids = cache.resolve_ids(req)
    if not ids:
        raise InputError("req: no requests to run (an empty list, or a cache with no live "
                         "request); add one with cache.add_request()")
    return ids


def cache_problem(p: ir.PipelineIR, cache: PagedCache, shape: ir.Shape | None = None) \
        -> str | None:
    """What makes ``cache`` unfit for ``p`` (built for ``shape``, when given), or None."""
    if not _is_cache(cache):
        return f"expected a PagedKVCache (pipe.make_cache()), got {type(cache).__name__}"
    want = {"page_size": p.page_size}
    if shape is not None:
        want |= {"num_kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
                 "dtype": getattr(torch, shape.dtype)}
    diff = [f"{n} {getattr(cache, n)} (the pipeline's: {w})" for n, w in want.items()
            if getattr(cache, n) != w]
    if diff:
        return "made for another layout: " + ", ".join(diff)
    for kind, summaries, kept in (("summary", p.summaries(), cache.summaries),
                                  ("token summary", p.token_summaries(),
                                   getattr(cache, "token_summaries", {}))):
        for s in summaries:
            for f in s.fields:
                name = f"{s.name}.{f.name}"
                if name not in kept:
                    return (f"keeps no {kind} {name!r} (has {sorted(kept) or 'none'}): it was "
                            "made for another pipeline")
                made = getattr(cache, "summary_keys", {}).get(name)
                if made is not None and made != f.expr.key():
                    return (f"{kind} {name!r} was made by another expression than pipeline "
                            f"{p.name!r}'s")
    if p.attend.mean_value and getattr(cache, "v_sum", None) is None:
        return "keeps no running sum of V (attention(mean_value=True) reads it)"
    for spec in KeyCodeSpec.of_pipeline(p):
        if spec not in cache.key_codes:
            have = ", ".join(sp.name for sp in cache.key_codes) or "none"
            return (f"keeps no {spec.name} key codes (has {have}): it was made for another "
                    "pipeline")
    return None


def check_cache(p: ir.PipelineIR, cache: PagedCache, shape: ir.Shape | None = None) -> None:
    """Raise ``InputError`` naming what differs if ``cache`` does not fit ``p``."""
    problem = cache_problem(p, cache, shape)
    if problem:
        raise InputError(f"cache: {problem}; make it with pipe.make_cache() (or make_cache("
                         "pipeline, ...)) for this pipeline and shape")


def whole(name: str, value, low: int = 1, high: int = ir.MAX_TOKENS) -> int:
    """``value`` as an int in ``[low, high]`` (Python or numpy integers; not bools or floats)."""
    want = f"expected a whole number from {low} to {high}"
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise InputError(f"{name}: {want}, got {value!r}") from None
    if not low <= n <= high:
        raise InputError(f"{name}: {want}, got {n}")
    return n


# ---- what PagedKVCache.append and its constructor check -----------------------------------------
def as_request_id(r, bad=...):
    """A request id as an int (numpy integers, 0-d integer tensors accepted); ``bad`` (default:
    ``r`` itself, which ``PagedKVCache.resolve_ids`` then refuses) for anything else."""
    if isinstance(r, bool) or (isinstance(r, Tensor) and (r.dim() or r.is_floating_point())):
        return r if bad is ... else bad
    try:
        return operator.index(r)
    except TypeError:
        return r if bad is ... else bad


def refuse_non_finite_kv(k: Tensor, v: Tensor, ids: list[int], old: Tensor) -> None:
    """``NonFiniteInputError`` naming the first request, KV head and token position whose key
    or value holds NaN/inf (``k``, ``v`` ``[B, Hkv, n, D]``; a float64 sum is the fast path:
    it is finite exactly when every value is)."""
    for name, t in (("k", k), ("v", v)):
        if math.isfinite(t.sum(dtype=torch.float64).item()):
            continue
        bad = (~torch.isfinite(t)).any(-1).nonzero()  # [m, 3]: (row, head, token)
        b, h, j = bad[0].tolist()
        kind = "NaN" if bool(t[b, h, j].isnan().any()) else "inf"
        raise NonFiniteInputError(
            f"{name}: request {ids[b]}, KV head {h}, token position {int(old[b]) + j} holds "
            f"{kind}; the cache refuses non-finite keys and values (nothing was appended)")


class allocating:
    """Turns a failed allocation (host or device memory) inside the block into one
    ``InputError``: ``what`` could not be allocated, and ``advice``."""

    def __init__(self, what: str, advice: str) -> None:
        self.what, self.advice = what, advice

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:
        if kind is not None and issubclass(kind, MemoryError | RuntimeError) \
                and ("alloc" in str(err).lower() or issubclass(kind, MemoryError)):
            first = (str(err).strip().splitlines() or [kind.__name__])[0]
            if "DefaultCPUAllocator" in first:  # drop torch's "[enforce fail at ...]" prefix
                first = first[first.index("DefaultCPUAllocator"):]
            raise InputError(f"{self.what}: could not be allocated ({first}); {self.advice}") \
                from None
        return False


def cache_pages(pages: int, heads: int, page_size: int, head_dim: int, dtype) -> allocating:
    """``allocating`` for a cache's K and V pages, with their size."""
    gib = 2 * pages * heads * page_size * head_dim * dtype.itemsize / 2**30
    return allocating(f"PagedKVCache: {pages} pages ({gib:.1f} GiB of K and V)",
                      "ask for fewer initial_pages or a smaller page_size")
