"""IR expressions → TVMScript: a score or summary expression spliced into a stage template.

Nothing here knows a selector's formula: a user's new score (``tw.sum(tw.abs(q) * page.kabsmax)``,
an ``exp``/``div``/``minimum`` token score, ...) lowers through the same rules as Quest.

A vector node is evaluated *at a channel index* (a text expression); each reduction over the
channels becomes a loop, written before the statement that reads it, with a vector accumulator
of the schedule's width (``T.vectorized`` on llvm) and a horizontal reduction after it.
Reductions over a page's tokens (summaries) become a loop over the page's valid slots at the
current channel. Scalars broadcast. ``take`` rewrites the channel index through a channel table
that the kernel receives as an ``int32 [kv_heads, r]`` buffer (one row per KV head; a list shared
by all heads is repeated), so per-KV-head Double Sparsity tables need no special case.

Query-side nodes (``hoistable``: ``top_channels``, projections and channel reductions of the
query alone) are computed once per row and query head, before the loop over pages or tokens,
into local buffers (``Hoist``); the loop reads them. ``gather`` reads its operand at the
channels of such a ``top_channels`` buffer; a projection's matrix is a float32 buffer
``[kv_heads or 1, D, R]`` (``mat<i>``); a projection outside a score (a summary) is a loop over
its input channels at each output channel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..ir import QUERY_LEAVES, Expr, Matrix
from .dialect import NEG_INF, POS_INF, Src

_CMP = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
_BINARY = {"add": "({a} + {b})", "sub": "({a} - {b})", "mul": "({a} * {b})",
           "div": "({a} / {b})", "maximum": "T.max({a}, {b})", "minimum": "T.min({a}, {b})",
           **{op: f'T.Cast("float32", {{a}} {sym} {{b}})' for op, sym in _CMP.items()}}
_UNARY = {"neg": "(T.float32(0) - {a})", "abs": "T.abs({a})", "exp": "T.exp({a})",
          "log": "T.log({a})", "sqrt": "T.sqrt({a})", "tanh": "T.tanh({a})",
          # torch.sign: -1, 0 or 1, NaN stays NaN
          "sign": "T.if_then_else({a} > T.float32(0), T.float32(1), T.if_then_else({a} < "
                  "T.float32(0), T.float32(-1), {a}))"}
_INIT = {"reduce_sum": "T.float32(0)", "reduce_mean": "T.float32(0)",
         "reduce_max": NEG_INF, "reduce_min": POS_INF}
_COMBINE = {"reduce_sum": "({a} + {b})", "reduce_mean": "({a} + {b})",
            "reduce_max": "T.max({a}, {b})", "reduce_min": "T.min({a}, {b})"}


def channel_tables(exprs) -> list[tuple]:
    """The distinct ``take`` channel lists of some expressions, in first-seen order."""
    out: list[tuple] = []
    for e in exprs:
        for node in e.walk():
            if node.op == "take" and node.attr("channels") not in out:
                out.append(node.attr("channels"))
    return out


def matrices(exprs) -> list[Matrix]:
    """The distinct projection matrices of some expressions, in first-seen order."""
    out: list[Matrix] = []
    for e in exprs:
        for node in e.walk():
            if node.op == "project" and node.attr("matrix") not in out:
                out.append(node.attr("matrix"))
    return out


def matrix_rows(m: Matrix, kv_heads: int) -> list[list[list[float]]]:
    """A projection matrix as ``[kv_heads, D, R]`` nested lists (a shared one repeated)."""
    vals, (d, r) = m.values(), m.shape[-2:]
    heads = m.shape[0] if m.per_head else 1
    rows = [[vals[(h * d + i) * r:(h * d + i + 1) * r] for i in range(d)] for h in range(heads)]
    return rows if m.per_head else rows * kv_heads


def hoistable(e: Expr) -> bool:
    """A node computed once per row and query head: query-side, and a channel choice, a
    projection or a reduction over channels."""
    kind = e.op in ("top_channels", "project") or (
        e.op.startswith("reduce_") and e.attr("axis") == "channel")
    return kind and all(n.op in QUERY_LEAVES or n.inputs for n in e.walk())


def table_rows(channels: tuple, kv_heads: int) -> list[list[int]]:
    """A ``take`` list as one row per KV head."""
    if isinstance(channels[0], tuple):
        return [list(r) for r in channels]
    return [list(channels) for _ in range(kv_heads)]


@dataclass
class Lowering:
    """Writes the statements of an expression into ``src`` and returns its value's text.

    ``leaf(node, channel_text) -> text`` gives a leaf's float32 value at a channel (vector
    leaves) or its value (``position``, ``query_position``, ``head_dim``); ``widths`` maps a
    leaf (``q``, ``k``, ``page_k``, ``summary.<field>``) to its channel count; ``tables`` lists
    the ``take`` channel lists, buffer ``tbl<i>`` each; ``mats`` the projection matrices, buffer
    ``mat<i>`` each; ``token`` describes the token loop of summaries: ``(var, extent,
    valid_count_text)``; ``hoisted`` maps a node (by id) to the text of its precomputed value,
    ``{c}`` standing for the channel."""

    src: Src
    leaf: Callable[[Expr, str], str]
    widths: dict[str, int]
    tables: list[tuple]
    vec: int = 16
    head: str = "hkv"
    token: tuple[str, int, str] | None = None
    mats: list[Matrix] = field(default_factory=list)
    hoisted: dict[int, str] = field(default_factory=dict)

    def __post_init__(self):
        self._memo: dict[tuple[int, str], str] = {}

    # ---- kinds ------------------------------------------------------------------------------
    def width(self, e: Expr) -> int:
        """Channels of a vector node, 0 for a scalar."""
        if e.op in ("q", "k", "page_k"):
            return self.widths[e.op]
        if e.op == "summary":
            return self.widths["summary." + e.attr("field")]
        if e.op in ("const", "position", "query_position", "head_dim") or (
                e.op.startswith("reduce_") and e.attr("axis") == "channel"):
            return 0
        if e.op == "take":
            ch = e.attr("channels")
            return len(ch[0]) if isinstance(ch[0], tuple) else len(ch)
        if e.op == "top_channels":
            return e.attr("r")
        if e.op == "gather":
            return e.inputs[1].attr("r")
        if e.op == "project":
            return e.attr("matrix").out_width
        return max(self.width(x) for x in e.inputs)

    # ---- values -----------------------------------------------------------------------------
    def value(self, e: Expr, c: str = "0") -> str:
        """Text of ``e`` at channel ``c`` (scalars ignore ``c``)."""
        if id(e) in self.hoisted:
            return self.hoisted[id(e)].format(c=c)
        key = (id(e), c if self.width(e) else "")
        if key in self._memo:
            return self._memo[key]
        op = e.op
        if op == "const":
            out = f"T.float32({float(e.attr('value'))!r})"
        elif op in ("q", "k", "page_k", "summary", "position", "query_position", "head_dim"):
            out = self.leaf(e, c)
        elif op in _UNARY:
            out = _UNARY[op].format(a=self.value(e.inputs[0], c))
        elif op == "pow":
            out = f"T.pow({self.value(e.inputs[0], c)}, T.float32({e.attr('exponent')!r}))"
        elif op in _BINARY:
            out = _BINARY[op].format(a=self.value(e.inputs[0], c), b=self.value(e.inputs[1], c))
        elif op == "where":
            a, b, d = (self.value(x, c) for x in e.inputs)
            out = f"T.if_then_else({a} != T.float32(0), {b}, {d})"
        elif op == "take":
            i = self.tables.index(e.attr("channels"))
            out = self.value(e.inputs[0], f"tbl{i}[{self.head}, {c}]")
        elif op == "gather":
            out = self.value(e.inputs[0], self.value(e.inputs[1], c))
        elif op == "project":
            return self._project(e, c)  # a loop: never reused from another place
        elif op.startswith("reduce_") and e.attr("axis") == "channel":
            out = self._channel_reduce(e)
        elif op.startswith("reduce_"):
            out = self._token_reduce(e, c)
        else:
            raise NotImplementedError(f"op {op!r} in the tvm backend")
        if op.startswith("reduce_") or op == "take":
            self._memo[key] = out
        return out

    def prepare(self, e: Expr, c: str = "0") -> None:
        """Write the loops of every reduction inside ``e`` now (before a loop that reads them)."""
        for node in e.walk():
            if node.op.startswith("reduce_") and node is not e and id(node) not in self.hoisted:
                if node.attr("axis") == "channel" or self.token:
                    self.value(node, c)

    def mat(self, m: Matrix, row: str, col: str) -> str:
        """Element ``[row, col]`` of projection matrix ``m`` for the current KV head."""
        head = self.head if m.per_head else "0"
        return f"mat{self.mats.index(m)}[{head}, {row}, {col}]"

    def _project(self, e: Expr, c: str) -> str:
        s, x, m = self.src, e.inputs[0], e.attr("matrix")
        acc, j = s.fresh("pacc"), s.fresh("pj")
        s.local(acc, 1)
        s(f"{acc}[0] = T.float32(0)")
        with s.block(f"for {j} in range({m.in_width}):"):
            s(f"{acc}[0] = {acc}[0] + {self.value(x, j)} * {self.mat(m, j, c)}")
        return f"{acc}[0]"

    def _channel_reduce(self, e: Expr) -> str:
        s, x = self.src, e.inputs[0]
        self.prepare(x)
        w, vw = self.width(x), max(1, min(self.vec, self.width(x)))
        acc, co, v = s.fresh("acc"), s.fresh("co"), s.fresh("v")
        comb = _COMBINE[e.op]
        s.local(acc, vw)
        with s.block(f"for {v} in {s.d.vec(vw)}:"):
            s(f"{acc}[{v}] = {_INIT[e.op]}")
        if w // vw:
            with s.block(f"for {co} in range({w // vw}):"):
                with s.block(f"for {v} in {s.d.vec(vw)}:"):
                    val = self.value(x, f"({co} * {vw} + {v})")
                    s(f"{acc}[{v}] = " + comb.format(a=f"{acc}[{v}]", b=val))
        for r in range(w // vw * vw, w):
            s(f"{acc}[0] = " + comb.format(a=f"{acc}[0]", b=self.value(x, str(r))))
        red = s.fresh("red")
        s.local(red, 1)
        if not s.d.cuda and vw > 1 and vw & (vw - 1) == 0:  # in registers, halving by shuffles
            s(f"{red}[0] = {_lanes(f'{acc}[T.Ramp(0, 1, {vw})]', vw, comb)}")
        else:
            s(f"{red}[0] = {acc}[0]")
            for i in range(1, vw):
                s(f"{red}[0] = " + comb.format(a=f"{red}[0]", b=f"{acc}[{i}]"))
        if e.op == "reduce_mean":
            s(f"{red}[0] = {red}[0] / T.float32({w})")
        return f"{red}[0]"

    def _token_reduce(self, e: Expr, c: str) -> str:
        if self.token is None:
            raise NotImplementedError("a reduction over tokens outside a page summary")
        s, x = self.src, e.inputs[0]
        tv, extent, count = self.token
        self.prepare(x, c)
        red = s.fresh("tred")
        s.local(red, 1)
        s(f"{red}[0] = {_INIT[e.op]}")
        with s.block(f"for {tv} in range({extent}):"):
            with s.block(f"if {tv} < {count}:"):
                s(f"{red}[0] = " + _COMBINE[e.op].format(a=f"{red}[0]", b=self.value(x, c)))
        if e.op == "reduce_mean":
            s(f"{red}[0] = {red}[0] / T.Cast(\"float32\", T.max({count}, 1))")
        return f"{red}[0]"


def hoist(low: Lowering, exprs, row: str, rows: int) -> None:
    """Compute the hoistable nodes of ``exprs`` (see ``hoistable``) for every query head ``row``
    in ``range(rows)``, into local buffers that ``low`` then reads (``low.hoisted``).

    ``top_channels`` ranks ``|x|`` with ties to the lower channel (a rank count, ``D²`` compares
    per head: no sort) and lists the chosen channels ascending, as the reference does."""
    s = low.src
    nodes: list[Expr] = []
    for e in exprs:
        for node in e.walk():
            if hoistable(node) and all(node is not n for n in nodes):
                nodes.append(node)
    for node in nodes:  # children first: a node's value may read an earlier one
        if node.op == "top_channels":
            name = s.local(s.fresh("tch"), (rows, node.attr("r")), "int32")
        elif node.op == "project":
            name = s.local(s.fresh("hp"), (rows, node.attr("matrix").out_width))
        else:
            name = s.local(s.fresh("hr"), rows)
        with s.block(f"for {row} in range({rows}):"):
            if node.op == "top_channels":
                _top_channels(low, node, f"{name}[{row}, {{c}}]")
            elif node.op == "project":
                c = s.fresh("c")
                with s.block(f"for {c} in range({node.attr('matrix').out_width}):"):
                    s(f"{name}[{row}, {c}] = {low._project(node, c)}")
            else:
                s(f"{name}[{row}] = {low.value(node)}")
        vector = node.op in ("top_channels", "project")
        low.hoisted[id(node)] = f"{name}[{row}, {{c}}]" if vector else f"{name}[{row}]"


def _top_channels(low: Lowering, node: Expr, out: str) -> None:
    """``out.format(c=j)`` ← the ``j``-th chosen channel, for ``j < r``."""
    s, x, r = low.src, node.inputs[0], node.attr("r")
    d = low.width(x)
    mag, m, rank = s.fresh("tmag"), s.fresh("tm"), s.fresh("trk")
    c, c2 = s.fresh("c"), s.fresh("c")
    s.local(mag, d)
    s.local(m, 1, "int32")
    s.local(rank, 1, "int32")
    with s.block(f"for {c} in range({d}):"):  # NaN ranks after every number (torch's sort)
        s(f"{mag}[{c}] = T.abs({low.value(x, c)})")
        s(f"{mag}[{c}] = T.if_then_else(T.isnan({mag}[{c}]), T.float32(-0.5), {mag}[{c}])")
    s(f"{m}[0] = 0")
    with s.block(f"for {c} in range({d}):"):
        s(f"{rank}[0] = 0")
        with s.block(f"for {c2} in range({d}):"):
            s(f'{rank}[0] = {rank}[0] + T.Cast("int32", {mag}[{c2}] > {mag}[{c}] or '
              f"{mag}[{c2}] == {mag}[{c}] and {c2} < {c})")
        with s.block(f"if {rank}[0] < {r}:"):
            s(f"{out.format(c=f'{m}[0]')} = {c}", f"{m}[0] = {m}[0] + 1")


def _lanes(vec: str, n: int, comb: str) -> str:
    """Text: the ``n`` lanes of vector ``vec`` combined pairwise (``comb`` a format of ``a``,
    ``b``), halving with shuffles."""
    while n > 1:
        n //= 2
        lo, hi = list(range(n)), list(range(n, 2 * n))
        vec = comb.format(a=f"T.Shuffle([{vec}], {lo})", b=f"T.Shuffle([{vec}], {hi})")
    return vec


def leaves(e: Expr) -> set[str]:
    """The leaf kinds an expression reads (``summary.<field>`` for summary fields)."""
    out = set()
    for n in e.walk():
        if n.op == "summary":
            out.add("summary." + n.attr("field"))
        elif n.op in ("q", "k", "page_k"):
            out.add(n.op)
    return out
