"""What each attention layer of a transformers model computes, read from the model itself.

:func:`read_semantics` runs the model once on a few random tokens — a prefill and one decode
step, with the model's own cache and its own attention implementation — through a recording
attention function, and returns one :class:`LayerSemantics` per decoder layer: its kind (full,
sliding window, chunked, linear, KV-shared, ...), the window, the logit scale and softcap,
learned sinks, the head layout. These are what the layer's attention function *receives*, so a
feature that a config declares but the model never passes (Gemma-3 keeps an
``attn_logit_softcapping`` it does not use) is not invented, and one it passes is not missed.

Then, on the recorded decode step of every full-attention layer, it checks that the model's own
output equals ``softmax(scale·q·k [softcapped] [with a sink logit])·v`` over the keys the
layer's cache returned — what twilight's pipelines compute. A layer that does anything else
(a position bias, a kwarg twilight has no name for, keys that are not the cache's) gets a
``problem``; :func:`~twilight.runtime.hf_attention.install` refuses such a model, naming it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...errors import UnsupportedModel

__all__ = ["LayerSemantics", "ModelSemantics", "attention_reference", "read_semantics"]

HANDLED = frozenset({"scaling", "softcap", "sliding_window", "s_aux", "sinks", "dropout",
                     "is_causal"})
"""Attention-function kwargs whose meaning twilight reproduces (or checks)."""

INERT = frozenset({"position_ids", "use_cache", "output_attentions", "output_router_logits",
                   "cache_position", "output_hidden_states", "return_dict", "kwargs",
                   "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})
"""Kwargs that models pass along but neither SDPA nor eager attention reads."""

ORIGINAL_IMPLEMENTATIONS = ("sdpa", "eager")

_PROBE = "twilight_probe"


@dataclass(frozen=True)
class LayerSemantics:
    """One decoder layer's attention, as its attention function receives it.

    ``kind``: ``"full"`` (causal attention over the whole context: what twilight can run),
    ``"sliding"`` (the last ``window`` positions), ``"chunked"``, ``"linear"`` (a recurrent
    state), ``"shared"`` (keys and values of, or for, another layer), ``"custom"`` (attention
    computed without transformers' attention interface) or ``"none"``. ``problem``: why twilight
    cannot run this layer although it is full attention (None: it can)."""

    index: int
    kind: str
    module: str = ""
    window: int | None = None
    scale: float | None = None
    softcap: float | None = None
    sinks: bool = False
    q_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    value_dim: int = 0
    unknown: tuple[str, ...] = ()
    problem: str | None = None

    def features(self) -> str:
        """The layer's attention features, in words (for reports and errors)."""
        parts = [self.kind + (f" (window {self.window})" if self.window else "")]
        if self.q_heads:
            gqa = "MHA" if self.q_heads == self.kv_heads else \
                "MQA" if self.kv_heads == 1 else "GQA"
            parts.append(f"{gqa} {self.q_heads}/{self.kv_heads}×{self.head_dim}")
        if self.scale is not None and self.head_dim and \
                not math.isclose(self.scale, self.head_dim ** -0.5, rel_tol=1e-6):
            parts.append(f"scale {self.scale:.4g}")
        if self.softcap:
            parts.append(f"softcap {self.softcap:g}")
        if self.sinks:
            parts.append("learned sinks")
        return ", ".join(parts)


@dataclass
class ModelSemantics:
    """Every layer's :class:`LayerSemantics` and what the model attends with."""

    layers: list[LayerSemantics]
    implementation: str  # the model's own attention implementation ("sdpa" or "eager")
    dense_fn: object = field(repr=False)  # that implementation's attention function
    mask_fn: object = field(repr=False)  # and its mask function
    sinks: dict[int, Tensor] = field(default_factory=dict, repr=False)  # layer -> [Hq] logits

    def full_layers(self) -> list[int]:
        return [s.index for s in self.layers if s.kind == "full"]


# ---- the reference math twilight reproduces ------------------------------------------------


def attention_reference(q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None,
                        scale: float, softcap: float | None = None,
                        sinks: Tensor | None = None) -> Tensor:
    """``[B, Tq, Hq, D]``: softmax attention of ``q [B, Hq, Tq, D]`` over ``k``/``v``
    ``[B, Hkv, T, D]`` (GQA: query head ``h`` reads KV head ``h // (Hq/Hkv)``) where
    ``visible bool [B, Tq, T]`` (all when None), logits ``scale·q·k``, softcapped
    (``c·tanh(x/c)``), with a learned sink logit per query head in the denominator."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, 1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), kf) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if visible is not None:
        logits = logits.masked_fill(~visible[:, None], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
        w = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]
    else:
        w = torch.softmax(logits, -1)
    out = torch.einsum("bhqk,bhkd->bhqd", w, v.float().repeat_interleave(group, 1))
    return out.transpose(1, 2)


def visible_from_mask(mask, q_len: int, kv_len: int, batch: int) -> Tensor | None:
    """``bool [B, Tq, T]`` from the 4D mask an attention function receives (bool: True sees;
    float: 0 sees, a large negative number hides), or None when there is none."""
    if mask is None:
        return None
    m = mask[:, 0] if mask.dim() == 4 else mask
    m = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return m[..., -q_len:, -kv_len:].expand(batch, q_len, kv_len)


# ---- the probe -------------------------------------------------------------------------------


class _EagerAttention:
    """The eager attention function of each attention module's own modeling file (eager
    implementations differ per family: gpt-oss adds its sinks there)."""

    def __init__(self):
        self.fns: dict[type, object] = {}

    def of(self, module):
        fn = self.fns.get(type(module))
        if fn is None:
            fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if fn is None:
                raise UnsupportedModel(f"{type(module).__name__} has no eager_attention_forward "
                                       "in its modeling file: load the model with "
                                       "attn_implementation='sdpa'")
            self.fns[type(module)] = fn
        return fn

    def __call__(self, module, *args, **kwargs):
        return self.of(module)(module, *args, **kwargs)


def _original(model):
    """The model's attention implementation, its function and its mask function."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: PLC0415
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: PLC0415

    impl = model.config._attn_implementation
    if impl not in ORIGINAL_IMPLEMENTATIONS:
        raise UnsupportedModel(
            f"attention implementation {impl!r}: twilight runs beside 'sdpa' or 'eager' (load "
            "the model with attn_implementation='sdpa', or 'eager' where it has no SDPA path)")
    if impl == "sdpa":
        return impl, ALL_ATTENTION_FUNCTIONS["sdpa"], ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    return impl, _EagerAttention(), ALL_MASK_ATTENTION_FUNCTIONS["eager"]


