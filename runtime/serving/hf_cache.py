"""The cache a transformers model runs with under twilight: the model's own cache layers, with
a :class:`TwilightLayer` in place of each layer twilight runs.

A ``TwilightLayer`` starts as the model's own cache (keys and values concatenated, the model's
attention over them) and, once the context reaches its ``sparse_from`` positions, moves them
into a :class:`~twilight.runtime.serving.paged_cache.PagedKVCache` (page summaries and quantized
keys are kept from then on as it grows), one request per batch row. Only the tokens a row may
see go in: the padding of a batch of different prompt lengths is left out, so each row's pages
hold exactly its own tokens and decode attends over ragged lengths with no mask. That is why
the layer records, from the mask the attention function sees, which positions each row may see
(:meth:`note_visible`), and a later multi-token chunk is appended by the attention function
(:meth:`commit`).

The layer's ``get_seq_length`` counts positions, padding included (what the model's masks and
the other layers count). Beam search (``reorder_cache``, ``batch_select_indices``,
``batch_repeat_interleave``) copies a row's pages where a row is repeated — correct, and
O(context) per repeated row; ``crop`` (assisted decoding) is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import InputError, UnsupportedModel
from .paged_cache import PagedKVCache

__all__ = ["make_cache_class", "make_layer_class"]

_CLASSES: dict[str, type] = {}


def make_layer_class() -> type:
    """``TwilightLayer``, defined on first use so that importing twilight needs no transformers."""
    if "layer" in _CLASSES:
        return _CLASSES["layer"]
    from transformers.cache_utils import CacheLayerMixin  # noqa: PLC0415

    class TwilightLayer(CacheLayerMixin):
        """One twilight layer's cache: the model's own keys and values while the context is
        below ``sparse_from`` positions (the layer then attends as the model does), then a
        ``PagedKVCache`` with one request per batch row."""

        is_sliding = False
        is_croppable = False
        is_compileable = False

        def __init__(self, paged: PagedKVCache, index: int, owner, sparse_from: int = 0):
            super().__init__()
            self.paged, self.index, self.owner = paged, index, owner
            self.sparse_from = sparse_from
            self.ids: list[int] = []
            self.length = 0  # positions seen, padding included
            self.paged_mode = False
            self.visible: Tensor | None = None  # bool [B, T] of the dense-mode keys
            self.pending: tuple[Tensor, Tensor] | None = None  # a paged-mode chunk
            self.step_kv: tuple[Tensor, Tensor] | None = None  # a decode step's, [B, Hkv, D]
            self.returned: Tensor | None = None  # the keys update() handed the model last

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            self.device, self.dtype = key_states.device, key_states.dtype
            b, h, _, d = key_states.shape
            self.keys = key_states.new_zeros(b, h, 0, d)
            self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
            self.visible = torch.zeros(b, 0, dtype=torch.bool, device=key_states.device)
            self.ids = self.paged.add_requests(b)
            self.is_initialized = True

        def _check(self, name: str, t: Tensor) -> None:
            p = self.paged
            want = (len(self.ids), p.num_kv_heads, None, p.head_dim)
            if t.dim() != 4 or any(w is not None and w != s for w, s in zip(want, t.shape,
                                                                          strict=True)):
                raise InputError(f"{name} of layer {self.index}: expected [{len(self.ids)}, "
                                 f"{p.num_kv_heads}, n, {p.head_dim}], got {tuple(t.shape)}")
            if t.dtype != p.dtype or t.device != p.device:
                raise InputError(f"{name} of layer {self.index}: expected {p.dtype} on "
                                 f"{p.device} (the twilight cache, made for the model's dtype "
                                 f"and device), got {t.dtype} on {t.device}")

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self._check("key_states", key_states)
            self._check("value_states", value_states)
            if self.pending is not None or self.step_kv is not None:
                raise UnsupportedModel(
                    f"layer {self.index}: the twilight cache was updated twice without the "
                    "twilight attention running in between (was the model's attention "
                    "implementation switched away from twilight?)")
            n = key_states.shape[-2]
            self.length += n
            self.owner.current[self.index] = self  # the attention function takes it from there
            if not self.paged_mode:  # the model's own cache, until sparse_from
                self.keys = torch.cat([self.keys, key_states], dim=-2)
                self.values = torch.cat([self.values, value_states], dim=-2)
                self.returned = self.keys
                return self.keys, self.values
            if n == 1:  # decode: the attention call appends every row's token with the step
                self.step_kv = (key_states[:, :, 0], value_states[:, :, 0])
            else:  # a chunk: the attention function appends what the mask lets it see
                self.pending = (key_states, value_states)
            self.returned = key_states
            return key_states, value_states

        def take_step(self) -> tuple[Tensor, Tensor] | None:
            """The decode step's key and value ``[B, Hkv, D]`` that ``update`` left for the
            attention call (``DecodePipeline.step`` appends and attends in one call), or None."""
            kv, self.step_kv = self.step_kv, None
            return kv

        def flush(self) -> None:
            """Append a decode step's key and value no attention call took."""
            kv = self.take_step()
            if kv is not None:
                self.paged.append(kv[0][:, :, None], kv[1][:, :, None], self.ids)

        def note_visible(self, visible: Tensor | None, n: int) -> None:
            """Dense mode: which of the last ``n`` positions each row may see (None: all)."""
            if visible is None:
                visible = torch.ones(len(self.ids), n, dtype=torch.bool, device=self.device)
            self.visible = torch.cat([self.visible, visible.to(self.visible.device)], dim=1)

        def to_paged(self) -> None:
            """Move the dense-mode keys and values, padding left out, into the pages."""
            self.pending, self.paged_mode = (self.keys, self.values), True
            self.commit(self.visible)
            self.keys = self.values = self.keys.new_zeros(0)
            self.visible = None

        def commit(self, visible: Tensor | None) -> None:
            """Append the pending chunk's tokens that ``visible bool [B, n]`` marks (all when
            None) to each row's pages."""
            k, v = self.pending
            self.pending = None
            if visible is None or bool(visible.all()):
                self.paged.append(k.contiguous(), v.contiguous(), self.ids)
                return
            for b, rid in enumerate(self.ids):
                keep = visible[b].to(k.device)
                self.paged.append(k[b][:, keep].contiguous(), v[b][:, keep].contiguous(), rid)

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.length + query_length, 0

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            for rid in self.ids:
                self.paged.free_request(rid)
            self.ids, self.length, self.pending, self.returned = [], 0, None, None
            self.step_kv = None
            self.paged_mode, self.visible, self.keys, self.values = False, None, None, None
            self.is_initialized = False

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove:
                raise UnsupportedModel(
                    f"layer {self.index}: a twilight cache cannot be cropped (assisted or "
                    "speculative decoding roll the cache back): generate without an assistant")

        def select_rows(self, rows: list[int]) -> None:
            """Batch row ``b`` becomes old row ``rows[b]``; a repeated row gets a copy."""
            self.flush()
            if not self.paged_mode:
                idx = torch.tensor(rows, device=self.keys.device)
                self.keys, self.values = self.keys[idx], self.values[idx]
                self.visible = self.visible[idx]
                for rid in self.ids[len(rows):]:
                    self.paged.free_request(rid)
                self.ids = self.ids[:len(rows)] + self.paged.add_requests(
                    max(0, len(rows) - len(self.ids)))
                return
            used: set[int] = set()
            new = []
            for r in rows:
                rid = self.ids[r]
                new.append(self.paged.copy_request(rid) if rid in used else rid)
                used.add(rid)
            for rid in self.ids:
                if rid not in used:
                    self.paged.free_request(rid)
            self.ids = new

        def reorder_cache(self, beam_idx) -> None:
            if self.is_initialized:
                self.select_rows([int(i) for i in beam_idx.tolist()])

        def batch_select_indices(self, indices) -> None:
            if self.is_initialized:
                idx = torch.as_tensor(indices)
                rows = idx.nonzero().flatten() if idx.dtype == torch.bool else idx
                self.select_rows([int(i) for i in rows.tolist()])

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self.select_rows([b for b in range(len(self.ids)) for _ in range(repeats)])

        def offload(self) -> None:  # pages stay where they are
            pass

        def prefetch(self) -> None:
            pass

    _CLASSES["layer"] = TwilightLayer
    return TwilightLayer


def make_cache_class() -> type:
    """``TwilightCache``: a ``DynamicCache`` (so transformers treats it as one)."""
    if "cache" in _CLASSES:
        return _CLASSES["cache"]
    from transformers import DynamicCache  # noqa: PLC0415

    class TwilightCache(DynamicCache):
        """The model's own cache layers, a ``TwilightLayer`` where twilight runs the layer.
        Make it with ``TwilightAttention.new_cache()``."""

        def __init__(self, config, twilight_layers: dict[int, object]):
            super().__init__(config=config)
            if len(self.layers) < max(twilight_layers, default=-1) + 1:
                raise UnsupportedModel("the model's cache has fewer layers than the model")
            for i, layer in twilight_layers.items():
                self.layers[i] = layer

        def __iter__(self):
            for layer in self.layers:
                yield layer.keys, layer.values, getattr(layer, "_sliding_window_tensor", None)

    _CLASSES["cache"] = TwilightCache
    return TwilightCache
