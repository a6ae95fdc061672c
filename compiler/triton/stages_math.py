"""Small numeric facts shared by the stage generators (kept apart to avoid import cycles)."""

from __future__ import annotations

import math

from .. import ir


def softmax_scale(p: ir.PipelineIR, head_dim: int) -> float:
    """The attention scale the reference uses (``compiler.stages.softmax_scale``)."""
    return float(p.attend.scale or 1.0 / math.sqrt(head_dim))