@dataclass
class _Call:
    module: object
    q: Tensor
    k: Tensor
    v: Tensor
    mask: object
    kwargs: dict
    out: Tensor


def _two_steps(model, ids: torch.Tensor, tokens: int, phase: list | None = None):
    """A prefill of ``tokens`` and one decode step with the model's own cache: (logits, cache)."""
    from transformers import DynamicCache  # noqa: PLC0415

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        a = model(input_ids=ids[:, :tokens], cache=cache, use_cache=True).logits[:, -1]
        if phase:
            phase[0] = "decode"
        b = model(input_ids=ids[:, tokens:], cache=cache, use_cache=True).logits[:, -1]
    return torch.stack([a, b]).float(), cache


def _record(model, dense_fn, mask_fn, tokens: int, seed: int):
    """Per phase ("prefill", "decode"): layer -> list of calls; and the cache. Refuses a model
    that computes attention without the interface, or whose code changes with its name."""
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: PLC0415

    calls: dict[str, dict[int, list[_Call]]] = {"prefill": {}, "decode": {}}
    phase = ["prefill"]

    def recorder(module, query, key, value, attention_mask=None, **kwargs):
        out, w = dense_fn(module, query, key, value, attention_mask, **kwargs)
        idx = getattr(module, "layer_idx", None)
        calls[phase[0]].setdefault(idx, []).append(
            _Call(module, query, key, value, attention_mask, dict(kwargs), out))
        return out, w

    AttentionInterface.register(_PROBE, recorder)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_PROBE, mask_fn)
    impl = model.config._attn_implementation
    refusal = (f"{type(model).__name__} does not compute attention through transformers' "
               "AttentionInterface (models with ALiBi or their own attention code, like Bloom, "
               "MPT or Falcon): twilight has no attention call to replace")
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(4, vocab - 1), vocab, (1, tokens + 1), generator=gen).to(device)
    want, _ = _two_steps(model, ids, tokens)
    try:
        model.set_attn_implementation(_PROBE)
    except Exception as e:  # a model that takes no attention function of ours
        raise UnsupportedModel(f"{refusal} ({e})") from None
    if model.config._attn_implementation != _PROBE:  # transformers only warned
        raise UnsupportedModel(refusal)
    try:
        got, cache = _two_steps(model, ids, tokens, phase)
    finally:
        model.set_attn_implementation(impl)
    if not calls["decode"]:
        raise UnsupportedModel(refusal)
    diff = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-6)
    if not diff <= 1e-5:
        raise UnsupportedModel(
            f"{type(model).__name__} computes something else when its attention implementation "
            f"is not named {impl!r} (relative logit difference {diff:.1e}): its code branches "
            "on the name (a mask or an indexer built only for 'sdpa'/'eager')")
    return calls, cache


