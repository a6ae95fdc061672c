"""Calibrate ``install(model)``'s default for a transformers model, on the model's attention.

:func:`capture` records a snapshot (post-RoPE queries of the last positions, keys and values)
of every layer twilight would run, from one prefill with the model's own attention;
:func:`calibrate_model` then

1. picks the key estimator (``calibrate``: the cheapest that keeps top-p faithful) and files it
   for the model, where ``load(..., model=)`` and ``install(model)`` find it;
2. measures sink/window keep rules on the same snapshot — the output error of the auto
   pipeline against dense attention with each — and files the best where
   :func:`~twilight.runtime.serving.hf_auto.choose` finds it: the smallest keep whose error is
   within 2% of the best one's (kept tokens cost time).

Calibrate on text other than what you evaluate on (``benchmarks/e2e.py --calibrate`` uses prose
and evaluates on Python source).
"""

from __future__ import annotations

import warnings

import torch

from ...errors import UnsupportedModel
from ..serving.hf_auto import AUTO_P, DEFAULT_KEEP, auto_pipeline
from ..serving.hf_semantics import read_semantics
from ..store.estimator_choice import estimator_named, with_estimator, write_choice, write_keep
from .estimators import calibrate
from .evaluate import evaluate_snapshot
from .snapshot import Snapshot

KEEPS = ((0, 0), (16, 0), (0, 64), (16, 64), (64, 256))
"""Sink and window tokens :func:`calibrate_model` measures."""


def capture(model, ids: torch.Tensor, queries: int = 16, name: str = "",
            layers: list[int] | None = None) -> Snapshot:
    """A snapshot of ``model``'s full-attention layers (or ``layers``) on ``ids [1, T]``."""
    from transformers import AttentionInterface, DynamicCache  # noqa: PLC0415
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: PLC0415

    sem = read_semantics(model)
    layers = layers or [s.index for s in sem.layers if s.kind == "full" and not s.problem]
    if not layers:
        raise UnsupportedModel("the model has no full-attention layer to calibrate")
    q, scale = {}, {}

    def record(module, query, key, value, attention_mask=None, **kw):
        i = getattr(module, "layer_idx", None)
        if i in layers:
            q[i] = query[0, :, -queries:].transpose(0, 1).float().cpu()
            scale[i] = float(kw.get("scaling") or module.scaling)
        return sem.dense_fn(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("twilight_capture", record)
    ALL_MASK_ATTENTION_FUNCTIONS.register("twilight_capture", sem.mask_fn)
    cache = DynamicCache(config=model.config)
    model.set_attn_implementation("twilight_capture")
    try:
        with torch.inference_mode():
            model.model(input_ids=ids, cache=cache, use_cache=True)
    finally:
        model.set_attn_implementation(sem.implementation)
    t = ids.shape[1]
    return Snapshot(torch.stack([q[i] for i in layers]).half(),
                    torch.stack([cache.layers[i].keys[0].float().cpu() for i in layers]).half(),
                    torch.stack([cache.layers[i].values[0].float().cpu() for i in layers]).half(),
                    torch.arange(t - queries, t), torch.tensor([scale[i] for i in layers]),
                    name, tuple(layers), f"{name}, {t} tokens")


def measure_keeps(snap: Snapshot, estimator: str | None, layers: list[int]) -> list[dict]:
    """The auto pipeline with each of :data:`KEEPS` on ``snap``: output error vs dense, true
    mass kept, tokens kept."""
    out = []
    for s, w in KEEPS:
        p = auto_pipeline(snap.context, (s, w))
        if estimator:
            p = with_estimator(p, estimator_named(estimator))
        rep = evaluate_snapshot(p, snap, layers).to_json()["overall"]
        out.append({"sink": s, "window": w, "rel_l2_error": rep["rel_l2_error_mean"],
                    "true_mass": rep["true_mass_mean"], "kept_tokens": rep["kept_tokens_mean"]})
    return out


def best_keep(measured: list[dict], slack: float = 0.02) -> tuple[int, int]:
    """The keep with the fewest tokens whose error is within ``slack`` of the lowest."""
    low = min(m["rel_l2_error"] for m in measured)
    ok = [m for m in measured if m["rel_l2_error"] <= low * (1 + slack)]
    m = min(ok, key=lambda m: (m["sink"] + m["window"], m["rel_l2_error"]))
    return m["sink"], m["window"]


def calibrate_model(model, tok, text: str, name: str, tokens: int = 4096, offset: int = 0,
                    layer_step: int = 3) -> str:
    """Calibrate ``model`` on ``tokens`` of ``text`` and file the choices under ``name``;
    returns a report. Every ``layer_step``-th full-attention layer is measured."""
    ids = tok(text[offset:offset + 12 * tokens], add_special_tokens=False)["input_ids"]
    snap = capture(model, torch.tensor([ids[:tokens]]), name=name)
    layers = list(range(0, snap.num_layers, layer_step))
    pipe = auto_pipeline(snap.context, DEFAULT_KEEP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        choices, best = calibrate(pipe, [snap], layers=layers, time_estimate=False)
    lines = [f"calibrated {name} on {snap.describe()}"]
    if best:
        write_choice(name, pipe, best, choices, [snap.path])
        lines.append(f"  key estimator: {best.estimator} ({best.bytes_per_token:.0f} B/token; "
                     f"true mass in candidates {best.true_in_cand_mean:.3f}, worst head "
                     f"{best.true_in_cand_min:.3f}, p={AUTO_P})")
    else:
        lines.append("  key estimator: none met the fidelity target; the default stays")
    measured = measure_keeps(snap, best.estimator if best else None, layers)
    sink, window = best_keep(measured)
    path = write_keep(name, sink, window, measured)
    for m in measured:
        lines.append(f"  keep sink {m['sink']:3d} + window {m['window']:3d}: rel. error "
                     f"{m['rel_l2_error']:.4f}, true mass {m['true_mass']:.3f}, "
                     f"{m['kept_tokens']:.0f} tokens kept")
    lines.append(f"  chosen: sink {sink} + window {window}; filed in {path}")
    return "\n".join(lines)
