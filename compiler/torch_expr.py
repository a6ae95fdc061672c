"""Evaluate traced score and summary expressions with torch (the reference semantics).

Layouts, channels always last and the KV head always at dim 1:

* scores: ``[B, Hkv, G, N, C]`` — request, KV head, query head within the group (1 when shared),
  token or page, channel; the result of the final reduction is ``[B, Hkv, G, N]``;
* summaries: ``[P, Hkv, page_size, C]`` with a token validity mask ``[P, page_size]``;
  reductions over ``axis="token"`` ignore invalid slots and give ``[P, Hkv, C]``.
"""

from __future__ import annotations

import torch

from .ir import Expr

_UNARY = {"neg": torch.neg, "abs": torch.abs, "exp": torch.exp}
_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
           "maximum": torch.maximum, "minimum": torch.minimum}


def evaluate(expr: Expr, leaves: dict[str, torch.Tensor],
             token_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Value of ``expr`` given its leaves: ``q``, ``k``, ``page_k`` and ``summary.<field>``."""
    memo: dict[int, torch.Tensor] = {}

    def ev(e: Expr) -> torch.Tensor:
        if id(e) in memo:
            return memo[id(e)]
        if e.op == "const":
            out = torch.tensor(e.attr("value"), dtype=torch.float32)
        elif e.op == "summary":
            out = leaves["summary." + e.attr("field")]
        elif e.op in ("q", "k", "page_k"):
            out = leaves[e.op]
        elif e.op in _UNARY:
            out = _UNARY[e.op](ev(e.inputs[0]))
        elif e.op in _BINARY:
            out = _BINARY[e.op](ev(e.inputs[0]), ev(e.inputs[1]))
        elif e.op == "take":
            out = take_channels(ev(e.inputs[0]), e.attr("channels"))
        elif e.op.startswith("reduce_"):
            out = _reduce(e.op, ev(e.inputs[0]), e.attr("axis"), token_valid)
        else:
            raise NotImplementedError(f"op {e.op!r}")
        memo[id(e)] = out
        return out

    return ev(expr)


def take_channels(x: torch.Tensor, channels: tuple) -> torch.Tensor:
    """Select channels (last dim): one list for every head, or one row per KV head (dim 1)."""
    if not isinstance(channels[0], tuple):
        return x.index_select(-1, torch.tensor(channels, device=x.device))
    table = torch.tensor(channels, device=x.device)  # [Hkv, r]
    shape = [1] * x.dim()
    shape[1], shape[-1] = table.shape
    idx = table.view(shape).expand(*x.shape[:-1], table.shape[1])
    return torch.gather(x.expand(*x.shape[:-1], x.shape[-1]), -1, idx)


def _reduce(op: str, x: torch.Tensor, axis: str, token_valid: torch.Tensor | None):
    if axis == "channel":
        return {"reduce_sum": lambda: x.sum(-1), "reduce_max": lambda: x.amax(-1),
                "reduce_min": lambda: x.amin(-1), "reduce_mean": lambda: x.mean(-1)}[op]()
    mask = token_valid[:, None, :, None]  # [P, 1, page_size, 1]
    if op == "reduce_max":
        return x.masked_fill(~mask, float("-inf")).amax(-2)
    if op == "reduce_min":
        return x.masked_fill(~mask, float("inf")).amin(-2)
    total = x.masked_fill(~mask, 0.0).sum(-2)
    if op == "reduce_sum":
        return total
    return total / token_valid.sum(-1).clamp(min=1)[:, None, None]


def summary_fn(expr: Expr):
    """A cache ``SummaryFn`` for one summary field: ``(keys [P,Hkv,ps,D], valid [P,ps])``."""
    def fn(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return evaluate(expr, {"page_k": keys.float()}, valid)
    return fn
