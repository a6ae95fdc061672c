"""Backend-independent facts about a pipeline, computed once and consumed by every backend.

Each is a pure function of the IR (and the problem ``Shape``), so the Triton and TVM code
generators, the planner and the reference agree by construction.
"""

from __future__ import annotations

import math

import torch

from . import ir

__all__ = ["MERGED", "SHARING", "budget_tokens", "budget_units", "candidate_width", "gqa_problem",
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
    ok = all(s.group in SHARING for s in p.selectors())
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
    choices; a union of selectors the sum of theirs, an intersection the least), plus the keep
    rules' tokens, at most ``tokens``."""
    extra = p.keep.sink + p.keep.window
    c = tokens if p.select is None else \
        _select_width(p.select, p.page_size, group_size, tokens) + extra
    return max(1, min(c, tokens))


def _select_width(s: ir.Select, page_size: int, group_size: int, tokens: int) -> int:
    if s.rule == "none":
        return 0
    if s.parts:
        widths = [_select_width(x, page_size, group_size, tokens) for x in s.parts]
        return sum(widths) if s.rule == "union" else min(widths)
    if s.rule != "top_k":  # threshold, top_p: anything may qualify
        return tokens
    unit = page_size if s.score.per == "page" else 1
    units = -(-s.budget.tokens(tokens) // unit)
    heads = group_size if s.group == "union" else 1
    return heads * units * unit


def list_widths(p: ir.PipelineIR, group_size: int, tokens: int) -> list[int]:
    """Widths of the candidate list and of the list after each pruner (a pruner never keeps
    more than its candidates)."""
    return [candidate_width(p, group_size, tokens)] * (len(p.prune) + 1)


def budget_tokens(budget: ir.Budget, lengths: torch.Tensor) -> torch.Tensor:
    """``Budget.tokens`` of each request's context length, vectorized with the same rounding
    (int64): fractions rounded as the reference rounds them, combined budgets the larger
    (``|``) or smaller (``&``) of their parts."""
    if budget.kind == "tokens":
        return torch.full_like(lengths, int(budget.value), dtype=torch.int64)
    if budget.kind == "fraction":
        scaled = torch.round(lengths.double() * budget.value * 1e6).long()
        return torch.clamp(-(-scaled // 1_000_000), min=1)
    parts = [budget_tokens(b, lengths) for b in budget.parts]
    out = parts[0]
    for x in parts[1:]:
        out = torch.maximum(out, x) if budget.kind == "max" else torch.minimum(out, x)
    return out


def budget_units(budget: ir.Budget, lengths: torch.Tensor, unit: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Units (pages or tokens) a top-k budget allows each request of ``lengths`` tokens:
    ``ceil(Budget.tokens(length) / unit)``, vectorized with the same rounding (int32)."""
    units = (-(-budget_tokens(budget, lengths) // unit)).to(torch.int32)
    if out is None:
        return units
    return out.copy_(units)
