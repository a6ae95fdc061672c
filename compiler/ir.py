"""twilight's one IR: frozen dataclasses, content-hashed, free of Python callables.

The frontend (``twilight.frontend``) turns a user's pipeline into these objects; everything
downstream (the reference executor, code generators, cache keys, tuning logs) is a pure function
of them. ``key()`` is a sha256 of the canonical JSON of an object's content; the source location
each node remembers for error messages (``loc``) is not content and is left out of the key.

Score expressions are trees of ``Expr`` nodes. Their value kinds:

* ``q`` — the query of one head, a vector over head_dim;
* ``k`` — one key (per-token scores), a vector over head_dim;
* ``page_k`` — the keys of one page (summaries only), a matrix tokens × head_dim;
* ``summary`` (attr ``field``) — one field of a page summary, a vector;
* ``const`` (attr ``value``) — a scalar;
* ``position`` — the position of the scored token (per-page scores: of the page's first token),
  ``query_position`` — the query's own position (the context length - 1), ``head_dim`` — the
  head dimension: scalars, float32.

Ops (the torch meaning of each is ``compiler.torch_expr``; every backend lowers every one):

* elementwise, scalars broadcast: ``neg abs exp log sqrt tanh sign``, ``pow`` (attr
  ``exponent``: a constant, not an integer — the DSL turns integer powers into products),
  ``add sub mul div maximum minimum``, comparisons ``lt le gt ge eq ne`` (1.0 or 0.0),
  ``where`` (inputs ``cond, a, b``: ``a`` where ``cond != 0``, else ``b``);
* channels: ``take`` (attr ``channels``: a tuple of channel ids, or one tuple per KV head),
  ``top_channels`` (attr ``r``: the ``r`` channels of largest ``|x|`` of a query-side vector
  ``x``, ties to the lower channel, ascending — an index vector, computed per head and step),
  ``gather`` (inputs ``x, index``: ``x`` at a ``top_channels`` index), ``project`` (attr
  ``matrix``: a :class:`Matrix` ``[D, R]`` or ``[Hkv, D, R]``; ``x @ P``, width ``R``);
* ``reduce_sum reduce_max reduce_min reduce_mean`` (attr ``axis``: ``"channel"`` for head_dim,
  ``"token"`` for a page's tokens).

Fields added after the first release carry ``_NEW``: at their default they are left out of the
canonical JSON, so the key of every pipeline that does not use them is what it always was (the
shipped tuning logs are keyed by it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from dataclasses import dataclass, field
from typing import Any

from ..errors import BudgetError, InputError, SourceLoc, StructureError
from .matrix import Matrix as Matrix  # part of the IR: a projection's constant

IR_VERSION = 1

# ---- limits: what every kernel, cache and budget is built for ----------------------------------
MAX_TOKENS = 2**31 - 1
"""Token counts and positions are int32 in the stage ABI (lengths, index lists): a budget, a
sink or a window holds at most this many tokens."""
MAX_PAGE_SIZE = 1024
"""Pages hold a power of two ≤ this many tokens (Quest uses 16; a 1024-token page of 8 KV heads ×
128 fp16 channels is already 2 MiB of K and V per page)."""
MAX_HEAD_DIM = 1024
"""Channels per head (models use 64–256; kernels keep a head's vector in registers/locals)."""
MAX_HEADS = 1024
"""Query (and so KV) heads per layer."""
MAX_GROUP_PAGES = 64
"""Pages per group of group-granularity key codes (a group's min/max is encoded in one pass)."""

LEAF_OPS = ("q", "k", "page_k", "summary", "const", "position", "query_position", "head_dim")
UNARY_OPS = ("neg", "abs", "exp", "log", "sqrt", "tanh", "sign", "pow")
COMPARE_OPS = ("lt", "le", "gt", "ge", "eq", "ne")
BINARY_OPS = ("add", "sub", "mul", "div", "maximum", "minimum") + COMPARE_OPS
REDUCE_OPS = ("reduce_sum", "reduce_max", "reduce_min", "reduce_mean")
CHANNEL_OPS = ("take", "gather", "project", "top_channels")
ALL_OPS = LEAF_OPS + UNARY_OPS + BINARY_OPS + REDUCE_OPS + CHANNEL_OPS + ("where",)
QUERY_LEAVES = ("q", "const", "query_position", "head_dim")
"""Leaves of a query-side expression: one value per head and step, whatever the token."""

GROUP_MODES = ("none", "union", "mean", "max", "kv")
"""How the query heads of one GQA group share a decision:
``none`` each query head decides alone; ``union`` each decides, the group keeps the union;
``mean``/``max`` per-head scores (or estimated weights) are merged, one decision per KV head;
``kv`` one score (or estimate) per KV head from the group's mean query."""

_LOC = dict(default=None, compare=False, hash=False, repr=False)
_OMIT = {"omit_default": True}


def _new(default: Any) -> Any:
    """A field added after the first release: left out of the key while at its default."""
    return field(default=default, metadata=_OMIT)


@dataclass(frozen=True)
class Expr:
    op: str
    inputs: tuple[Expr, ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()
    loc: SourceLoc | None = field(**_LOC)

    def attr(self, name: str, default: Any = None) -> Any:
        return dict(self.attrs).get(name, default)

    def walk(self):
        """Every node of the tree, children before parents."""
        for x in self.inputs:
            yield from x.walk()
        yield self

    def key(self) -> str:
        return content_key(self)


@dataclass(frozen=True)
class SummaryField:
    name: str
    expr: Expr
    loc: SourceLoc | None = field(**_LOC)


@dataclass(frozen=True)
class Summary:
    """What the paged cache keeps beside the keys: per page and KV head, named reductions of the
    page's keys (``per="page"``); or per token and KV head, named maps of each key (``"token"``:
    a channel subset, a projection ``k @ P``, ...), computed on append."""

    name: str
    fields: tuple[SummaryField, ...]
    loc: SourceLoc | None = field(**_LOC)
    per: str = _new("page")  # "page": reductions of a page's keys; "token": maps of each key

    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


@dataclass(frozen=True)
class Score:
    """A score per page (over a summary) or per token (over the key)."""

    name: str
    per: str  # "page" | "token"
    expr: Expr
    summary: Summary | None = None
    loc: SourceLoc | None = field(**_LOC)


@dataclass(frozen=True)
class Budget:
    """A token budget: ``tokens`` (``value`` tokens), ``fraction`` (``ceil(value · context)``),
    or the larger (``max``, written ``a | b``) or smaller (``min``, ``a & b``) of its ``parts``."""

    kind: str  # "tokens" | "fraction" | "max" | "min"
    value: float
    loc: SourceLoc | None = field(**_LOC)
    parts: tuple[Budget, ...] = _new(())

    def tokens(self, context: int) -> int:
        """The budget in tokens for a context of ``context`` tokens."""
        if self.kind == "tokens":
            return int(self.value)
        if self.kind == "fraction":
            return max(1, -(-int(round(self.value * context * 1e6)) // 1_000_000))
        pick = max if self.kind == "max" else min
        return pick(b.tokens(context) for b in self.parts)

    def __or__(self, other: Budget) -> Budget:
        """``tw.tokens(N) | tw.fraction(F)``: the larger of the two budgets."""
        return self._combine("max", other, "|")

    def __and__(self, other: Budget) -> Budget:
        """``tw.tokens(N) & tw.fraction(F)``: the smaller of the two budgets."""
        return self._combine("min", other, "&")

    def _combine(self, kind: str, other, sym: str) -> Budget:
        if not isinstance(other, Budget):
            raise BudgetError(f"budget {sym} {type(other).__name__}: combine budgets with "
                              "budgets (tw.tokens(N), tw.fraction(F))", self.loc)
        parts = tuple(p for b in (self, other)
                      for p in (b.parts if b.kind == kind else (b,)))
        return Budget(kind, 0.0, self.loc, parts)

    def describe(self) -> str:
        if self.kind == "tokens":
            return f"tw.tokens({int(self.value)})"
        if self.kind == "fraction":
            return f"tw.fraction({self.value:g})"
        return "(" + (" | " if self.kind == "max" else " & ").join(
            b.describe() for b in self.parts) + ")"


GRANULARITIES = ("token", "page", "group")


def code_name(bits: int, granularity: str, group_pages: int = 1, smooth: float = 0.0) -> str:
    """The name of a key-code format (estimator and cache alike): ``int4_token``,
    ``int4_token_smooth`` (α = 1), ``int4_token_smooth0.5``, ``int4_page``, ``int4_group4``."""
    if granularity == "group":
        return f"int{bits}_group{group_pages}"
    suffix = "" if not smooth else "_smooth" if smooth == 1 else f"_smooth{smooth:g}"
    return f"int{bits}_{granularity}{suffix}"


def code_problem(bits: int, granularity: str, group_pages: int = 1,
                 smooth: float = 0.0) -> str | None:
    """What is wrong with a key-code format, or None: the one statement of the rules that the
    DSL, ``verify`` and ``KeyCodeSpec`` enforce."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 4, 8):
        return f"bits={bits!r}: use 2, 4 or 8"
    if granularity not in GRANULARITIES:
        return f"granularity={granularity!r}: use 'token', 'page' or 'group'"
    g = group_pages
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or g & (g - 1) \
            or g > MAX_GROUP_PAGES or (g > 1) != (granularity == "group"):
        return (f"pages={g!r}: a group is a power of two from 2 to {MAX_GROUP_PAGES} pages, "
                "and only granularity='group' has one")
    if not isinstance(smooth, int | float) or not 0 <= smooth <= 1:
        return f"smooth={smooth!r}: use True, False or a strength in (0, 1]"
    if smooth and granularity != "token":
        return (f"smooth with granularity={granularity!r}: smoothing applies to per-token codes "
                "only (per-channel codes already scale each channel)")
    return None


@dataclass(frozen=True)
class Estimator:
    """How a pruner estimates attention weights: exact keys or quantized keys.

    ``granularity`` of the min-max codes (``compiler.keycodes`` documents formats and bytes):

    * ``token`` — per token over head_dim (Twilight's published estimator); with ``smooth``
      ``= α > 0`` the keys are first divided by per-channel factors ``absmax_c^α`` (and the
      query multiplied by them), so outlier channels no longer set every token's range;
    * ``page`` — per channel within a page and KV head, zero point and scale from the page's
      key min/max summary (shared with Quest's when the pipeline has one);
    * ``group`` — per channel within a group of ``group_pages`` consecutive pages of a request.
    """

    kind: str  # "exact" | "quantized"
    bits: int = 16
    granularity: str = "token"
    loc: SourceLoc | None = field(**_LOC)
    group_pages: int = 1
    smooth: float = 0.0  # 0: off; else the smoothing strength α in (0, 1]

    @property
    def name(self) -> str:
        if self.kind == "exact":
            return "exact"
        return code_name(self.bits, self.granularity, self.group_pages, self.smooth)


@dataclass(frozen=True)
class Select:
    """The base selector: a score and a rule — ``top_k`` (a budget), ``threshold`` (a value),
    ``top_p`` (the fewest units holding mass ``p`` of ``softmax(score)``) — or ``none`` (no
    candidates beyond the keep rules: StreamingLLM); or the union (``a | b``, rule ``union``)
    or intersection (``a & b``, ``intersect``) of other selectors' sets (``parts``).

    ``estimator``: the keys a per-token score's ``k`` reads — None (or exact) the keys
    themselves, else a low-bit format the cache keeps (as a pruner's estimate reads)."""

    score: Score | None
    rule: str  # "top_k" | "threshold" | "top_p" | "none" | "union" | "intersect"
    budget: Budget | None = None
    threshold: float | None = None
    group: str = "max"
    loc: SourceLoc | None = field(**_LOC)
    p: float | None = _new(None)
    estimator: Estimator | None = _new(None)
    parts: tuple[Select, ...] = _new(())

    def __or__(self, other: Select) -> Select:
        """``a | b``: the candidates of both selectors (the larger set)."""
        return self._combine("union", other, "|")

    def __and__(self, other: Select) -> Select:
        """``a & b``: the candidates both selectors choose (the smaller set)."""
        return self._combine("intersect", other, "&")

    def _combine(self, rule: str, other, sym: str) -> Select:
        if not isinstance(other, Select):
            raise StructureError(f"selector {sym} {type(other).__name__}: combine selectors "
                                 "(tw.top_k/tw.threshold/tw.top_p with a score)", self.loc,
                                 hint="to widen a budget, combine budgets: tw.top_k(score, "
                                 "tw.tokens(N) | tw.fraction(F))")
        if "none" in (self.rule, other.rule):
            raise StructureError(f"tw.nothing() {sym} ...: tw.nothing() selects no candidates; "
                                 "drop it and keep the other selector", self.loc)
        parts = tuple(p for s in (self, other) for p in (s.parts if s.rule == rule else (s,)))
        return Select(None, rule, loc=self.loc, parts=parts)

    def scored(self) -> tuple[Select, ...]:
        """The selectors that score (this one, or its parts, depth first)."""
        if self.parts:
            return tuple(x for p in self.parts for x in p.scored())
        return (self,) if self.score is not None else ()


@dataclass(frozen=True)
class Prune:
    """A pruner over estimated attention weights of the candidates."""

    rule: str  # "top_p" | "top_k" | "threshold"
    estimator: Estimator
    p: float | None = None
    budget: Budget | None = None
    threshold: float | None = None
    group: str = "union"
    loc: SourceLoc | None = field(**_LOC)


@dataclass(frozen=True)
class Keep:
    """Tokens always attended: the first ``sink`` and the last ``window`` of the context."""

    sink: int = 0
    window: int = 0
    loc: SourceLoc | None = field(**_LOC)

    def __or__(self, other: Keep) -> Keep:
        """``tw.sink(4) | tw.window(64)`` (or ``+``): keep both."""
        if not isinstance(other, Keep):
            raise StructureError(f"keep rule | {type(other).__name__}: combine keep rules "
                                 "(tw.sink(S), tw.window(W))", self.loc)
        return Keep(max(self.sink, other.sink), max(self.window, other.window), self.loc)

    __add__ = __or__


@dataclass(frozen=True)
class Attend:
    scale: float | None = None  # None: 1/sqrt(head_dim)
    softcap: float | None = None  # logits ← softcap·tanh(logits/softcap)
    loc: SourceLoc | None = field(**_LOC)
    mean_value: bool = _new(False)  # SparQ: y = α·attn + (1 - α)·mean(V), α the selector's mass


@dataclass(frozen=True)
class PipelineIR:
    name: str
    page_size: int
    select: Select | None
    prune: tuple[Prune, ...]
    keep: Keep
    attend: Attend
    loc: SourceLoc | None = field(**_LOC)

    def key(self) -> str:
        return content_key(self)

    def selectors(self) -> tuple[Select, ...]:
        """The scored selectors (one, or the parts of a union/intersection), in order."""
        return self.select.scored() if self.select else ()

    def _summaries(self, per: str) -> tuple[Summary, ...]:
        found = [s.score.summary for s in self.selectors() if s.score.summary is not None]
        return tuple(x for x in dict.fromkeys(found) if x.per == per)

    def summaries(self) -> tuple[Summary, ...]:
        """The page summaries the cache must keep for this pipeline."""
        return self._summaries("page")

    def token_summaries(self) -> tuple[Summary, ...]:
        """The per-token summaries (maps of each key) the cache must keep on append."""
        return self._summaries("token")

    def estimators(self) -> tuple[Estimator, ...]:
        """The distinct key estimators the selectors' scores and the pruners read (exact ones
        included)."""
        seen: dict[Estimator, None] = {}
        for s in self.selectors():
            if s.estimator is not None:
                seen.setdefault(s.estimator)
        for p in self.prune:
            seen.setdefault(p.estimator)
        return tuple(seen)


def as_ir(pipeline) -> PipelineIR:
    """The IR of a ``tw.Pipeline`` (its ``.ir``), or the IR itself; anything else is an
    ``InputError`` saying what was passed."""
    if isinstance(pipeline, PipelineIR):
        return pipeline
    got = getattr(pipeline, "ir", None)
    if isinstance(got, PipelineIR):
        return got
    what = f"the string {pipeline!r}" if isinstance(pipeline, str) else \
        f"a {type(pipeline).__name__}"
    raise InputError(f"pipeline: expected a tw.Pipeline (e.g. tw.builtins.quest_twilight()) "
                     f"or its IR, got {what}")


SHAPE_DTYPES = ("float16", "bfloat16", "float32")
"""The K/V and query dtypes kernels are built for (``Shape.dtype``)."""


@dataclass(frozen=True)
class Shape:
    """The problem a kernel is built for (the reference needs none; code generators do)."""

    q_heads: int
    kv_heads: int
    head_dim: int
    page_size: int = 16
    dtype: str = "float16"

    def __post_init__(self) -> None:
        problem = shape_problem(self.q_heads, self.kv_heads, self.head_dim, self.page_size,
                                self.dtype)
        if problem:
            raise InputError(f"Shape: {problem}")
        for name in ("q_heads", "kv_heads", "head_dim", "page_size"):
            object.__setattr__(self, name, int(getattr(self, name)))  # numpy/torch ints → int

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads


def _whole(x: Any) -> bool:
    """A whole number: Python's or numpy's/torch's integer types, not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def page_size_problem(page_size: Any) -> str | None:
    """What is wrong with a page size, or None (the one statement of the rule)."""
    if not _whole(page_size) or page_size < 1 or page_size & (page_size - 1) \
            or page_size > MAX_PAGE_SIZE:
        return (f"page_size={page_size!r}; expected a power of two from 1 to {MAX_PAGE_SIZE} "
                "(16 is Quest's)")
    return None


def shape_problem(q_heads: Any, kv_heads: Any, head_dim: Any, page_size: Any,
                  dtype: Any) -> str | None:
    """What is wrong with a head layout, or None: whole positive counts within the limits above,
    ``q_heads`` a multiple of ``kv_heads``, a dtype named as in ``SHAPE_DTYPES``."""
    for name, v, top in (("q_heads", q_heads, MAX_HEADS), ("kv_heads", kv_heads, MAX_HEADS),
                         ("head_dim", head_dim, MAX_HEAD_DIM)):
        if not _whole(v) or not 1 <= v <= top:
            return f"{name}={v!r}; expected a whole number from 1 to {top}"
    if q_heads % kv_heads:
        return (f"q_heads={q_heads}, kv_heads={kv_heads}; expected q_heads a multiple of "
                "kv_heads (each KV head serves a whole group of query heads)")
    if not isinstance(dtype, str) or dtype not in SHAPE_DTYPES:
        return f"dtype={dtype!r}; expected one of {', '.join(SHAPE_DTYPES)}"
    return page_size_problem(page_size)


# ---------------------------------------------------------------------------------------------
# Canonical form, key, and a JSON round trip (tuning logs and cache entries store IR as JSON).

_CLASSES = {c.__name__: c for c in (Expr, SummaryField, Summary, Score, Budget, Estimator,
                                    Select, Prune, Keep, Attend, PipelineIR, Shape, Matrix)}


def to_data(obj: Any) -> Any:
    """Plain JSON-able data for an IR object; ``loc`` fields are dropped."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"__ir__": type(obj).__name__}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name == "loc" or (f.metadata.get("omit_default") and value == f.default):
                continue
            out[f.name] = to_data(value)
        return out
    if isinstance(obj, tuple | list):
        return [to_data(x) for x in obj]
    if isinstance(obj, float) and obj == int(obj) and abs(obj) < 2**53:
        return {"__float__": repr(obj)}  # keep 1.0 distinct from 1 in the key
    return obj


def from_data(data: Any) -> Any:
    """Inverse of ``to_data``."""
    if isinstance(data, dict) and "__float__" in data:
        return float(data["__float__"])
    if isinstance(data, dict):
        cls = _CLASSES[data["__ir__"]]
        return cls(**{k: from_data(v) for k, v in data.items() if k != "__ir__"})
    if isinstance(data, list):
        return tuple(from_data(x) for x in data)
    return data


def canonical_json(obj: Any) -> str:
    return json.dumps({"ir_version": IR_VERSION, "ir": to_data(obj)}, sort_keys=True,
                      separators=(",", ":"), allow_nan=False)


def content_key(obj: Any) -> str:
    """sha256 of the canonical JSON: stable across processes and machines."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()
