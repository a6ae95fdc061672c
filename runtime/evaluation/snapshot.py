"""Attention snapshots captured from a real model: the ``.npz`` format other tools share.

Keys (exactly these; ``model``, ``layers`` and ``text`` optional):

=========  ===========================  ==================================================
``q``      float16 ``[L, Nq, Hq, D]``   post-RoPE queries of the captured query positions
``k``      float16 ``[L, Hkv, T, D]``   post-RoPE keys of all T tokens (before GQA repeat)
``v``      float16 ``[L, Hkv, T, D]``   values
``q_pos``  int64 ``[Nq]``               query i attends to tokens 0..q_pos[i] inclusive
``scale``  float32 ``[L]``              the softmax scale of each layer
``model``  str                          e.g. ``"SmolLM2-135M-Instruct"``
``layers`` int64 ``[L]``                the decoder layer each slice came from
=========  ===========================  ==================================================

``scripts/capture_snapshot.py`` writes them from SmolLM2-135M.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import InputError


@dataclass(frozen=True)
class Snapshot:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_pos: torch.Tensor
    scale: torch.Tensor
    model: str = ""
    layers: tuple[int, ...] = ()
    path: str = ""

    @property
    def num_layers(self) -> int:
        return self.q.shape[0]

    @property
    def context(self) -> int:
        return self.k.shape[2]

    def describe(self) -> str:
        L, nq, hq, d = self.q.shape
        return (f"{self.model or 'unknown model'}: {L} layers {list(self.layers)}, {self.context} "
                f"tokens, {nq} queries, {hq} q-heads / {self.k.shape[1]} kv-heads, head_dim {d}")


def load_snapshot(path: str | Path) -> Snapshot:
    """Read and validate a snapshot; a malformed file names the key and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"snapshot {path}: no such file")
    with np.load(path, allow_pickle=False) as z:
        data = {name: z[name] for name in z.files}
    need = {"q": 4, "k": 4, "v": 4, "q_pos": 1, "scale": 1}
    for name, ndim in need.items():
        if name not in data:
            raise InputError(f"snapshot {path}: missing '{name}' (has {sorted(data)})")
        if data[name].ndim != ndim:
            raise InputError(f"snapshot {path}: '{name}' must have {ndim} dims, got shape "
                             f"{data[name].shape}")
    q, k, v, q_pos, scale = (data[n] for n in need)
    L, nq, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != L or k.shape[3] != d or hq % k.shape[1]:
        raise InputError(f"snapshot {path}: q {q.shape}, k {k.shape}, v {v.shape} disagree; "
                         "expected q [L, Nq, Hq, D], k and v [L, Hkv, T, D], Hq a multiple of Hkv")
    if q_pos.shape != (nq,) or scale.shape != (L,):
        raise InputError(f"snapshot {path}: q_pos {q_pos.shape} must be [Nq={nq}] and scale "
                         f"{scale.shape} must be [L={L}]")
    if q_pos.min() < 0 or q_pos.max() >= k.shape[2]:
        raise InputError(f"snapshot {path}: q_pos must lie in [0, T={k.shape[2]})")
    layers = tuple(int(x) for x in data["layers"]) if "layers" in data else tuple(range(L))
    return Snapshot(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                    torch.from_numpy(q_pos.astype(np.int64)),
                    torch.from_numpy(scale.astype(np.float32)),
                    str(data["model"]) if "model" in data else "", layers, str(path))


def save_snapshot(path: str | Path, q, k, v, q_pos, scale, model: str = "",
                  layers=None, compress: bool = True, **extra) -> None:
    """Write a snapshot in the shared format (float16 q/k/v, int64 q_pos, float32 scale)."""
    arrays = dict(q=np.asarray(q, np.float16), k=np.asarray(k, np.float16),
                  v=np.asarray(v, np.float16), q_pos=np.asarray(q_pos, np.int64),
                  scale=np.asarray(scale, np.float32), **extra)
    if model:
        arrays["model"] = np.array(model)
    if layers is not None:
        arrays["layers"] = np.asarray(layers, np.int64)
    (np.savez_compressed if compress else np.savez)(path, **arrays)
