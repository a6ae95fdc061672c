"""A transformers (5.x) attention backend that runs a model's decode steps through twilight.

``install(model, pipeline)`` loads the pipeline for the model's head layout (``twilight.load``),
registers an attention function under ``name`` with ``AttentionInterface`` — and, beside it,
``sdpa_mask`` under the same name in ``ALL_MASK_ATTENTION_FUNCTIONS``: without a mask function
transformers passes no mask at all, and prefill would silently lose its causal mask — and
switches the model to it. ``new_cache()`` then makes the cache (``cache=``, formerly
``past_key_values=``) to run the model with: the first ``dense_layers`` layers keep transformers' dense ``DynamicLayer`` (published
Quest/Twilight setups keep the first two layers dense), the others a :class:`TwilightLayer`
that appends every new key and value to a :class:`~twilight.runtime.serving.paged_cache.PagedKVCache`
of its own (page summaries and quantized keys are kept as it grows).

* prefill (more than one query token) is dense: SDPA over the prompt's own keys, or, for a later
  chunk, over the keys gathered back from the pages;
* a decode step (one query token) of a sparse layer is one ``DecodePipeline.step`` over the
  layer's paged cache: the layer's ``update`` leaves the new key and value to the attention
  call, which appends them and attends (one compiled call on the CPU); the dense layers attend
  with SDPA as usual.

Batches of equal-length sequences only (no padding); beam search, cropping and reordering of a
twilight layer are not supported.

Example::

    from transformers import AutoModelForCausalLM
    import twilight as tw
    from twilight.runtime.serving.hf_attention import install

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tw_attn = install(model, tw.builtins.quest_twilight(budget=1024), dense_layers=2)
    cache = tw_attn.new_cache()
    logits = model(prompt_ids, cache=cache, use_cache=True).logits   # dense prefill
    step = model(next_ids, cache=cache, use_cache=True).logits       # sparse decode
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...compiler import ir
from .load import DecodePipeline, load
from .paged_cache import PagedKVCache

__all__ = ["TwilightAttention", "TwilightLayer", "install"]

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _layer_base():
    from transformers.cache_utils import DynamicLayer  # noqa: PLC0415 - optional dependency
    return DynamicLayer


def make_layer_class():
    """``TwilightLayer``, built on first use so that importing twilight needs no transformers."""

    class TwilightLayer(_layer_base()):
        """One sparse layer's cache: a ``PagedKVCache`` appended on every ``update``."""

        is_croppable = False

        def __init__(self, paged: PagedKVCache):
            super().__init__()
            self.paged, self.ids, self.length = paged, None, 0
            self.pending = None  # a decode step's (k, v), appended by the attention call

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            self.device, self.dtype = key_states.device, key_states.dtype
            self.keys = self.values = torch.empty(0, device=self.device)
            self.ids = self.paged.add_requests(key_states.shape[0])
            self.is_initialized = True

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            past, n = self.length, key_states.shape[-2]
            dt = self.paged.dtype
            self.flush()
            if past and n == 1:  # decode: the attention call appends it (one fused step)
                self.pending = (key_states[:, :, 0].to(dt), value_states[:, :, 0].to(dt))
            else:
                self.paged.append(key_states.to(dt).contiguous(),
                                  value_states.to(dt).contiguous(), self.ids)
            self.length += n
            if past == 0 or n == 1:  # prefill attends to itself; decode reads the pages
                return key_states, value_states
            k, v, _ = self.paged.gather(self.ids)  # a later prefill chunk: the whole context
            return k.to(key_states.dtype), v.to(value_states.dtype)

        def flush(self) -> None:
            """Append a decode step's K/V that no attention call took (a dense fallback)."""
            if self.pending is not None:
                k, v = self.pending
                self.pending = None
                self.paged.append(k[:, :, None].contiguous(), v[:, :, None].contiguous(),
                                  self.ids)

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.length + query_length, 0

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            raise NotImplementedError("a twilight layer cannot be reset: make a new cache")

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("a twilight layer cannot be cropped")

        def reorder_cache(self, beam_idx) -> None:
            raise NotImplementedError("beam search is not supported by twilight layers")

        batch_repeat_interleave = batch_select_indices = reorder_cache

    return TwilightLayer


