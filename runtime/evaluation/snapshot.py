"""Attention snapshots captured from a real model: the ``.npz`` format other tools share.

Keys (exactly these; ``model``, ``layers`` and ``text`` optional):

=========  ===========================  ==================================================
``q``      float16 ``[L, Nq, Hq, D]``   post-RoPE queries of the captured query positions
``k``      float16 ``[L, Hkv, T, D]``   post-RoPE keys of all T tokens (before GQA repeat)
``v``      float16 ``[L, Hkv, T, D]``   values
``q_pos``  int64 ``[Nq]``               query i attends to tokens 0..q_pos[i] inclusive
``scale``  float32 ``[L]``              the softmax scale of each layer (positive)
``model``  str                          e.g. ``"SmolLM2-135M-Instruct"``
``layers`` int64 ``[L]``                the decoder layer each slice came from
=========  ===========================  ==================================================

q, k and v may also all be float32; every value is finite, no dimension is empty, ``q_pos``
is an integer array and ``layers`` holds one layer per slice. ``load_snapshot`` refuses
anything else with one line naming the file and the field.

``scripts/capture_snapshot.py`` writes them from SmolLM2-135M.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...compiler.ir import shape_problem
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
    """Read and validate a snapshot. Anything malformed — a file that is not a ``.npz``
    archive (empty, text, truncated, a lone ``.npy`` array), a field of the wrong kind, dtype or
    shape, an empty dimension, a non-finite value, ``q_pos`` outside the context, a scale that is
    not a positive finite number — raises one ``InputError`` naming the file and the field."""
    path = Path(path)
    data = _read(path)
    where = f"snapshot {path}"
    q, k, v, q_pos, scale = (_field(where, data, n, nd, kinds) for n, nd, kinds in _NEED)
    _check_shapes(where, q, k, v, q_pos, scale)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_finite(where, name, x)
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise InputError(f"{where}: 'scale' must hold positive finite numbers (the softmax scale "
                         f"of each layer), got {scale.tolist()[:8]}")
    if q_pos.min() < 0 or q_pos.max() >= k.shape[2]:
        raise InputError(f"{where}: 'q_pos' must lie in [0, T={k.shape[2]}), got "
                         f"{int(q_pos.min())}..{int(q_pos.max())}")
    layers = _layers(where, data, q.shape[0])
    return Snapshot(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                    torch.from_numpy(q_pos.astype(np.int64)),
                    torch.from_numpy(scale.astype(np.float32)),
                    _text(where, data, "model"), layers, str(path))


_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_NEED = (("q", 4, "kv"), ("k", 4, "kv"), ("v", 4, "kv"), ("q_pos", 1, "iu"), ("scale", 1, "f"))
"""(field, dims, kinds): "kv" float16/float32, else numpy dtype kinds (i/u integer, f float)."""


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _read(path: Path) -> dict:
    """Every member of the archive, read in full (a damaged member fails here, by name)."""
    if not path.is_file():
        raise InputError(f"snapshot {path}: " + ("is a directory" if path.is_dir() else
                                                  "no such file"))
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise InputError(f"snapshot {path}: cannot be read ({_why(e)})") from None
    if magic.startswith(b"\x93NUMPY"):
        raise InputError(f"snapshot {path}: holds a single array (.npy content), not a .npz "
                         "archive of q, k, v, q_pos and scale")
    if not magic.startswith(b"PK"):
        what = "is empty" if not magic else f"is not a .npz (zip) archive (starts {magic!r})"
        raise InputError(f"snapshot {path}: {what}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any failure to parse an untrusted file is this one
        raise InputError(f"snapshot {path}: not a readable .npz archive ({_why(e)})") from None
    data = {}
    with loaded as z:
        for name in z.files:
            try:
                data[name] = z[name]
            except Exception as e:  # noqa: BLE001 - a truncated or corrupt member, a pickle
                raise InputError(f"snapshot {path}: field '{name}' cannot be read ({_why(e)})"
                                 ) from None
    return data


def _field(where: str, data: dict, name: str, ndim: int, kinds: str) -> np.ndarray:
    if name not in data:
        raise InputError(f"{where}: missing '{name}' (has {sorted(data) or 'nothing'})")
    x = data[name]
    if not isinstance(x, np.ndarray):
        raise InputError(f"{where}: '{name}' is not a .npy array")
    if kinds == "kv":
        if x.dtype not in _FLOAT_DTYPES:
            raise InputError(f"{where}: '{name}' must be float16 or float32, got {x.dtype}")
    elif x.dtype.kind not in kinds:
        want = "integer" if kinds == "iu" else "floating"
        raise InputError(f"{where}: '{name}' must be {want}, got {x.dtype}")
    if x.ndim != ndim:
        raise InputError(f"{where}: '{name}' must have {ndim} dims, got shape {x.shape}")
    return x


def _check_shapes(where: str, q, k, v, q_pos, scale) -> None:
    L, nq, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != L or k.shape[3] != d or q.dtype != k.dtype \
            or v.dtype != k.dtype:
        raise InputError(f"{where}: q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, v {v.shape} "
                         f"{v.dtype} disagree; expected q [L, Nq, Hq, D], k and v [L, Hkv, T, "
                         "D], all of one dtype")
    if not min(q.shape) or not min(k.shape):
        raise InputError(f"{where}: empty snapshot: q {q.shape}, k {k.shape} (layers, queries, "
                         "heads, tokens and head_dim must all be ≥ 1)")
    problem = shape_problem(hq, k.shape[1], d, 16, "float16")
    if problem:
        raise InputError(f"{where}: q {q.shape} and k {k.shape}: {problem}")
    if q_pos.shape != (nq,) or scale.shape != (L,):
        raise InputError(f"{where}: q_pos {q_pos.shape} must be [Nq={nq}] and scale "
                         f"{scale.shape} must be [L={L}]")


def _check_finite(where: str, name: str, x: np.ndarray) -> None:
    if np.isfinite(x).all():
        return
    first = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
    raise InputError(f"{where}: '{name}' holds NaN or inf (first at index {list(first)}); "
                     "snapshots hold finite attention inputs only")


def _layers(where: str, data: dict, num_layers: int) -> tuple[int, ...]:
    if "layers" not in data:
        return tuple(range(num_layers))
    x = data["layers"]
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "iu" or x.shape != (num_layers,) \
            or (x < 0).any():
        raise InputError(f"{where}: 'layers' must be {num_layers} whole numbers ≥ 0 (one "
                         f"decoder layer per slice), got {getattr(x, 'dtype', type(x))} "
                         f"{getattr(x, 'shape', '')}")
    return tuple(int(i) for i in x)


def _text(where: str, data: dict, name: str) -> str:
    if name not in data:
        return ""
    x = data[name]
    if not isinstance(x, np.ndarray) or x.ndim or x.dtype.kind not in "US":
        raise InputError(f"{where}: '{name}' must be one string, got "
                         f"{getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
    return str(x.item().decode(errors="replace") if x.dtype.kind == "S" else x.item())


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
