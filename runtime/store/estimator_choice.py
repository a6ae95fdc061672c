"""Which key estimator ``twilightc calibrate`` chose for a model: the choices, and the file.

``write_choice`` records the choice in ``<data dir>/calibration/<model>.json`` (atomically);
``calibrated`` is what ``twilight.load(pipeline, model=...)`` applies. The measurement itself
lives in ``runtime.evaluation.estimators``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
from pathlib import Path

from ... import knobs
from ...compiler import ir

CHOICES = (ir.Estimator("exact"),) + tuple(
    ir.Estimator("quantized", bits, gran, group_pages=g, smooth=sm)
    for bits in (8, 4, 2)
    for gran, g, sm in (("token", 1, 0.0), ("token", 1, 1.0), ("token", 1, 0.5),
                        ("page", 1, 0.0), ("group", 4, 0.0))
    if not (sm == 0.5 and bits != 4))
"""Every estimator ``calibrate`` measures: exact keys, and INT8/4/2 codes per token (plain and
smoothed with strength 1; INT4 also 0.5), per channel within a page, and per channel within a
group of 4 pages."""


def estimator_named(name: str) -> ir.Estimator:
    """The :data:`CHOICES` entry called ``name`` (e.g. ``"int4_page"``)."""
    for e in CHOICES:
        if e.name == name:
            return e
    raise ValueError(f"unknown estimator {name!r}; choose from {', '.join(e.name for e in CHOICES)}")


def with_estimator(p: ir.PipelineIR, est: ir.Estimator) -> ir.PipelineIR:
    """``p`` with every pruner estimating through ``est``."""
    return dataclasses.replace(p, prune=tuple(dataclasses.replace(pr, estimator=est)
                                              for pr in p.prune))



def calibration_path(model: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
    return Path(knobs.data_dir()) / "calibration" / f"{safe}.json"


def write_choice(model: str, p: ir.PipelineIR, best, choices: list,
                 snapshots: list[str]) -> Path:
    """Record ``best`` for ``model`` and pipeline ``p.name`` (other pipelines' are kept)."""
    path = calibration_path(model)
    data = json.loads(path.read_text()) if path.exists() else {"model": model, "pipelines": {}}
    data["pipelines"][p.name] = {
        "estimator": best.estimator, "pipeline_key": p.key(), "snapshots": snapshots,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "choices": [dataclasses.asdict(c) for c in choices]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return path


def calibrated(p: ir.PipelineIR, model: str) -> tuple[ir.PipelineIR, str | None]:
    """``p`` with the estimator calibrated for ``model`` (and its name), or ``p`` unchanged."""
    path = calibration_path(model)
    if not p.prune or not path.exists():
        return p, None
    rec = json.loads(path.read_text())["pipelines"].get(p.name)
    if rec is None:
        return p, None
    est = estimator_named(rec["estimator"])
    return with_estimator(p, est), est.name


# ---- keep rules (always-attended sink and window tokens), chosen beside the estimator -------------
def write_keep(model: str, sink: int, window: int, measured: list[dict]) -> Path:
    """Record the sink/window tokens that measured best for ``model`` (``measured``: what each
    candidate scored), beside its estimator choices; ``keep_choice`` reads it back."""
    path = calibration_path(model)
    data = json.loads(path.read_text()) if path.exists() else {"model": model, "pipelines": {}}
    data["keep"] = {"sink": sink, "window": window, "measured": measured,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return path


def keep_choice(model: str) -> tuple[int, int] | None:
    """``(sink, window)`` tokens recorded for ``model`` by ``write_keep``, or None."""
    path = calibration_path(model)
    if not path.exists():
        return None
    keep = json.loads(path.read_text()).get("keep")
    return None if keep is None else (int(keep["sink"]), int(keep["window"]))