TwilightLayer = None  # the class, once make_layer_class() has run (see install)


class TwilightAttention:
    """What :func:`install` sets up: the loaded pipeline, the layer split, ``new_cache()``."""

    def __init__(self, model, decode: DecodePipeline, dense_layers: int, name: str,
                 initial_pages: int):
        cfg = model.config
        self.decode, self.name, self.initial_pages = decode, name, initial_pages
        self.num_layers = cfg.num_hidden_layers
        self.dense_layers = min(dense_layers, self.num_layers)
        self.current: dict[int, object] = {}  # layer index -> the TwilightLayer last updated
        self.decode_calls = 0
        self.dense_fn = None

    def sparse(self, layer_idx: int) -> bool:
        return layer_idx >= self.dense_layers

    def new_cache(self, initial_pages: int | None = None):
        """``past_key_values`` for one generation: dense layers, then twilight layers."""
        from transformers.cache_utils import Cache, DynamicLayer  # noqa: PLC0415

        owner = self

        class TwilightCache(Cache):
            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                owner.current[layer_idx] = self.layers[layer_idx]
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)

        pages = initial_pages or self.initial_pages
        layers = [TwilightLayer(self.decode.make_cache(initial_pages=pages))
                  if self.sparse(i) else DynamicLayer() for i in range(self.num_layers)]
        return TwilightCache(layers=layers)

    def attention(self, module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                  scaling: float | None = None, dropout: float = 0.0, **kwargs):
        """The function registered with ``AttentionInterface``: ``[B, T, Hq, D]`` out."""
        layer = self.current.get(getattr(module, "layer_idx", -1))
        if query.shape[2] != 1 or layer is None or not isinstance(layer, TwilightLayer) \
                or layer.length == 1:
            if isinstance(layer, TwilightLayer):
                layer.flush()
            return self.dense_fn(module, query, key, value, attention_mask, scaling=scaling,
                                 dropout=dropout, **kwargs)
        self.decode_calls += 1
        q = query[:, :, 0].to(self.decode.dtype)
        if layer.pending is not None:  # append + attend: one compiled call (TVM on the CPU)
            k, v = layer.pending
            layer.pending = None
            out = self.decode.step(q, k, v, layer.paged, layer.ids)
        else:
            out = self.decode.run(q, layer.paged, layer.ids)
        return out.to(query.dtype)[:, None], None


def install(model, pipeline, *, dense_layers: int = 2, name: str = "twilight",
            device: str = "auto", backend: str = "auto", schedule: dict | None = None,
            context: int = 8192, initial_pages: int = 64) -> TwilightAttention:
    """Load ``pipeline`` for ``model``'s heads and make it the model's attention backend.

    ``dense_layers``: how many leading layers stay dense at decode; ``context``: the shape
    bucket whose tuned schedule ``twilight.load`` prefers. Returns the
    :class:`TwilightAttention`; run the model with ``cache=att.new_cache()``."""
    global TwilightLayer
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # noqa: PLC0415

    if TwilightLayer is None:
        TwilightLayer = make_layer_class()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = _DTYPE_NAMES[next(model.parameters()).dtype]
    p = pipeline if isinstance(pipeline, ir.PipelineIR) else pipeline.ir
    shape = ir.Shape(cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, p.page_size,
                     dtype)
    scale = p.attend.scale or head_dim ** -0.5
    for mod in model.modules():
        if hasattr(mod, "layer_idx") and hasattr(mod, "scaling") \
                and abs(float(mod.scaling) - scale) > 1e-6 * scale:
            raise ValueError(f"layer {mod.layer_idx} scales logits by {mod.scaling}, the "
                             f"pipeline by {scale}: build it with attention(scale=...)")
    decode = load(p, device, shape, backend, schedule=schedule, context=context)
    att = TwilightAttention(model, decode, dense_layers, name, initial_pages)
    att.dense_fn = sdpa_attention_forward
    AttentionInterface.register(name, att.attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)  # else no mask reaches prefill
    model.set_attn_implementation(name)
    return att
