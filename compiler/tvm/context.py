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
