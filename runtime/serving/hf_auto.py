"""``install(model)`` / ``install(model, "auto")``: a good default pipeline for a model.

The choice, in order of what is known about the model:

* **pipeline**: Quest with Twilight's top-p (``quest_twilight``, p = 0.95) and a budget of 1/4
  of the context, never below :data:`MIN_BUDGET` tokens (a conservative Quest budget: top-p
  then keeps what the heads need). On SmolLM2 at 8k tokens of Python source, p = 0.95 with a
  1/4 budget agreed with dense on 64 of 64 next tokens, p = 0.95 with 1/8 on 60, p = 0.9 with
  1/8 on 28 of 32, at about the same speed (README, "The transformers backend");
* **key estimator**: the one ``twilightc calibrate`` (or ``benchmarks/e2e.py --calibrate``)
  chose for the model, where its calibration file exists (``load(..., model=)`` applies it);
  else the built-in default (INT4 per page channel);
* **sink/window tokens**: those the model's calibration measured best
  (:func:`~twilight.runtime.store.estimator_choice.keep_choice`); else :data:`DEFAULT_KEEP`,
  measured on SmolLM2 (README, "The transformers backend");
* **dense layers**: the first two (published setups), plus every layer that is not plain
  full attention (sliding windows are already short: see ``hf_attention``);
* **dense at short contexts**: below :data:`SPARSE_FROM` positions (or the loaded pipeline's
  own ``dense_below``, measured by ``twilight.load`` where the installed twilight has one, if
  that is longer) a twilight layer keeps the model's own keys and attention — exactly the
  model, at the model's speed — and moves to its paged cache when the context gets there.

The calibration file is found under ``model_name`` (``install(..., model_name=)``), else under
the model's ``config.name_or_path`` and its last path component.
"""

from __future__ import annotations

from pathlib import Path

from ...compiler import ir
from ...frontend import builtins
from ...frontend.dsl import Pipeline, fraction, quantized_keys, sink, tokens, top_k, top_p, window
from ..store.estimator_choice import calibration_path, keep_choice

MIN_BUDGET = 512
"""Tokens: below this a 1/4 budget keeps too little for Quest's page bound to find the mass."""

BUDGET = 1 / 4
"""Quest's budget, as a fraction of the context."""

DEFAULT_KEEP = (16, 64)
"""Sink and window tokens kept when the model has no calibrated choice: on SmolLM2 at 8k,
Quest's bound ranks the attention-sink page out of the budget in many heads (README)."""

AUTO_P = 0.95

SPARSE_FROM = 4096
"""Positions below which a twilight layer attends as the model does (its own keys, its own
attention): on SmolLM2 at 2k, attention is a small share of a decode step, so sparse attention
saves little and costs perplexity (README, "The transformers backend")."""


def calibration_name(model, model_name: str | None) -> str | None:
    """The name the model's calibration is filed under: ``model_name``, else the first of
    ``name_or_path`` and its last component that has a calibration file."""
    if model_name:
        return model_name
    path = str(getattr(model.config, "name_or_path", "") or "")
    for name in (path, Path(path).name):
        if name and calibration_path(name).exists():
            return name
    return None


def auto_pipeline(context: int, keep: tuple[int, int]) -> ir.PipelineIR:
    """``quest_twilight`` with a budget of max(BUDGET of the context, MIN_BUDGET) tokens (the
    fraction where ``context`` reaches that) and ``keep``."""
    budget = fraction(BUDGET) if context * BUDGET >= MIN_BUDGET else tokens(MIN_BUDGET)
    return Pipeline(select=top_k(builtins.quest, budget), prune=top_p(AUTO_P, estimate=quantized_keys(4, "page")),
                    keep=sink(keep[0]) | window(keep[1]), name="quest_twilight").ir


def choose(model, sem, context: int, dense_layers: int | None, model_name: str | None) \
        -> tuple[ir.PipelineIR, int, int, str | None, str]:
    """``(pipeline, dense_layers, sparse_from, calibration name, note)`` for
    ``install(model, "auto")``."""
    name = calibration_name(model, model_name)
    measured = keep_choice(name) if name else None
    keep = measured or DEFAULT_KEEP
    p = auto_pipeline(context, keep)
    src = f"calibration of {name}" if measured else "defaults (no calibration of this model)"
    note = (f"auto: quest_twilight p={AUTO_P}, budget max({BUDGET:g} context, {MIN_BUDGET}), sink "
            f"{keep[0]} + window {keep[1]} ({src}), sparse from {SPARSE_FROM} positions")
    return p, 2 if dense_layers is None else dense_layers, SPARSE_FROM, name, note
