"""IR + schedule → every kernel of a pipeline, as ``KernelSpec``s and one module source."""

from __future__ import annotations

from .. import ir
from . import append, attend, estimate, select, top_p
from .expr import ChannelTables
from .kernels import KernelSpec
from .prelude import HEADER, LIBRARY
from .select import Ctx

MERGING = ("mean", "max", "union", "kv")


class UnsupportedPipeline(NotImplementedError):
    """A pipeline shape the Triton backend does not lower (the message says which part)."""


def check_supported(p: ir.PipelineIR) -> None:
    """Merging a group's prune decisions needs the group's heads to share one candidate list;
    a per-head (``none``) decision upstream gives each head its own list."""
    shared = not (p.select is not None and p.select.score is not None
                  and p.select.group == "none")
    for i, pr in enumerate(p.prune):
        if pr.group in MERGING and not shared:
            raise UnsupportedPipeline(
                f"pipeline '{p.name}': pruner {i} merges the GQA group ({pr.group!r}) over "
                "candidate lists that differ per head (an upstream group='none'); the Triton "
                "backend needs one list per group there — use group='none' throughout, or a "
                "merging selector group")
        shared = shared and pr.group != "none"


def generate(p: ir.PipelineIR, shape: ir.Shape, schedule: dict,
             row_block: int = 8192) -> tuple[dict[str, KernelSpec], ChannelTables]:
    """All kernels of ``p`` keyed by name; ``row_block`` sizes the sort strategy's block."""
    check_supported(p)
    c = Ctx(p, shape, schedule, ChannelTables(shape.kv_heads))
    specs: list[KernelSpec] = []
    s = p.select
    if s is not None and s.score is not None:
        specs += [select.gen_score(c), select.gen_decide(c)]
    specs.append(select.gen_compact(c))
    for i, _ in enumerate(p.prune):
        specs += [estimate.gen_estimate(c, i), top_p.gen_decide(c, i, row_block)]
        if not top_p.fuses_compact(c, i):
            specs.append(top_p.gen_compact(c, i))
    specs.append(attend.gen_attend(c))
    if schedule["attend_splits"] > 1:
        specs.append(attend.gen_combine(c))
    for summ in p.summaries():
        specs.append(append.gen_summary(c, summ))
    for e in p.estimators():
        if e.kind == "quantized":  # one kernel per key-code format (the dict dedups by name)
            specs.append(append.gen_codes(c, e))
    return {k.name: k for k in specs}, c.tables


def module_source(specs: dict[str, KernelSpec]) -> str:
    return HEADER + LIBRARY + "\n\n" + "\n\n".join(k.source for k in specs.values())
