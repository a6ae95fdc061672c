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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..ir import Expr
from .dialect import NEG_INF, POS_INF, Src

_BINARY = {"add": "({a} + {b})", "sub": "({a} - {b})", "mul": "({a} * {b})",
           "div": "({a} / {b})", "maximum": "T.max({a}, {b})", "minimum": "T.min({a}, {b})"}
_UNARY = {"neg": "(T.float32(0) - {a})", "abs": "T.abs({a})", "exp": "T.exp({a})"}
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


def table_rows(channels: tuple, kv_heads: int) -> list[list[int]]:
    """A ``take`` list as one row per KV head."""
    if isinstance(channels[0], tuple):
        return [list(r) for r in channels]
    return [list(channels) for _ in range(kv_heads)]


@dataclass
class Lowering:
    """Writes the statements of an expression into ``src`` and returns its value's text.

    ``leaf(node, channel_text) -> text`` gives a leaf's float32 value at a channel;
    ``widths`` maps a leaf (``q``, ``k``, ``page_k``, ``summary.<field>``) to its channel count;
    ``tables`` lists the ``take`` channel lists, buffer ``tbl<i>`` each; ``token`` describes the
    token loop of summaries: ``(var, extent, valid_count_text)``."""

    src: Src
    leaf: Callable[[Expr, str], str]
    widths: dict[str, int]
    tables: list[tuple]
    vec: int = 16
    head: str = "hkv"
    token: tuple[str, int, str] | None = None

    def __post_init__(self):
        self._memo: dict[tuple[int, str], str] = {}

    # ---- kinds ------------------------------------------------------------------------------
    def width(self, e: Expr) -> int:
        """Channels of a vector node, 0 for a scalar."""
        if e.op in ("q", "k", "page_k"):
            return self.widths[e.op]
        if e.op == "summary":
            return self.widths["summary." + e.attr("field")]
        if e.op == "const" or (e.op.startswith("reduce_") and e.attr("axis") == "channel"):
            return 0
        if e.op == "take":
            ch = e.attr("channels")
            return len(ch[0]) if isinstance(ch[0], tuple) else len(ch)
        return max(self.width(x) for x in e.inputs)

    # ---- values -----------------------------------------------------------------------------
    def value(self, e: Expr, c: str = "0") -> str:
        """Text of ``e`` at channel ``c`` (scalars ignore ``c``)."""
        key = (id(e), c if self.width(e) else "")
        if key in self._memo:
            return self._memo[key]
        if e.op == "const":
            out = f"T.float32({float(e.attr('value'))!r})"
        elif e.op in ("q", "k", "page_k", "summary"):
            out = self.leaf(e, c)
        elif e.op in _UNARY:
            out = _UNARY[e.op].format(a=self.value(e.inputs[0], c))
        elif e.op in _BINARY:
            out = _BINARY[e.op].format(a=self.value(e.inputs[0], c), b=self.value(e.inputs[1], c))
        elif e.op == "take":
            i = self.tables.index(e.attr("channels"))
            out = self.value(e.inputs[0], f"tbl{i}[{self.head}, {c}]")
        elif e.op.startswith("reduce_") and e.attr("axis") == "channel":
            out = self._channel_reduce(e)
        elif e.op.startswith("reduce_"):
            out = self._token_reduce(e, c)
        else:
            raise NotImplementedError(f"op {e.op!r} in the tvm backend")
        if e.op.startswith("reduce_") or e.op == "take":
            self._memo[key] = out
        return out

    def prepare(self, e: Expr, c: str = "0") -> None:
        """Write the loops of every reduction inside ``e`` now (before a loop that reads them)."""
        for node in e.walk():
            if node.op.startswith("reduce_") and node is not e:
                if node.attr("axis") == "channel" or self.token:
                    self.value(node, c)

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


def leaves(e: Expr) -> set[str]:
    """The leaf kinds an expression reads (``summary.<field>`` for summary fields)."""
    out = set()
    for n in e.walk():
        if n.op == "summary":
            out.add("summary." + n.attr("field"))
        elif n.op in ("q", "k", "page_k"):
            out.add(n.op)
    return out
