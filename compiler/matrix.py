"""A constant matrix inside the IR (a projection's ``P``): frozen, hashable and exact."""

from __future__ import annotations

import array
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Matrix:
    """A constant float32 matrix in the IR (a ``project`` map): its shape and its values as
    the hex of their little-endian float32 bytes — exact, compact and JSON-able.

    >>> m = Matrix.of([[1.0, 2.0], [3.0, 0.5]])
    >>> m.shape, m.values()
    ((2, 2), [1.0, 2.0, 3.0, 0.5])
    """

    shape: tuple[int, ...]
    data: str

    @classmethod
    def of(cls, values) -> Matrix:
        """From a tensor, an array or nested lists (2-D ``[D, R]`` or 3-D ``[Hkv, D, R]``)."""
        if hasattr(values, "tolist"):
            values = values.tolist()
        shape, flat = _flatten(values)
        buf = array.array("f", flat)
        if sys.byteorder == "big":
            buf.byteswap()
        return cls(tuple(shape), buf.tobytes().hex())

    def values(self) -> list[float]:
        """Row-major float32 values (as Python floats)."""
        buf = array.array("f", bytes.fromhex(self.data))
        if sys.byteorder == "big":
            buf.byteswap()
        return buf.tolist()

    @property
    def out_width(self) -> int:
        return self.shape[-1]

    @property
    def in_width(self) -> int:
        return self.shape[-2]

    @property
    def per_head(self) -> bool:
        return len(self.shape) == 3


def _flatten(values) -> tuple[list[int], list[float]]:
    if not isinstance(values, list | tuple):
        return [], [float(values)]
    if not values:
        raise ValueError("a matrix needs values")
    parts = [_flatten(v) for v in values]
    if any(p[0] != parts[0][0] for p in parts):
        raise ValueError("a matrix must be rectangular")
    return [len(values), *parts[0][0]], [x for p in parts for x in p[1]]
