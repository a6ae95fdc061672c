"""IR expressions → Triton source: the one place where a user's formula becomes kernel code.

A score or summary expression lowers to straight-line Triton statements over 2-D register
tiles ``[rows, channels]`` — rows are the pages/tokens a program scores (or a page's tokens in
a summary), channels run over head_dim. Value kinds while lowering:

* ``"t"`` a tile ``[R, C]`` (or ``[1, C]`` for the query): rank-1 values;
* ``"r"`` a row vector ``[R]`` (or ``[1]``): rank-0 values after a channel reduction;
* ``"c"`` a Python float: constants, folded at codegen time.

Channel subsets (``take``) are not gathers of a loaded tile: they change *which channels the
leaves load*. ``take`` only applies to elementwise expressions of leaves (the tracer forbids
taking from a reduced value), so the emitter lowers the subtree with a channel context whose
index vector comes from a constant int32 table (one row per KV head for per-head tables).
Padded channel lanes hold zeros and are masked out at every reduction with that reduction's
identity, so ``exp``/``div`` on padding never leak into a result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..ir import Expr


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class Chan:
    """A channel context: index vector, validity mask (source names) and true width."""

    idx: str
    mask: str
    width: int
    lanes: str = ""  # 0..width-1 lane ids (where a rank-1 result is stored); "" = idx


@dataclass
class ChannelTables:
    """Constant channel tables of every ``take``, packed into one int32 tensor argument.

    Each distinct channel list becomes rows ``[Hkv, r]`` (a shared list is stored once with a
    zero row stride) at a fixed offset; the kernel loads its row with ``hkv``."""

    kv_heads: int
    data: list[int] = field(default_factory=list)
    entries: dict[tuple, tuple[int, int, int]] = field(default_factory=dict)  # off, stride, r

    def add(self, channels: tuple) -> tuple[int, int, int]:
        if channels not in self.entries:
            per_head = isinstance(channels[0], tuple)
            rows = channels if per_head else (channels,)
            r = len(rows[0])
            self.entries[channels] = (len(self.data), r if per_head else 0, r)
            for row in rows:
                self.data.extend(int(c) for c in row)
        return self.entries[channels]

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.data or [0], dtype=torch.int32)


@dataclass(frozen=True)
class Val:
    src: str
    kind: str  # "t" | "r" | "c"
    chan: Chan | None = None


Leaf = Callable[[Chan], str]

_BIN = {"add": "({a} + {b})", "sub": "({a} - {b})", "mul": "({a} * {b})",
        "div": "({a} / {b})", "maximum": "tl.maximum({a}, {b})",
        "minimum": "tl.minimum({a}, {b})"}
_FOLD = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
         "div": lambda a, b: a / b, "maximum": max, "minimum": min,
         "neg": lambda a: -a, "abs": abs, "exp": math.exp}
_UN = {"neg": "(-{a})", "abs": "tl.abs({a})", "exp": "tl.exp({a})"}
_IDENT = {"reduce_sum": "0.0", "reduce_mean": "0.0", "reduce_max": "float('-inf')",
          "reduce_min": "float('inf')"}
_TL_RED = {"reduce_sum": "tl.sum", "reduce_mean": "tl.sum", "reduce_max": "tl.max",
           "reduce_min": "tl.min"}


class Emitter:
    """Lowers expressions to statements appended to ``lines``.

    ``leaves`` maps ``"q"``, ``"k"``, ``"page_k"`` and ``"summary.<field>"`` to functions giving
    the source of a tile load in a channel context. ``row_mask``/``row_count`` name the valid
    rows of a page (token reductions in summaries)."""

    def __init__(self, leaves: dict[str, Leaf], full: Chan, tables: ChannelTables,
                 prefix: str = "e", row_mask: str = "rmask", row_count: str = "rcount"):
        self.leaves, self.full, self.tables, self.prefix = leaves, full, tables, prefix
        self.row_mask, self.row_count = row_mask, row_count
        self.lines: list[str] = []
        self._memo: dict[tuple[int, str], Val] = {}
        self._chans: dict[tuple, Chan] = {}
        self._n = 0

    def _var(self, src: str) -> str:
        self._n += 1
        name = f"{self.prefix}{self._n}"
        self.lines.append(f"{name} = {src}")
        return name

    def chan_for(self, channels: tuple) -> Chan:
        if channels not in self._chans:
            off, stride, r = self.tables.add(channels)
            i = len(self._chans)
            rp = next_pow2(r)
            lanes = f"{self.prefix}_cl{i}"
            self.lines.append(f"{lanes} = tl.arange(0, {rp})")
            self.lines.append(f"{self.prefix}_cm{i} = {lanes} < {r}")
            self.lines.append(f"{self.prefix}_ch{i} = tl.load(chan_ptr + {off} + hkv * {stride} + "
                              f"{lanes}, mask={self.prefix}_cm{i}, other=0)")
            self._chans[channels] = Chan(f"{self.prefix}_ch{i}", f"{self.prefix}_cm{i}", r, lanes)
        return self._chans[channels]

    def emit(self, e: Expr, chan: Chan | None = None) -> Val:
        chan = chan or self.full
        key = (id(e), chan.idx)
        if key not in self._memo:
            self._memo[key] = self._emit(e, chan)
        return self._memo[key]

    def _emit(self, e: Expr, chan: Chan) -> Val:
        op = e.op
        if op == "const":
            return Val(repr(float(e.attr("value"))), "c")
        if op in ("q", "k", "page_k"):
            return Val(self._var(self.leaves[op](chan)), "t", chan)
        if op == "summary":
            return Val(self._var(self.leaves["summary." + e.attr("field")](chan)), "t", chan)
        if op == "take":
            return self.emit(e.inputs[0], self.chan_for(e.attr("channels")))
        if op in _UN:
            a = self.emit(e.inputs[0], chan)
            if a.kind == "c":
                return Val(repr(_FOLD[op](float(a.src))), "c")
            return Val(self._var(_UN[op].format(a=a.src)), a.kind, a.chan)
        if op in _BIN:
            return self._binary(op, self.emit(e.inputs[0], chan), self.emit(e.inputs[1], chan))
        if op.startswith("reduce_"):
            return self._reduce(op, self.emit(e.inputs[0], chan), e.attr("axis"))
        raise NotImplementedError(f"Triton backend: op {op!r}")

    def _binary(self, op: str, a: Val, b: Val) -> Val:
        if a.kind == "c" and b.kind == "c":
            return Val(repr(_FOLD[op](float(a.src), float(b.src))), "c")
        kinds = {a.kind, b.kind}
        sa = f"{a.src}[:, None]" if a.kind == "r" and "t" in kinds else a.src
        sb = f"{b.src}[:, None]" if b.kind == "r" and "t" in kinds else b.src
        kind = "t" if "t" in kinds else "r"
        chan = a.chan if a.kind == "t" else b.chan
        return Val(self._var(_BIN[op].format(a=sa, b=sb)), kind, chan)

    def _reduce(self, op: str, a: Val, axis: str) -> Val:
        ident, red = _IDENT[op], _TL_RED[op]
        if axis == "channel":
            x = f"tl.where({a.chan.mask}[None, :], {a.src}, {ident})"
            out = f"{red}({x}, axis=1)"
            if op == "reduce_mean":
                out = f"{out} / {float(a.chan.width)}"
            return Val(self._var(out), "r")
        x = f"tl.where({self.row_mask}[:, None], {a.src}, {ident})"
        out = f"{red}({x}, axis=0)[None, :]"
        if op == "reduce_mean":
            out = f"{out} / tl.maximum({self.row_count}, 1).to(tl.float32)"
        return Val(self._var(out), "t", a.chan)


def expr_width(e: Expr, head_dim: int) -> int:
    """Channels of a rank-1 expression: a ``take``'s list length, else head_dim."""
    for node in e.walk():
        if node.op == "take":
            ch = node.attr("channels")
            return len(ch[0]) if isinstance(ch[0], tuple) else len(ch)
    return head_dim


def as_rows(v: Val, block: str) -> str:
    """Source of a per-row float32 vector ``[block]`` for a rank-0 result."""
    if v.kind == "c":
        return f"tl.zeros([{block}], tl.float32) + {v.src}"
    return f"({v.src} + tl.zeros([{block}], tl.float32))"
