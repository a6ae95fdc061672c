"""IR expressions → Triton source: the one place where a user's formula becomes kernel code.

A score or summary expression lowers to straight-line Triton statements over 2-D register
tiles ``[rows, channels]`` — rows are the pages/tokens a program scores (or a page's tokens in
a summary), channels run over head_dim. Value kinds while lowering:

* ``"t"`` a tile ``[R, C]`` (or ``[1, C]`` for the query): rank-1 values;
* ``"r"`` a row vector ``[R]`` (or ``[1]``): rank-0 values after a channel reduction, and the
  positional leaves;
* ``"c"`` a Python float: constants, folded at codegen time.

Every vector node is emitted in a *channel context* (``Chan``): the index vector its leaves
load at, the lane mask and width. A node of head_dim channels starts in the full context; one
of fewer (a summary field over a subset, a projection's output) in a lane context of its width;
``take`` and ``gather`` switch their subtree to the context of their channels (a constant int32
table, one row per KV head for per-head tables, or a ``top_channels`` index vector computed in
the kernel). A reduction's operand is emitted in its own context, whatever the context around.
A projection ``x @ P`` multiplies the tile by a matrix tile loaded from the constant float32
table (3-D broadcast and sum over its input lanes). Padded lanes hold zeros and are masked out
at every reduction with that reduction's identity, so ``exp``/``div`` on padding never leak
into a result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..ir import Expr, Matrix


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
    """Constant channel tables of every ``take``, packed into one int32 tensor argument, and
    the projection matrices, packed into one float32 tensor argument.

    Each distinct channel list becomes rows ``[Hkv, r]`` (a shared list is stored once with a
    zero row stride) at a fixed offset; the kernel loads its row with ``hkv``. A matrix
    ``[D, R]`` (or ``[Hkv, D, R]``, head stride ``D·R``) likewise."""

    kv_heads: int
    data: list[int] = field(default_factory=list)
    entries: dict[tuple, tuple[int, int, int]] = field(default_factory=dict)  # off, stride, r
    floats: list[float] = field(default_factory=list)
    matrices: dict[Matrix, tuple[int, int]] = field(default_factory=dict)  # off, head stride

    def add_matrix(self, m: Matrix) -> tuple[int, int]:
        if m not in self.matrices:
            d, r = m.shape[-2:]
            self.matrices[m] = (len(self.floats), d * r if m.per_head else 0)
            self.floats.extend(m.values())
        return self.matrices[m]

    def matrix_tensor(self) -> torch.Tensor:
        return torch.tensor(self.floats or [0.0], dtype=torch.float32)

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
        "minimum": "tl.minimum({a}, {b})",
        **{op: f"(({{a}}) {sym} ({{b}})).to(tl.float32)" for op, sym in
           (("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">="), ("eq", "=="), ("ne", "!="))}}
_FOLD = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
         "div": lambda a, b: a / b, "maximum": max, "minimum": min,
         "lt": lambda a, b: float(a < b), "le": lambda a, b: float(a <= b),
         "gt": lambda a, b: float(a > b), "ge": lambda a, b: float(a >= b),
         "eq": lambda a, b: float(a == b), "ne": lambda a, b: float(a != b),
         "neg": lambda a: -a, "abs": abs, "exp": math.exp}
# log, sqrt, tanh, sign, pow of constants are left to the kernel (NaN/inf as torch gives them)
_UN = {"neg": "(-{a})", "abs": "tl.abs({a})", "exp": "tl.exp({a})", "log": "tl.log({a})",
       "sqrt": "tl.sqrt_rn({a})", "tanh": "_tw_tanh({a})",
       "sign": "tl.where({a} > 0, 1.0, tl.where({a} < 0, -1.0, {a}))"}
_IDENT = {"reduce_sum": "0.0", "reduce_mean": "0.0", "reduce_max": "float('-inf')",
          "reduce_min": "float('inf')"}
_TL_RED = {"reduce_sum": "tl.sum", "reduce_mean": "tl.sum", "reduce_max": "tl.max",
           "reduce_min": "tl.min"}
_SCALAR_LEAVES = ("position", "query_position")


class Emitter:
    """Lowers expressions to statements appended to ``lines``.

    ``leaves`` maps ``"q"``, ``"k"``, ``"page_k"``, ``"summary.<field>"``, ``"position"`` and
    ``"query_position"`` to functions giving the source of a tile load in a channel context
    (a row vector for the positions); ``widths`` gives each summary field's channel count.
    ``row_mask``/``row_count`` name the valid rows of a page (token reductions in summaries);
    ``head`` the KV head variable (per-head tables and matrices)."""

    def __init__(self, leaves: dict[str, Leaf], full: Chan, tables: ChannelTables,
                 prefix: str = "e", row_mask: str = "rmask", row_count: str = "rcount",
                 widths: dict[str, int] | None = None, head: str = "hkv"):
        self.leaves, self.full, self.tables, self.prefix = leaves, full, tables, prefix
        self.row_mask, self.row_count, self.head = row_mask, row_count, head
        self.widths = dict(widths or {})
        self.lines: list[str] = []
        self._memo: dict[tuple[int, str], Val] = {}
        self._chans: dict[object, Chan] = {}
        self._n = 0

    def _var(self, src: str) -> str:
        self._n += 1
        name = f"{self.prefix}{self._n}"
        self.lines.append(f"{name} = {src}")
        return name

    # ---- channel contexts ------------------------------------------------------------------
    def width(self, e: Expr) -> int:
        """Channels of a vector node (head_dim for the leaves), 0 for a scalar."""
        op = e.op
        if op in ("q", "k", "page_k"):
            return self.full.width
        if op == "summary":
            return self.widths.get("summary." + e.attr("field"), self.full.width)
        if op in ("const", "head_dim") + _SCALAR_LEAVES or (
                op.startswith("reduce_") and e.attr("axis") == "channel"):
            return 0
        if op == "take":
            ch = e.attr("channels")
            return len(ch[0]) if isinstance(ch[0], tuple) else len(ch)
        if op == "gather":
            return e.inputs[1].attr("r")
        if op in ("top_channels",):
            return e.attr("r")
        if op == "project":
            return e.attr("matrix").out_width
        return max(self.width(x) for x in e.inputs)

    def natural(self, e: Expr) -> Chan:
        """The context a node is emitted in when nothing around it chose one."""
        w = self.width(e)
        return self.full if w in (0, self.full.width) else self.lanes(w)

    def lanes(self, w: int) -> Chan:
        """The context of a ``w``-channel value that is not a subset of head_dim (a summary
        field over a subset, a projection): lanes ``0..w-1`` index themselves."""
        key = ("lanes", w)
        if key not in self._chans:
            name = f"{self.prefix}_ln{len(self._chans)}"
            self.lines.append(f"{name} = tl.arange(0, {next_pow2(w)})")
            self._chans[key] = Chan(name, f"({name} < {w})", w, name)
        return self._chans[key]

    def chan_for(self, channels: tuple) -> Chan:
        if channels not in self._chans:
            off, stride, r = self.tables.add(channels)
            i = len(self._chans)
            rp = next_pow2(r)
            lanes = f"{self.prefix}_cl{i}"
            self.lines.append(f"{lanes} = tl.arange(0, {rp})")
            self.lines.append(f"{self.prefix}_cm{i} = {lanes} < {r}")
            self.lines.append(f"{self.prefix}_ch{i} = tl.load(chan_ptr + {off} + {self.head} * "
                              f"{stride} + {lanes}, mask={self.prefix}_cm{i}, other=0)")
            self._chans[channels] = Chan(f"{self.prefix}_ch{i}", f"{self.prefix}_cm{i}", r, lanes)
        return self._chans[channels]

    def _dynamic(self, e: Expr) -> Chan:
        """The context of a ``top_channels`` node: the ``r`` channels of largest ``|x|`` (ties
        to the lower channel) of the query-side vector ``x``, ascending, as an index vector —
        a rank count over a ``[C, C]`` compare, no sort."""
        key = ("dyn", id(e))
        if key not in self._chans:
            x = self.emit(e.inputs[0])
            r, rp, ch = e.attr("r"), next_pow2(e.attr("r")), x.chan
            # NaN ranks after every number (torch's sort), padding after NaN
            mag = f"tl.where({x.src} != {x.src}, -0.5, tl.abs({x.src}))"
            a = self._var(f"tl.sum(tl.where({ch.mask}[None, :], {mag}, -1.0), axis=0)")
            ln = ch.lanes or ch.idx
            above = (f"({a}[None, :] > {a}[:, None]) | (({a}[None, :] == {a}[:, None]) & "
                     f"({ln}[None, :] < {ln}[:, None]))")
            rank = self._var(f"tl.sum(({above}).to(tl.int32), axis=1)")
            chosen = self._var(f"({rank} < {r}) & {ch.mask}")
            pos = self._var(f"tl.cumsum({chosen}.to(tl.int32), 0) - 1")
            lanes = self._var(f"tl.arange(0, {rp})")
            pick = f"({pos}[None, :] == {lanes}[:, None]) & {chosen}[None, :]"
            idx = self._var(f"tl.sum(tl.where({pick}, {ch.idx}[None, :], 0), axis=1)")
            self._chans[key] = Chan(idx, f"({lanes} < {r})", r, lanes)
        return self._chans[key]

    # ---- values ------------------------------------------------------------------------------
    def emit(self, e: Expr, chan: Chan | None = None) -> Val:
        chan = chan or self.natural(e)
        key = (id(e), chan.idx)
        if key not in self._memo:
            self._memo[key] = self._emit(e, chan)
        return self._memo[key]

    def _emit(self, e: Expr, chan: Chan) -> Val:
        op = e.op
        if op == "const":
            return Val(repr(float(e.attr("value"))), "c")
        if op == "head_dim":
            return Val(repr(float(self.full.width)), "c")
        if op in _SCALAR_LEAVES:
            return Val(self._var(self.leaves[op](chan)), "r")
        if op in ("q", "k", "page_k"):
            return Val(self._var(self.leaves[op](chan)), "t", chan)
        if op == "summary":
            return Val(self._var(self.leaves["summary." + e.attr("field")](chan)), "t", chan)
        if op == "take":
            return self.emit(e.inputs[0], self.chan_for(e.attr("channels")))
        if op == "gather":
            return self.emit(e.inputs[0], self._dynamic(e.inputs[1]))
        if op == "project":
            return self._project(e)
        if op in _UN or op == "pow":
            return self._unary(e, self.emit(e.inputs[0], chan))
        if op in _BIN:
            return self._binary(op, self.emit(e.inputs[0], chan), self.emit(e.inputs[1], chan))
        if op == "where":
            return self._where(*(self.emit(x, chan) for x in e.inputs))
        if op.startswith("reduce_"):
            x = e.inputs[0]
            inner = self.natural(x) if e.attr("axis") == "channel" else chan
            return self._reduce(op, self.emit(x, inner), e.attr("axis"))
        raise NotImplementedError(f"Triton backend: op {op!r}")

    def _unary(self, e: Expr, a: Val) -> Val:
        op = e.op
        if a.kind == "c" and op in _FOLD:
            return Val(repr(_FOLD[op](float(a.src))), "c")
        src = a.src if a.kind != "c" else f"(tl.zeros([1], tl.float32) + {a.src})"
        kind = "r" if a.kind == "c" else a.kind
        if op == "pow":  # x ** e = 2 ** (e · log2 x): NaN below 0, 0 or inf at 0, as torch
            return Val(self._var(f"tl.exp2({float(e.attr('exponent'))!r} * tl.log2({src}))"),
                       kind, a.chan)
        return Val(self._var(_UN[op].format(a=src)), kind, a.chan)

    def _shaped(self, vals: list[Val]) -> tuple[list[str], str, Chan | None]:
        """Sources of ``vals`` broadcast together (row vectors against tiles), their kind and
        channel context."""
        kinds = {v.kind for v in vals}
        srcs = [f"{v.src}[:, None]" if v.kind == "r" and "t" in kinds else v.src for v in vals]
        kind = "t" if "t" in kinds else "r" if "r" in kinds else "c"
        chan = next((v.chan for v in vals if v.kind == "t"), None)
        return srcs, kind, chan

    def _binary(self, op: str, a: Val, b: Val) -> Val:
        if a.kind == "c" and b.kind == "c":
            return Val(repr(_FOLD[op](float(a.src), float(b.src))), "c")
        (sa, sb), kind, chan = self._shaped([a, b])
        return Val(self._var(_BIN[op].format(a=sa, b=sb)), kind, chan)

    def _where(self, c: Val, a: Val, b: Val) -> Val:
        if c.kind == "c":
            return a if float(c.src) != 0 else b
        (sc, sa, sb), kind, chan = self._shaped([c, a, b])
        return Val(self._var(f"tl.where(({sc}) != 0, {sa} + 0.0, {sb} + 0.0)"), kind, chan)

    def _project(self, e: Expr) -> Val:
        """``x @ P``: ``x`` in its own context (its lanes index P's rows), out in lanes of R."""
        m: Matrix = e.attr("matrix")
        x = self.emit(e.inputs[0])
        off, stride = self.tables.add_matrix(m)
        out = self.lanes(m.out_width)
        rows = x.chan.lanes or x.chan.idx
        tile = self._var(f"tl.load(mat_ptr + {off} + {self.head} * {stride} + {rows}[:, None] * "
                         f"{m.out_width} + {out.idx}[None, :], mask={x.chan.mask}[:, None] & "
                         f"{out.mask}[None, :], other=0.0)")
        xm = f"tl.where({x.chan.mask}[None, :], {x.src}, 0.0)"
        return Val(self._var(f"tl.sum({xm}[:, :, None] * {tile}[None, :, :], axis=1)"), "t", out)

    def _reduce(self, op: str, a: Val, axis: str) -> Val:
        ident, red = _IDENT[op], _TL_RED[op]
        if a.kind == "c":
            raise NotImplementedError("a reduction of a constant (the tracer refuses it)")
        if axis == "channel":
            if a.kind == "r":  # a vector of scalars broadcast over the channels
                a = Val(self._var(f"{a.src}[:, None] + tl.zeros([1, {next_pow2(self.full.width)}],"
                                  " tl.float32)"), "t", self.full)
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
    """Channels of a rank-1 expression (a summary field): a projection's or a channel list's
    width, else head_dim."""
    return Emitter({}, Chan("", "", head_dim), ChannelTables(1)).width(e)


def as_rows(v: Val, block: str) -> str:
    """Source of a per-row float32 vector ``[block]`` for a rank-0 result."""
    if v.kind == "c":
        return f"tl.zeros([{block}], tl.float32) + {v.src}"
    return f"({v.src} + tl.zeros([{block}], tl.float32))"
