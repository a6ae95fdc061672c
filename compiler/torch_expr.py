"""Evaluate traced score and summary expressions with torch (the reference semantics).

Layouts, channels always last and the KV head always at dim 1:

* scores: ``[B, Hkv, G, N, C]`` — request, KV head, query head within the group (1 when shared),
  token or page, channel; the result of the final reduction is ``[B, Hkv, G, N]``;
* summaries: ``[P, Hkv, page_size, C]`` with a token validity mask ``[P, page_size]``;
  reductions over ``axis="token"`` ignore invalid slots and give ``[P, Hkv, C]``;
* token summaries: ``[N, Hkv, C]`` (one key per row).

Scalar leaves: ``position`` (``[B, 1, 1, N]``), ``query_position`` (``[B, 1, 1, 1]``), both
float32; ``head_dim`` is the last dim of the vector leaves.
"""

from __future__ import annotations

import functools

import torch

from .ir import Expr, Matrix

_UNARY = {"neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "log": torch.log,
          "sqrt": torch.sqrt, "tanh": torch.tanh, "sign": torch.sign}
_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
           "maximum": torch.maximum, "minimum": torch.minimum}
_COMPARE = {"lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq,
            "ne": torch.ne}
_VECTOR_LEAVES = ("q", "k", "page_k")


def evaluate(expr: Expr, leaves: dict[str, torch.Tensor],
             token_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Value of ``expr`` given its leaves: ``q``, ``k``, ``page_k``, ``summary.<field>``,
    ``position`` and ``query_position``."""
    memo: dict[int, torch.Tensor] = {}
    vec: dict[int, bool] = {}

    def ev(e: Expr) -> torch.Tensor:
        if id(e) not in memo:
            args = [ev(x) for x in e.inputs]
            vec[id(e)] = _has_channels(e, [vec[id(x)] for x in e.inputs])
            if e.op in _BINARY or e.op in _COMPARE or e.op == "where":
                # a scalar (one value per unit) meeting a vector gets a channel axis
                args = [a if vec[id(x)] or not vec[id(e)] else a.unsqueeze(-1)
                        for a, x in zip(args, e.inputs, strict=True)]
            memo[id(e)] = _node(e, args, leaves, token_valid)
        return memo[id(e)]

    return ev(expr)


def _has_channels(e: Expr, inputs: list[bool]) -> bool:
    """Does ``e``'s value carry a channel axis (a vector), or is it one value per unit?"""
    if e.op in _VECTOR_LEAVES or e.op in ("summary", "take", "gather", "project",
                                          "top_channels"):
        return True
    if e.op.startswith("reduce_"):
        return e.attr("axis") == "token"
    return any(inputs)


def _node(e: Expr, args: list[torch.Tensor], leaves: dict[str, torch.Tensor],
          token_valid: torch.Tensor | None) -> torch.Tensor:
    op = e.op
    if op == "const":
        return torch.tensor(e.attr("value"), dtype=torch.float32)
    if op == "head_dim":
        d = next(leaves[n].shape[-1] for n in _VECTOR_LEAVES if n in leaves)
        return torch.tensor(float(d), dtype=torch.float32)
    if op == "summary":
        return leaves["summary." + e.attr("field")]
    if op in _VECTOR_LEAVES or op in ("position", "query_position"):
        return leaves[op]
    if op in _UNARY:
        return _UNARY[op](args[0])
    if op == "pow":
        return torch.pow(args[0], e.attr("exponent"))
    if op in _BINARY:
        return _BINARY[op](*args)
    if op in _COMPARE:
        return _COMPARE[op](*args).to(torch.float32)
    if op == "where":
        return torch.where(args[0] != 0, args[1], args[2])
    if op == "take":
        return take_channels(args[0], e.attr("channels"))
    if op == "top_channels":
        return top_channels(args[0], e.attr("r"))
    if op == "gather":
        return gather_channels(*args)
    if op == "project":
        return project(args[0], e.attr("matrix"))
    if op.startswith("reduce_"):
        return _reduce(op, args[0], e.attr("axis"), token_valid)
    raise NotImplementedError(f"op {op!r}")


def top_channels(x: torch.Tensor, r: int) -> torch.Tensor:
    """int64 ``[..., r]``: the ``r`` channels of largest ``|x|`` (ties: the lower channel),
    ascending."""
    order = torch.sort(-x.abs(), dim=-1, stable=True).indices[..., :r]
    return order.sort(dim=-1).values


def gather_channels(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[..., idx]`` with ``x [..., C]`` and ``idx [..., r]`` broadcast against each other."""
    shape = torch.broadcast_shapes(x.shape[:-1], idx.shape[:-1])
    return torch.gather(x.expand(*shape, x.shape[-1]), -1, idx.expand(*shape, idx.shape[-1]))


@functools.lru_cache(maxsize=64)
def matrix_tensor(m: Matrix) -> torch.Tensor:
    """A :class:`Matrix` as a float32 tensor of its shape (cached: the IR is immutable)."""
    return torch.tensor(m.values(), dtype=torch.float32).view(m.shape)


def project(x: torch.Tensor, m: Matrix) -> torch.Tensor:
    """``x @ P``: ``x [..., D]`` with the KV head at dim 1 (when ``P`` has one per head)."""
    p = matrix_tensor(m).to(x.device)
    if m.per_head:
        shape = [1] * (x.dim() - 1) + list(p.shape[-2:])
        shape[1] = p.shape[0]
        p = p.view(*shape)
    return torch.matmul(x.float().unsqueeze(-2), p).squeeze(-2)


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


def token_summary_fn(expr: Expr):
    """A cache ``TokenSummaryFn`` for one token-summary field: ``keys [N, Hkv, D] -> [N, Hkv, C]``."""
    def fn(keys: torch.Tensor) -> torch.Tensor:
        return evaluate(expr, {"k": keys.float()})
    return fn
