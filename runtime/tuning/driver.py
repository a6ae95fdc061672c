"""The tune driver: every shape bucket of a :class:`TuneConfig`, then one tuning-log entry.

``run_tune`` is a library function: it reports progress through callbacks and returns what it
measured; ``twilightc tune`` draws the progress bars and prints the table.

Example::

    result = run_tune(cfg, log_root, meta={"date": "2026-11-30"})
    for rec in result.records:
        print(rec["bucket"], rec["latency_ms"], rec["dense_latency_ms"])
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from ...compiler.backend import get_backend
from ..evaluation.measure import dense_baseline_ms
from ..store.kernel_key import toolchain_stamps
from ..store.tuning_log import SHIPPED, find_schedule, shape_dict, user_root, write_entry
from .tuner import TuneConfig, best_trial, bucket_problem, default_trial, open_storage, tune_bucket

__all__ = ["TuneProgress", "TuneResult", "previous_winners", "run_tune"]


@dataclass
class TuneProgress:
    """What a progress callback is told: the bucket, trials done of ``total``, the best so far."""

    bucket: str
    done: int
    total: int
    best_ms: float | None


@dataclass
class TuneResult:
    records: list[dict]  # one per bucket, as written to the tuning log
    log_path: Path
    space_size: int
    default: dict  # the space's default schedule (what "vs default" compares with)


def run_tune(cfg: TuneConfig, log_root: Path, meta: dict, workers: int = 1,
             on_start: Callable[[str], None] | None = None,
             on_progress: Callable[[TuneProgress], None] | None = None) -> TuneResult:
    """Tune every bucket of ``cfg`` (resumable in ``cfg.storage``) and write the winners to a
    tuning log under ``log_root``. ``on_start(summary)`` is called once with a line saying what
    is tuned; ``on_progress`` after every finished trial."""
    backend = get_backend(cfg.backend)
    space = backend.space(cfg.pipeline, cfg.shape, cfg.target)
    storage = open_storage(cfg.storage, Path(cfg.storage))
    check = lambda s: backend.check_schedule(cfg.pipeline, cfg.shape, s, cfg.device)  # noqa: E731
    cfg.warm_start = cfg.warm_start or previous_winners(cfg, log_root)
    if on_start:
        on_start(f"tuning [bold]{cfg.pipeline.name}[/] ({cfg.pipeline.key()[:12]}) with "
                 f"{cfg.backend} on {cfg.device.name}: {len(cfg.buckets)} shape buckets × "
                 f"{cfg.trials} trials, space of {space.size()} schedules, storage {cfg.storage}")
    records, start = [], time.monotonic()
    for i, bucket in enumerate(cfg.buckets):
        left = None if cfg.timeout is None else max(
            1.0, (cfg.timeout - (time.monotonic() - start)) / (len(cfg.buckets) - i))

        def progress(study, trial, bucket=bucket):
            if on_progress:
                b = best_trial(study)
                on_progress(TuneProgress(bucket.name, len(study.trials), cfg.trials,
                                         b.value if b else None))
        problem = bucket_problem(cfg, bucket)  # trials and the dense baseline share it
        study = tune_bucket(cfg, bucket, space, storage, check, left, progress,
                            workers=workers, problem=problem)
        progress(study, None)
        records.append(_record(cfg, bucket, study, space, problem))
    path = write_entry(log_root, cfg.device.name, cfg.pipeline.name, {
        "pipeline_key": cfg.pipeline.key(), "backend": cfg.backend,
        "target": str(cfg.target), "shape": shape_dict(cfg.shape), "measured": True,
        "versions": {**toolchain_stamps(cfg.backend), "optuna": optuna.__version__},
        "storage": cfg.storage, **meta, "buckets": records})
    return TuneResult(records, path, space.size(), space.default())


def previous_winners(cfg: TuneConfig, log_root: Path) -> list[dict]:
    """The winners earlier tunes logged for this pipeline, device, head layout and backend
    (this log root, the user's, the shipped ones): tried right after the default."""
    roots = list(dict.fromkeys([Path(log_root), user_root(), SHIPPED]))
    found = [find_schedule(cfg.pipeline, cfg.device.name, cfg.shape, b, cfg.backend, roots)
             for b in cfg.buckets]
    unique = {json.dumps(f[0]["schedule"], sort_keys=True): f[0]["schedule"]
              for f in found if f and f[0]["schedule"]}
    return list(unique.values())


def _record(cfg: TuneConfig, bucket, study, space, problem) -> dict:
    best, dflt = best_trial(study), default_trial(study, space.default())
    dense_ms, dense_what = dense_baseline_ms(problem, cfg.repeats)
    states = [t.state.name for t in study.trials]
    return {"bucket": bucket.name, "batch": bucket.batch, "context": bucket.context,
            "study": study.study_name, "trials": len(states),
            "failed": states.count("FAIL"), "pruned": states.count("PRUNED"),
            "schedule": best.params if best else None,
            "latency_ms": round(best.value, 4) if best else None,
            "default_latency_ms": round(dflt.value, 4) if dflt else None,
            "dense_latency_ms": round(dense_ms, 4), "dense_baseline": dense_what}
