"""twilight: a compiler and autotuner for sparse-attention decode pipelines.

    import twilight as tw
    pipe = tw.builtins.quest_twilight(budget=1024, p=0.9)
    out, kept = tw.reference(pipe).run(q, cache, return_kept=True)
    fast = tw.load(pipe, shape=tw.Shape(32, 8, 128))   # tuned, compiled, cached on disk
    out = fast.plan(batch=1, max_context=32768).run(q, cache)
"""

from __future__ import annotations

from .compiler.ir import PipelineIR, Shape
from .compiler.verify import verify
from .errors import InputError, NonFiniteInputError, PipelineError, TwilightError
from .frontend import builtins
from .frontend.dsl import (
    Pipeline,
    attention,
    exact_keys,
    fraction,
    nothing,
    page_summary,
    quantized_keys,
    score,
    sink,
    threshold,
    token_summary,
    tokens,
    top_k,
    top_p,
    window,
)
from .frontend.ops import (
    abs,
    absmax,
    distance,
    dot,
    exp,
    head_dim,
    log,
    max,
    maximum,
    mean,
    min,
    minimum,
    position,
    project,
    query_position,
    sign,
    softcap,
    sqrt,
    sum,
    tanh,
    top_channels,
    where,
)
from .runtime.evaluation.reference import reference
from .runtime.serving.load import DecodePipeline, load
from .runtime.serving.paged_cache import PagedKVCache
from .version import __version__ as __version__

__all__ = [
    "DecodePipeline", "InputError", "NonFiniteInputError", "PagedKVCache", "Pipeline",
    "PipelineError", "PipelineIR", "Shape", "TwilightError", "abs", "absmax", "attention",
    "builtins", "distance", "dot", "exact_keys", "exp", "fraction", "head_dim", "load", "log",
    "max", "maximum", "mean", "min", "minimum", "nothing", "page_summary", "position", "project",
    "quantized_keys", "query_position", "reference", "score", "sign", "sink", "softcap", "sqrt",
    "sum", "tanh", "threshold", "token_summary", "tokens", "top_channels", "top_k", "top_p",
    "verify", "where", "window",
]
