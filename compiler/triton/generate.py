"""IR + schedule → every kernel of a pipeline, as ``KernelSpec``s and one module source."""

from __future__ import annotations

from ...errors import UnsupportedPipeline
from .. import ir, passes
from . import append, attend, estimate, rank, select, top_p
from .expr import ChannelTables
from .kernels import KernelSpec
from .prelude import HEADER, LIBRARY
from .select import Ctx


def check_supported(p: ir.PipelineIR) -> None:
    """A merged or union GQA decision needs the group's heads to share one list here
    (``passes.gqa_problem``)."""
    why = passes.gqa_problem(p, "triton", union_over_head_lists=False)
    if why:
        raise UnsupportedPipeline(*why, hint="use group='none' throughout, or a merging "
                                  "selector group")


def generate(p: ir.PipelineIR, shape: ir.Shape, schedule: dict,
             row_block: int = 8192) -> tuple[dict[str, KernelSpec], ChannelTables]:
    """All kernels of ``p`` keyed by name; ``row_block`` sizes the sort strategy's block."""
    check_supported(p)
    c = Ctx(p, shape, schedule, ChannelTables(shape.kv_heads))
    specs: list[KernelSpec] = []
    for i, _ in enumerate(p.selectors()):
        specs += [select.gen_score(c, i), rank.gen_decide(c, i)]
    specs.append(rank.gen_compact(c))
    for i, _ in enumerate(p.prune):
        specs += [estimate.gen_estimate(c, i), top_p.gen_decide(c, i, row_block)]
        if not top_p.fuses_compact(c, i):
            specs.append(top_p.gen_compact(c, i))
    specs.append(attend.gen_attend(c))
    if schedule["attend_splits"] > 1:
        specs.append(attend.gen_combine(c))
    if p.attend.mean_value:
        specs.append(attend.gen_reallocate(c))
    for summ in p.summaries():
        specs.append(append.gen_summary(c, summ))
    for summ in p.token_summaries():
        specs.append(append.gen_token_summary(c, summ))
    for e in p.estimators():
        if e.kind == "quantized":  # one kernel per key-code format (the dict dedups by name)
            specs.append(append.gen_codes(c, e))
    return {k.name: k for k in specs}, c.tables


def module_source(specs: dict[str, KernelSpec]) -> str:
    return HEADER + LIBRARY + "\n\n" + "\n\n".join(k.source for k in specs.values())
