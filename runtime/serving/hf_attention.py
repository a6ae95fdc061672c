"""A transformers (5.x) attention backend that runs a model's decode steps through twilight.

``install(model, pipeline)`` first reads what every layer's attention computes, from the model
itself (:mod:`~twilight.runtime.hf_semantics`: one short run through a recording attention
function, and a check of each full-attention layer's output against the math twilight runs),
then decides per layer:

* **twilight** — a causal full-attention layer past the first ``dense_layers``: its decode
  steps run ``DecodePipeline.step`` over the layer's paged cache (the step's key and value
  appended and attended in one call: one compiled call on the CPU), with the layer's own logit
  scale (Gemma's ``query_pre_attn_scalar``) and softcap (Gemma-2) put into the pipeline's
  ``attention(scale=, softcap=)``, and learned sinks (gpt-oss) folded in after it
  (``out · sigmoid(lse − sink)``, the lse over the kept tokens);
* **model** — every other layer (sliding-window, chunked, linear, KV-shared, the dense first
  layers) keeps the model's own attention function and its own cache layer: exactly the model.

A full-attention layer that does something twilight does not reproduce (a position bias, an
attention argument it does not know, MLA's separate value head_dim, bidirectional attention,
an output that differs from ``softmax(scale·q·k)·v``) is refused at ``install`` with
:class:`~twilight.frontend.errors.UnsupportedModel`, naming the layer and the feature.

Prefill stays dense (the model's own attention function). Padding (a batch of different prompt
lengths) is left out of the paged cache, ``model.generate(..., cache=att.new_cache())`` works,
beam search works (repeated beams copy pages), cropping is refused
(:mod:`~twilight.runtime.hf_cache`).

Example::

    from transformers import AutoModelForCausalLM
    from twilight.runtime.hf_attention import install

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    att = install(model)                            # "auto": see twilight.runtime.hf_auto
    print(att.report())                             # what runs where, and why
    cache = att.new_cache()
    logits = model(prompt_ids, cache=cache, use_cache=True).logits   # dense prefill
    step = model(next_ids, cache=cache, use_cache=True).logits       # twilight decode
    out = model.generate(prompt_ids, cache=att.new_cache(), max_new_tokens=32)
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ...compiler import ir
from ...compiler.backend import CPU_THREADS
from ...errors import InputError, UnsupportedModel
from .decode_pipeline import in_model_threads
from .hf_cache import make_cache_class, make_layer_class
from .hf_semantics import (
    LayerSemantics,
    ModelSemantics,
    read_semantics,
    sinks_of,
    unknown_kwargs,
    visible_from_mask,
)
from .load import DecodePipeline, load

__all__ = ["TwilightAttention", "install"]

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def with_layer_attention(p: ir.PipelineIR, sem: LayerSemantics) -> ir.PipelineIR:
    """``p`` with the layer's logit scale and softcap in its attention stage; the pipeline
    is left as it is (same key, same tuned schedules) where they are the defaults. A pipeline
    that sets a scale or softcap of its own that the layer does not have is refused."""
    default = sem.head_dim ** -0.5
    want_scale = None if math.isclose(sem.scale, default, rel_tol=1e-6) else sem.scale
    att = p.attend
    if att.scale is not None and not math.isclose(att.scale, sem.scale, rel_tol=1e-6):
        raise UnsupportedModel(f"layer {sem.index} scales logits by {sem.scale:.6g}, pipeline "
                               f"{p.name!r} by {att.scale:.6g}: leave attention(scale=) unset")
    if att.softcap is not None and att.softcap != sem.softcap:
        raise UnsupportedModel(f"layer {sem.index} softcaps logits at {sem.softcap}, pipeline "
                               f"{p.name!r} at {att.softcap}: leave attention(softcap=) unset")
    new = dataclasses.replace(att, scale=att.scale if att.scale is not None else want_scale,
                              softcap=sem.softcap)
    return p if new == att else dataclasses.replace(p, attend=new)


def sink_factor(q: Tensor, paged, ids: list[int], idx: Tensor, cnt: Tensor, sinks: Tensor,
                scale: float, softcap: float | None) -> Tensor:
    """``sigmoid(lse − sink) [B, Hq]``: what a softmax with a learned sink logit per query head
    leaves of the attention over the kept tokens (lse: their log-sum-exp)."""
    b, hq, _ = q.shape
    group, ps = hq // paged.num_kv_heads, paged.page_size
    pos = idx.long().clamp(min=0)  # [B, Hq, K]
    table = paged.page_table[torch.tensor(ids, device=paged.device)].long()  # [B, NP]
    phys = table[:, None, :].expand(b, hq, -1).gather(2, pos // ps)
    head = (torch.arange(hq, device=q.device) // group)[None, :, None].expand_as(pos)
    keys = paged.k_pages[phys, head, pos % ps].float()  # [B, Hq, K, D]
    logits = torch.einsum("bhkd,bhd->bhk", keys, q.float()) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    live = torch.arange(pos.shape[-1], device=q.device) < cnt[..., None].long()
    lse = logits.masked_fill(~live, float("-inf")).logsumexp(-1)
    return torch.sigmoid(lse - sinks.float()[None].to(q.device))


@dataclass
class SparseLayer:
    """How twilight runs one layer's decode step."""

    sem: LayerSemantics
    decode: DecodePipeline
    sparse_from: int = 0  # positions below which the layer attends as the model does
    cpu_threads: int = 0  # CPU threads of its kernels (0: the schedule's; see ``install``)

    def check(self, kw: dict) -> None:
        """A call must carry what ``install`` read; anything else is refused, not ignored."""
        s, sw, cap = kw.get("scaling"), kw.get("sliding_window"), kw.get("softcap")
        if (s is not None and not math.isclose(float(s), self.sem.scale, rel_tol=1e-6)) \
                or sw is not None or (cap or None) != self.sem.softcap or kw.get("dropout") \
                or unknown_kwargs(kw):
            raise UnsupportedModel(
                f"layer {self.sem.index}: its attention was called with scaling={s}, "
                f"sliding_window={sw}, softcap={cap}, dropout={kw.get('dropout')}"
                f"{', ' + ', '.join(unknown_kwargs(kw)) if unknown_kwargs(kw) else ''}: not "
                f"what install read ({self.sem.features()}); install again")

    def run(self, q: Tensor, layer, module, kw: dict) -> Tensor:
        token = CPU_THREADS.set(self.cpu_threads)
        try:
            return self._run(q, layer, module, kw)
        finally:
            CPU_THREADS.reset(token)

    def _run(self, q: Tensor, layer, module, kw: dict) -> Tensor:
        step = layer.take_step()
        if step is not None and not self.sem.sinks:  # append + attend: one compiled call
            return self.decode.step(q, step[0], step[1], layer.paged, layer.ids)
        if step is not None:
            layer.paged.append(step[0][:, :, None], step[1][:, :, None], layer.ids)
        if not self.sem.sinks:
            return self.decode.run(q, layer.paged, layer.ids)
        out, (idx, cnt) = self.decode.run(q, layer.paged, layer.ids, return_lists=True)
        f = sink_factor(q, layer.paged, layer.ids, idx, cnt, sinks_of(module, kw),
                        self.sem.scale, self.sem.softcap)
        return (out.float() * f[..., None]).to(out.dtype)


