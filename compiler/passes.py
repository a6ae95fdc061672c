"""Backend-independent facts about a pipeline, computed once and consumed by every backend.

Each is a pure function of the IR (and the problem ``Shape``), so the Triton and TVM code
generators, the planner and the reference agree by construction.
"""

from __future__ import annotations

import math

import torch

from . import ir

__all__ = ["MERGED", "SHARING", "budget_units", "candidate_width", "gqa_problem",
           "list_widths", "lists_shared_after", "softmax_scale"]


def softmax_scale(p: ir.PipelineIR, head_dim: int) -> float:
    """The logit scale of the estimate and attention stages: the pipeline's ``attention(scale=)``
    or ``1/sqrt(head_dim)``."""
    return float(p.attend.scale or 1.0 / math.sqrt(head_dim))


# ---- GQA: do a group's query heads share one list? --------------------------------------------
SHARING = ("union", "mean", "max", "kv")
"""Group modes after which every query head of a GQA group holds the same list."""
MERGED = ("mean", "max", "kv")
"""Group modes that merge the heads' scores or weights into one decision per KV head."""


def lists_shared_after(p: ir.PipelineIR, n_prunes: int) -> bool:
    """Do the query heads of a GQA group share one list after the selector and the first
    ``n_prunes`` pruners? (Then a group's heads can share every key they load, and a merged
    decision has one list to decide over.)"""
    s = p.select
    ok = s is None or s.score is None or s.group in SHARING
    return ok and all(pr.group in SHARING for pr in p.prune[:n_prunes])


def gqa_problem(p: ir.PipelineIR, backend: str, union_over_head_lists: bool) \
        -> tuple[str, object] | None:
    """Why ``backend`` cannot lower ``p``'s GQA group modes (and the pruner's DSL location),
    or None. A merged decision
    (``mean``/``max``/``kv``) needs the group's heads to reach it with one shared list; a
    ``union`` over per-head lists is a backend capability (``union_over_head_lists``)."""
    for i, pr in enumerate(p.prune):
        needs_shared = pr.group in MERGED or (pr.group == "union" and not union_over_head_lists)
        if needs_shared and not lists_shared_after(p, i):
            return (f"the {backend} backend cannot lower pruner {i} of pipeline '{p.name}': it "
                    f"merges the GQA group ({pr.group!r}) but the group's heads reach it with "
                    "different lists (an upstream group='none')", pr.loc)
    return None


# ---- list widths and budgets --------------------------------------------------------------------
def candidate_width(p: ir.PipelineIR, group_size: int, tokens: int) -> int:
    """The most candidates a query head can hold for contexts of up to ``tokens`` tokens: the
    selector's budget (in whole pages for page scores; a ``union`` of the group's ``G``
    choices), plus the keep rules' tokens, at most ``tokens``."""
    s, keep = p.select, p.keep
    extra = keep.sink + keep.window
    if s is None or s.rule == "threshold":
        c = tokens
    elif s.rule == "none":
        c = extra
    else:
        unit = p.page_size if s.score.per == "page" else 1
        units = -(-s.budget.tokens(tokens) // unit)
        heads = group_size if s.group == "union" else 1
        c = heads * units * unit + extra
    return max(1, min(c, tokens))


def list_widths(p: ir.PipelineIR, group_size: int, tokens: int) -> list[int]:
    """Widths of the candidate list and of the list after each pruner (a pruner never keeps
    more than its candidates)."""
    return [candidate_width(p, group_size, tokens)] * (len(p.prune) + 1)


def budget_units(budget: ir.Budget, lengths: torch.Tensor, unit: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Units (pages or tokens) a top-k budget allows each request of ``lengths`` tokens:
    ``ceil(Budget.tokens(length) / unit)``, vectorized with the same rounding (int32)."""
    if budget.kind == "tokens":
        units = torch.full_like(lengths, -(-int(budget.value) // unit), dtype=torch.int32)
    else:
        scaled = torch.round(lengths.double() * budget.value * 1e6).long()
        tokens = torch.clamp(-(-scaled // 1_000_000), min=1)
        units = (-(-tokens // unit)).to(torch.int32)
    if out is None:
        return units
    return out.copy_(units)