def _kind(i: int, cache, calls: dict, cfg) -> str:
    from transformers.cache_utils import (  # noqa: PLC0415
        DummyLayer,
        DynamicLayer,
        DynamicSlidingWindowLayer,
        LinearAttentionCacheLayerMixin,
    )

    layer = cache.layers[i] if i < len(cache.layers) else None
    types = getattr(cfg, "layer_types", None) or []
    sharing = getattr(cfg, "kv_sharing_modes", None) or []
    if i < len(sharing) and sharing[i] in ("store", "reuse"):
        return "shared"
    if isinstance(layer, DummyLayer):
        return "shared" if calls.get(i) else "none"
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        return "linear"
    if isinstance(layer, DynamicSlidingWindowLayer):
        return "chunked" if i < len(types) and types[i] == "chunked_attention" else "sliding"
    if not calls.get(i):
        return "custom" if layer is not None else "none"
    if calls[i][-1].kwargs.get("sliding_window") is not None:
        return "sliding"
    return "full" if type(layer) is DynamicLayer else "custom"


def sinks_of(module, kwargs: dict) -> Tensor | None:
    """The learned sink logits ``[Hq]`` a layer's attention adds to its softmax, or None:
    the module's ``sinks`` parameter (gpt-oss' eager attention reads it there), else the
    ``s_aux``/``sinks`` argument."""
    for s in (getattr(module, "sinks", None), kwargs.get("s_aux"), kwargs.get("sinks")):
        if isinstance(s, Tensor):
            return s.detach()
    return None


def unknown_kwargs(kwargs: dict) -> tuple[str, ...]:
    """The arguments (with a value) an attention call carries that twilight does not know."""
    return tuple(sorted(k for k, v in kwargs.items()
                        if k not in HANDLED and k not in INERT and v is not None))


