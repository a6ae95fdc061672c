"""Backend-independent facts about a pipeline, computed once and consumed by every backend.

Each is a pure function of the IR (and the problem ``Shape``), so the Triton and TVM code
generators, the planner and the reference agree by construction.
"""

from __future__ import annotations

import math

from . import ir

__all__ = ["softmax_scale"]


def softmax_scale(p: ir.PipelineIR, head_dim: int) -> float:
    """The logit scale of the estimate and attention stages: the pipeline's ``attention(scale=)``
    or ``1/sqrt(head_dim)``."""
    return float(p.attend.scale or 1.0 / math.sqrt(head_dim))
