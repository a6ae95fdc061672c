"""``install(model)`` / ``install(model, "auto")``: a good default pipeline for a model."""

from __future__ import annotations

from ...compiler import ir
from ...frontend import builtins


def choose(model, sem, context: int, dense_layers: int | None, model_name: str | None) \
        -> tuple[ir.PipelineIR, int, str | None, str]:
    """``(pipeline, dense_layers, calibration name, note)``."""
    p = builtins.quest_twilight(budget=1024).ir
    return p, 2 if dense_layers is None else dense_layers, model_name, "auto"