def _layer(i: int, kind: str, prefill: list[_Call], decode: list[_Call], cache,
           tol: float) -> tuple[LayerSemantics, Tensor | None]:
    if not decode:
        return LayerSemantics(i, kind), None
    c = decode[-1]
    hq, hkv, d, dv = c.q.shape[1], c.k.shape[1], c.k.shape[-1], c.v.shape[-1]
    scale = c.kwargs.get("scaling")
    scale = float(scale) if scale is not None else float(getattr(c.module, "scaling", d ** -0.5))
    softcap = c.kwargs.get("softcap")
    sinks = sinks_of(c.module, c.kwargs)
    unknown = unknown_kwargs(c.kwargs)
    sem = LayerSemantics(i, kind, type(c.module).__name__, c.kwargs.get("sliding_window"),
                         scale, float(softcap) if softcap else None, sinks is not None,
                         hq, hkv, d, dv, unknown)
    if kind != "full":
        return sem, sinks
    problem = _problem(sem, c, prefill, decode, cache, sinks, tol)
    return (LayerSemantics(**{**sem.__dict__, "problem": problem}) if problem else sem), sinks


def _problem(sem: LayerSemantics, c: _Call, prefill, decode, cache, sinks, tol) -> str | None:
    """Why twilight cannot run this full-attention layer, or None."""
    if len(decode) != 1 or len(prefill) != 1:
        return (f"its attention function runs {len(prefill)}× per prefill and {len(decode)}× "
                "per decode step (twilight replaces exactly one call per step)")
    if not getattr(c.module, "is_causal", True) or c.kwargs.get("is_causal") is False:
        return "bidirectional (non-causal) attention"
    if sem.value_dim != sem.head_dim:
        return (f"values of head_dim {sem.value_dim} beside keys of {sem.head_dim} (MLA-style "
                "attention): twilight's paged cache holds one head_dim")
    if sem.q_heads % sem.kv_heads:
        return f"{sem.q_heads} query heads over {sem.kv_heads} KV heads (not a GQA grouping)"
    if sem.unknown:
        return f"attention-function argument(s) twilight does not know: {', '.join(sem.unknown)}"
    layer = cache.layers[sem.index]
    if layer.keys is None or layer.keys.shape != c.k.shape or not torch.equal(layer.keys, c.k):
        return ("the keys its attention function receives are not the ones its cache layer "
                "returned (something between cache and attention that twilight would bypass)")
    if c.kwargs.get("dropout"):
        return f"attention dropout {c.kwargs['dropout']} (put the model in eval mode)"
    visible = visible_from_mask(c.mask, c.q.shape[2], c.k.shape[2], c.q.shape[0])
    want = c.out.float()
    got = attention_reference(c.q, c.k, c.v, visible, sem.scale, sem.softcap, sinks)
    err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-6)
    if not err <= tol:
        return (f"its attention output differs from softmax(scale·q·k)·v{' with softcap' if sem.softcap else ''}"
                f"{' and sinks' if sinks is not None else ''} by {err:.2e} (relative): it "
                "computes something twilight does not reproduce")
    return None


def read_semantics(model, tokens: int = 8, seed: int = 0) -> ModelSemantics:
    """Every layer's :class:`LayerSemantics`, read by running ``model`` once (see the module
    docstring). Raises :class:`UnsupportedModel` for a model whose attention cannot be read:
    an implementation other than SDPA or eager, one that takes no attention function, a model
    in training mode."""
    if model.training:
        raise UnsupportedModel("the model is in training mode (dropout): call model.eval() "
                               "before install")
    impl, dense_fn, mask_fn = _original(model)
    calls, cache = _record(model, dense_fn, mask_fn, tokens, seed)
    cfg = model.config.get_text_config(decoder=True)
    n = max(len(cache.layers), getattr(cfg, "num_hidden_layers", 0) or 0)
    dtype = next(model.parameters()).dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    layers, sinks = [], {}
    for i in range(n):
        kind = _kind(i, cache, calls["decode"], cfg)
        sem, s = _layer(i, kind, calls["prefill"].get(i, []), calls["decode"].get(i, []),
                        cache, tol)
        layers.append(sem)
        if s is not None:
            sinks[i] = s
    return ModelSemantics(layers, impl, dense_fn, mask_fn, sinks)
