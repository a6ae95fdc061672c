"""The paged cache a pipeline needs: its page summaries and key-code formats, kept on append."""

from __future__ import annotations

import torch

from ...compiler import ir
from ...compiler.keycodes import KeyCodeSpec, minmax_summaries
from ...compiler.torch_expr import summary_fn, token_summary_fn
from ...compiler.verify import verify
from .cache_side import Appender
from .paged_cache import PagedKVCache

__all__ = ["make_cache", "minmax_summaries"]


def make_cache(pipeline, num_kv_heads: int, head_dim: int, *, dtype=torch.float16,
               device="cpu", initial_pages: int = 64,
               appender: Appender | None = None) -> PagedKVCache:
    """A cache that keeps what ``pipeline`` reads: its page and token summaries, quantized keys
    and (for ``attention(mean_value=True)``) the running sum of V (with ``appender``'s generated
    kernels when given: ``PagedKVCache``)."""
    p = ir.as_ir(pipeline)
    verify(p, ir.Shape(num_kv_heads, num_kv_heads, head_dim, p.page_size))
    fields = {f"{s.name}.{f.name}": f.expr for s in p.summaries() for f in s.fields}
    tok_fields = {f"{s.name}.{f.name}": f.expr for s in p.token_summaries() for f in s.fields}
    return PagedKVCache(num_kv_heads, head_dim, page_size=p.page_size, dtype=dtype,
                        device=device, summaries={n: summary_fn(e) for n, e in fields.items()},
                        key_codes=KeyCodeSpec.of_pipeline(p), initial_pages=initial_pages,
                        minmax_summaries=minmax_summaries(p),
                        token_summaries={n: token_summary_fn(e) for n, e in tok_fields.items()},
                        track_v_sum=p.attend.mean_value,
                        summary_keys={n: e.key() for n, e in (fields | tok_fields).items()},
                        appender=appender)
