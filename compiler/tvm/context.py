"""What every stage template needs to know: the pipeline, the problem shape, the schedule and
the target dialect, plus the facts derived from them once (group sizes, whether the query heads
of a GQA group share one candidate list, the width of each summary field)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import UnsupportedPipeline
from .. import ir, passes
from .dialect import Dialect
from .expr import Lowering, channel_tables


@dataclass
class StageCtx:
    p: ir.PipelineIR
    shape: ir.Shape
    sched: dict
    dialect: Dialect = field(default_factory=Dialect)

    @property
    def D(self) -> int:  # noqa: N802 - the paper's names
        return self.shape.head_dim

    @property
    def HQ(self) -> int:  # noqa: N802
        return self.shape.q_heads

    @property
    def HKV(self) -> int:  # noqa: N802
        return self.shape.kv_heads

    @property
    def G(self) -> int:  # noqa: N802
        return self.shape.group_size

    @property
    def PS(self) -> int:  # noqa: N802
        return self.p.page_size

    @property
    def dtype(self) -> str:
        return self.shape.dtype

    @property
    def esize(self) -> int:
        """Bytes of one element of the cache's dtype."""
        return 4 if self.shape.dtype == "float32" else 2

    @property
    def vec(self) -> int:
        return int(self.sched.get("vector_width", 16))

    def summary_widths(self, summary: ir.Summary | None = None) -> dict[str, int]:
        """Channels of every field (``summary.<field>`` → C) of ``summary``, or of every page
        and token summary the selectors read."""
        out = {}
        for s in (summary,) if summary else self.p.summaries() + self.p.token_summaries():
            for f in s.fields:
                low = Lowering(None, None, {"page_k": self.D, "k": self.D},
                               channel_tables([f.expr]))
                out[f"summary.{f.name}"] = low.width(f.expr)
        return out

    def uniform_after(self, n_prunes: int) -> bool:
        """Do the query heads of a GQA group share one list after the selector and the first
        ``n_prunes`` pruners (``passes.lists_shared_after``)?"""
        return passes.lists_shared_after(self.p, n_prunes)

    def check_supported(self) -> None:
        """A merged GQA decision needs one list per group; a union over per-head lists is fine
        here (``passes.gqa_problem``)."""
        why = passes.gqa_problem(self.p, "tvm", union_over_head_lists=True)
        if why:
            raise UnsupportedPipeline(*why, hint="use group='union' or 'max' for the selector, "
                                      "or group='none' here")

    def softmax_scale(self) -> float:
        return passes.softmax_scale(self.p, self.D)


def f32(x: float) -> str:
    return f"T.float32({float(x)!r})"


def softcap_text(ctx: StageCtx, logit: str) -> str:
    cap = ctx.p.attend.softcap
    if not cap:
        return logit
    return f"({f32(cap)} * T.tanh({logit} / {f32(cap)}))"


def keep_text(ctx: StageCtx, t: str, length: str) -> str:
    """Is token ``t`` kept by the keep rules (sink, window)? As TVMScript."""
    k = ctx.p.keep
    parts = []
    if k.sink:
        parts.append(f"{t} < {k.sink}")
    if k.window:
        parts.append(f"{t} >= {length} - {k.window}")
    return " or ".join(parts) if parts else "False"


FLUSH = -64.0  # fast_exp's result is 0 below exp(FLUSH): never a subnormal (see fast_exp)


def fast_exp(x: str) -> str:
    """``exp(x)`` in float32 as one TVMScript expression of vector-friendly arithmetic, for
    ``x ≤ 88`` (softmax arguments are ≤ 0): ``T.exp`` becomes a libm call per element on llvm,
    which neither vectorizes nor inlines. Cephes' ``expf``: ``x = n·ln2 + r`` (ln2 in two parts),
    a degree-7 polynomial of ``r``, times ``2**n`` built from the exponent bits in two halves
    (so that subnormal results round as they should). Within 2 ulp of libm for ``x ≥ FLUSH``,
    and 0 below it (``exp(FLUSH)`` is 1.6e-28); ``exp(-inf) = 0`` and NaN stays NaN. ``x`` is
    repeated in the text (no scalar binding: see TOOLCHAIN.md).

    Why 0 below ``FLUSH``: x86 computes with subnormal floats ~100x slower than with normal
    ones. On keys with a strong attention sink (the synthetic problem the tuner used until
    2026-12) ~47% of the estimate's weights were subnormal, and it took 1.97 ms where flushing
    them took 1.01 ms (32/8 heads × d128, 8k tokens, one thread). At ``FLUSH`` nothing a
    softmax makes of the result (a weight, that weight over a sum of up to 2^32 of them, a
    weight times a value) is subnormal, and what is dropped is below float32's resolution of
    the mass (``1 + 1.6e-28 == 1``)."""
    xc = f"T.max(T.min({x}, T.float32(88.3762626647949)), T.float32({FLUSH}))"
    n = f"T.floor({xc} * T.float32(1.44269504088896341) + T.float32(0.5))"
    r = f"({xc} - {n} * T.float32(0.693359375) - {n} * T.float32(-2.12194440e-4))"
    poly = "T.float32(1.9875691500e-4)"
    for c in ("1.3981999507e-3", "8.3334519073e-3", "4.1665795894e-2", "1.6666665459e-1",
              "5.0000001201e-1"):
        poly = f"({poly} * {r} + T.float32({c}))"
    val = f"({poly} * {r} * {r} + {r} + T.float32(1))"
    half = f"T.floor({n} * T.float32(0.5))"

    def pow2(m: str) -> str:
        return f'T.reinterpret("float32", T.shift_left(T.Cast("int32", {m}) + 127, 23))'
    out = f"{val} * {pow2(half)} * {pow2(f'({n} - {half})')}"
    # NaN by its bits: T.isnan inside a Select stops TVM 0.27 from vectorizing the loop, and
    # TVM folds x != x to False
    nan = f'T.bitwise_and(T.reinterpret("uint32", {x}), T.uint32(2147483647)) > T.uint32(2139095040)'
    return (f"T.Select({nan}, {x}, T.Select({x} < T.float32({FLUSH}), "
            f"T.float32(0), {out}))")