class TwilightAttention:
    """What :func:`install` set up: per-layer decisions, the loaded pipelines, ``new_cache()``,
    and the attention function registered with transformers."""

    def __init__(self, model, semantics: ModelSemantics, sparse: dict[int, SparseLayer],
                 decisions: dict[int, str], name: str, initial_pages: int, note: str = ""):
        self.model, self.semantics, self.sparse = model, semantics, sparse
        self.decisions, self.name, self.initial_pages, self.note = decisions, name, \
            initial_pages, note
        self.dense_fn = semantics.dense_fn
        self.current: dict[int, object] = {}  # layer -> the TwilightLayer updated last
        self.decode_calls = 0
        self.device = next(model.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(self.semantics.layers)

    @property
    def decode(self) -> DecodePipeline | None:
        """The pipeline of the first twilight layer (most models have one for all)."""
        return next(iter(self.sparse.values())).decode if self.sparse else None

    def report(self) -> str:
        """One line per layer: its attention features and what runs it."""
        start = {sl.sparse_from for sl in self.sparse.values()}
        lines = [f"{type(self.model).__name__} ({self.semantics.implementation}): "
                 f"{len(self.sparse)} of {self.num_layers} layers through twilight"
                 + (f" from {max(start)} positions on" if start and max(start) else "")
                 + (f"; {self.note}" if self.note else "")]
        for s in self.semantics.layers:
            lines.append(f"  {s.index:3d} {s.module or '-':24s} {s.features():48s} "
                         f"{self.decisions[s.index]}")
        return "\n".join(lines)

    def new_cache(self, initial_pages: int | None = None, *, from_cache=None,
                  attention_mask: Tensor | None = None):
        """The cache (``cache=``) for one batch of requests: the model's own cache layers,
        a ``TwilightLayer`` where twilight runs the layer.

        ``from_cache``: a cache the model filled with its own attention (a dense prefill is
        what twilight runs too), copied in — twilight layers get its keys and values, other
        layers a copy; ``attention_mask [B, T]`` marks its padding (left out of the pages)."""
        layer_cls = make_layer_class()
        pages = initial_pages or self.initial_pages
        if from_cache is not None:
            longest = max((int(c.get_seq_length()) for c in from_cache.layers
                           if hasattr(c, "get_seq_length")), default=0)
            ps = min((sl.decode.ir.page_size for sl in self.sparse.values()), default=16)
            pages = max(pages, -(-longest // ps) + 1)
        layers = {i: layer_cls(sl.decode.make_cache(initial_pages=pages, device=self.device),
                               i, self, sl.sparse_from) for i, sl in self.sparse.items()}
        cache = make_cache_class()(self.model.config, layers)
        if from_cache is not None:
            self._adopt(cache, from_cache, attention_mask)
        return cache

    def _adopt(self, cache, source, attention_mask: Tensor | None) -> None:
        import copy  # noqa: PLC0415

        if len(source.layers) != len(cache.layers):
            raise InputError(f"from_cache has {len(source.layers)} layers, the model "
                             f"{len(cache.layers)}")
        for i, src in enumerate(source.layers):
            if i not in self.sparse:
                cache.layers[i] = copy.deepcopy(src)
                continue
            if type(src).__name__ != "DynamicLayer" or src.keys is None or not src.keys.numel():
                raise InputError(f"from_cache layer {i}: expected a filled DynamicLayer (the "
                                 f"model's own full-attention cache), got {type(src).__name__}")
            layer = cache.layers[i]
            layer.update(src.keys, src.values)
            self.current.pop(i, None)
            n = src.keys.shape[-2]
            layer.note_visible(None if attention_mask is None else
                               attention_mask[:, -n:].bool(), n)
            if layer.length >= layer.sparse_from:
                layer.to_paged()

    def uninstall(self) -> None:
        """Switch the model back to its own attention implementation."""
        self.model.set_attn_implementation(self.semantics.implementation)

    # ---- the attention function ------------------------------------------------------------

    def attention(self, module, query: Tensor, key: Tensor, value: Tensor, attention_mask=None,
                  **kw):
        """The function registered with ``AttentionInterface``: ``[B, T, Hq, D]`` out."""
        i = getattr(module, "layer_idx", None)
        layer = self.current.pop(i, None)
        if layer is None:  # a model-path layer, or the model run without a twilight cache
            return self.dense_fn(module, query, key, value, attention_mask, **kw)
        if key is not layer.returned:
            raise UnsupportedModel(f"layer {i}: its attention received keys other than the "
                                   "ones its twilight cache layer returned")
        sl = self.sparse[i]
        sl.check(kw)
        if not layer.paged_mode:  # below sparse_from: the model's own attention
            out = self.dense_fn(module, query, key, value, attention_mask, **kw)
            n = query.shape[2]
            vis = visible_from_mask(attention_mask, n, key.shape[-2], key.shape[0])
            layer.note_visible(None if vis is None else vis[:, -1, -n:], n)
            if layer.length >= layer.sparse_from:
                layer.to_paged()
            return out
        if layer.pending is None:
            return self._decode(sl, layer, module, query, attention_mask, kw)
        return self._later_chunk(module, query, layer, attention_mask, kw)

    def _decode(self, sl: SparseLayer, layer, module, query: Tensor, mask, kw):
        if mask is not None and mask.dim() == 4:
            last = mask[:, 0, -1, -1]
            hidden = ~last if last.dtype == torch.bool else last < torch.finfo(last.dtype).min / 2
            if bool(hidden.any()):
                raise InputError("attention_mask hides the decoded token itself: a decode step "
                                 "must see its own token (padding belongs in the prompt)")
        self.decode_calls += 1
        out = sl.run(query[:, :, 0], layer, module, kw)
        return out[:, None].to(query.dtype), None

    def _later_chunk(self, module, query: Tensor, layer, mask, kw):
        """A multi-token step after the first: each row's pages (its tokens only) with a mask
        of what each new position may see, through the model's own attention function."""
        b, n = query.shape[0], query.shape[2]
        vis = visible_from_mask(mask, n, layer.length, b)
        new_vis = None if vis is None else vis[:, -1, -n:]
        past = [int(layer.paged.lengths[r]) for r in layer.ids]
        layer.commit(new_vis)
        outs = []
        for row, rid in enumerate(layer.ids):
            k, v, _ = layer.paged.gather(rid)
            total = k.shape[2]
            kept = torch.arange(n) if new_vis is None else new_vis[row].nonzero().flatten().cpu()
            see = torch.ones(n, total, dtype=torch.bool)
            see[:, past[row]:] = kept[None, :] <= torch.arange(n)[:, None]
            outs.append(self.dense_fn(module, query[row:row + 1], k, v,
                                      self._mask(see.to(query.device), query.dtype), **kw)[0])
        return torch.cat(outs), None

    def _mask(self, see: Tensor, dtype: torch.dtype) -> Tensor:
        if self.semantics.implementation == "sdpa":
            return see[None, None]
        zero = torch.zeros((), dtype=dtype, device=see.device)
        return torch.where(see, zero, torch.finfo(dtype).min)[None, None]


def _resolve(pipeline, model, sem: ModelSemantics, context: int, dense_layers: int | None,
             model_name: str | None):
    """``(pipeline IR, dense_layers, sparse_from, calibration name, note)`` for ``pipeline``
    ("auto" or one given)."""
    if isinstance(pipeline, str):
        if pipeline != "auto":
            raise InputError(f"pipeline={pipeline!r}: pass a tw.Pipeline, its IR, or 'auto'")
        from .hf_auto import choose  # noqa: PLC0415

        return choose(model, sem, context, dense_layers, model_name)
    p = pipeline if isinstance(pipeline, ir.PipelineIR) else pipeline.ir
    return p, 2 if dense_layers is None else dense_layers, 0, model_name, ""


def _decide(sem: ModelSemantics, dense_layers: int) -> tuple[list[LayerSemantics], dict]:
    run, decisions = [], {}
    for s in sem.layers:
        if s.unknown:  # even on a layer left to the model: its code may prepare the argument
            raise UnsupportedModel(  # (a mask, an index) for 'sdpa'/'eager' only
                f"layer {s.index} ({s.module}) passes {', '.join(s.unknown)} to its attention "
                "function: an attention feature twilight does not know")
        if s.kind != "full":
            decisions[s.index] = f"model ({s.kind} layer: its own attention and cache)"
        elif s.index < dense_layers:
            decisions[s.index] = "model (dense: one of the first dense_layers)"
        elif s.problem:
            raise UnsupportedModel(f"layer {s.index} ({s.module}): {s.problem}")
        else:
            run.append(s)
            decisions[s.index] = "twilight"
    return run, decisions


def install(model, pipeline="auto", *, dense_layers: int | None = None, name: str = "twilight",
            device: str = "auto", backend: str = "auto", schedule: dict | None = None,
            context: int = 8192, initial_pages: int = 64, model_name: str | None = None,
            sparse_from: int | None = None, cpu_threads: int | None = None) -> TwilightAttention:
    """Make twilight ``model``'s attention backend for decode; returns the
    :class:`TwilightAttention` (run the model with ``cache=att.new_cache()``).

    ``pipeline``: a ``tw.Pipeline`` (or its IR), or ``"auto"`` — the model's calibrated choice
    (:mod:`twilight.runtime.hf_auto`). ``dense_layers``: leading layers left to the model's
    own attention (default 2, the published setting); ``context``: the context the tuned
    schedules are picked for; ``model_name``: the name ``twilightc calibrate`` filed the
    model's estimator choice under (default: read from the model's config); ``sparse_from``:
    below this many positions a twilight layer attends as the model does, on the model's own
    keys (default: "auto"'s choice, 0 for a pipeline given; at least the loaded pipeline's
    ``dense_below`` where twilight.load measures one); ``cpu_threads``: the threads twilight's
    CPU kernels run on inside the model (0: the tuned schedule's, by default the whole pool of
    ``torch.get_num_threads()``). The default is half of torch's threads (at least one): between
    the model's own ops torch's OpenMP workers spin on the same cores, and a kernel's workers
    sharing a core with one wait on it. Measured on 2 cores (SmolLM2-135M, 8k prompt,
    ``benchmarks/e2e.py``): 1.95x dense decode speed with one thread; with two, 1.48x when
    TVM's workers sleep at once and 0.72x when they spin 300 yields first (the default:
    ``compiler/tvm/build.py``), although alone (no torch op between calls) two threads run the
    attention ~1.8x faster.
    Raises :class:`UnsupportedModel` naming the feature where the model's attention cannot be
    reproduced exactly."""
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: PLC0415

    if model.config._attn_implementation == name:
        raise UnsupportedModel(f"twilight is already installed on this model (as {name!r}): "
                               "call uninstall() on the first install's result first")
    sem = read_semantics(model)
    p, dense_layers, auto_from, calib, note = _resolve(pipeline, model, sem, context,
                                                       dense_layers, model_name)
    run, decisions = _decide(sem, dense_layers)
    dtype = next(model.parameters()).dtype
    if dtype not in _DTYPE_NAMES:
        raise UnsupportedModel(f"model dtype {dtype}: twilight caches float32, float16 or "
                               "bfloat16")
    threads = in_model_threads(cpu_threads)
    loaded: dict[tuple, DecodePipeline] = {}
    sparse = {}
    for s in run:
        pl = with_layer_attention(p, s)
        shape = ir.Shape(s.q_heads, s.kv_heads, s.head_dim, pl.page_size, _DTYPE_NAMES[dtype])
        key = (pl.key(), shape)
        if key not in loaded:
            loaded[key] = load(pl, device, shape, backend, schedule=schedule, context=context,
                               model=calib)
        dec = loaded[key]
        start = auto_from if sparse_from is None else sparse_from
        sparse[s.index] = SparseLayer(s, dec, max(start, getattr(dec, "dense_below", 0) or 0),
                                      threads)
    if not sparse:
        warnings.warn(f"twilight runs no layer of {type(model).__name__}: "
                      + "; ".join(sorted(set(decisions.values()))), stacklevel=2)
    att = TwilightAttention(model, sem, sparse, decisions, name, initial_pages, note)
    AttentionInterface.register(name, att.attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sem.mask_fn)  # else no mask reaches prefill
    model.set_attn_implementation(name)
    return att
