"""The tune driver: every shape bucket of a :class:`TuneConfig`, then one tuning-log entry.

Per bucket: the study (``tuner.tune_bucket``: trials through the served path, on the bucket's
real or synthetic problems), the one dense baseline on the same problems
(``evaluation.measure.dense_baseline``: the fastest torch SDPA), the dense fallback's schedule
(a short study of the dense pipeline, logged under its own name) and where dense attention wins
(``crossover.measure_crossover``: ``dense_below``, which ``load()`` honours).

``run_tune`` is a library function: it reports progress through callbacks and returns what it
measured; ``twilightc tune`` draws the progress bars and prints the table. A bucket where no
schedule passed (no trial finished in time, every trial failed to compile or failed the gate)
gets no log entry — a log never names a schedule that was not measured correct — and
``TuneResult.failures`` says why; the CLI then exits non-zero.

Example::

    result = run_tune(cfg, log_root, meta={"date": "2026-11-30"})
    for rec in result.records:
        print(rec["bucket"], rec["latency_ms"], rec["dense_latency_ms"], rec["dense_below"])
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ...compiler.backend import get_backend
from ...errors import InputError
from ..evaluation.measure import dense_baseline
from ..serving.dense import dense_ir
from ..store.kernel_key import toolchain_stamps
from ..store.tuning_log import SHIPPED, find_schedule, shape_dict, user_root, write_entry
from .claims import counts, retried, tally
from .crossover import ladder, measure_crossover
from .storage import open_storage, redact, storage_exists
from .tuner import (
    TuneConfig,
    best_trial,
    bucket_problems,
    default_trial,
    study_name,
    tune_bucket,
)

__all__ = ["TuneProgress", "TuneResult", "previous_winners", "run_tune"]


@dataclass
class TuneProgress:
    """What a progress callback is told: the bucket, trials done of ``total``, the best so far
    (``phase`` "trials"), or crossover contexts measured of ``total`` (``phase`` "crossover")."""

    bucket: str
    done: int
    total: int
    best_ms: float | None
    phase: str = "trials"


@dataclass
class TuneResult:
    records: list[dict]  # one per bucket (written to the tuning log where a schedule passed)
    log_path: Path | None  # None when no bucket had a passing schedule: nothing was written
    space_size: int
    default: dict  # the space's default schedule (what "vs default" compares with)
    failures: dict[str, str]  # bucket name → why no schedule passed there


def run_tune(cfg: TuneConfig, log_root: Path, meta: dict, workers: int = 1,
             on_start: Callable[[str], None] | None = None,
             on_progress: Callable[[TuneProgress], None] | None = None,
             resume: bool = False) -> TuneResult:
    """Tune every bucket of ``cfg`` (resumable in ``cfg.storage``) and write the winners to a
    tuning log under ``log_root``; with ``cfg.dense_trials``, also tune the dense pipeline the
    winner falls back to (its own log) and measure where dense wins. ``on_start(summary)`` is
    called once with a line saying what is tuned; ``on_progress`` after every finished trial
    and crossover context. ``resume=True`` refuses to start a study afresh: the storage must
    hold one of the buckets' studies already."""
    backend = get_backend(cfg.backend)
    space = backend.space(cfg.pipeline, cfg.shape, cfg.target)
    if resume and storage_exists(cfg.storage) is False:
        raise InputError(f"--resume: there is no study storage at {redact(cfg.storage)} "
                         "(drop --resume to start one)")
    storage = open_storage(cfg.storage, Path(cfg.storage))
    if resume:
        _require_study(cfg, storage)
    cfg.warm_start = cfg.warm_start or previous_winners(cfg, log_root)
    dense_cfg = _dense_config(cfg, log_root)
    if on_start:
        on_start(f"tuning [bold]{cfg.pipeline.name}[/] ({cfg.pipeline.key()[:12]}) with "
                 f"{cfg.backend} on {cfg.device.name}: {len(cfg.buckets)} shape buckets × "
                 f"{cfg.trials} trials, space of {space.size():,} schedules, storage "
                 f"{redact(cfg.storage)}"
                 + (f"; then its dense fallback × {cfg.dense_trials} trials"
                    if dense_cfg and cfg.dense_trials else ""))
    records, dense_records, failures, start = [], [], {}, time.monotonic()
    for i, bucket in enumerate(cfg.buckets):
        left = None if cfg.timeout is None else max(
            1.0, (cfg.timeout - (time.monotonic() - start)) / (len(cfg.buckets) - i))
        problems = bucket_problems(cfg, bucket)  # trials, baseline and crossover share them
        study = _study(cfg, bucket, space, storage, left, workers, problems, on_progress)
        bases = [dense_baseline(prob, cfg.repeats) for prob in problems]
        rec = _record(cfg, bucket, study, space, problems, bases)
        if rec["schedule"] is None:
            failures[bucket.name] = why_none_passed(study, cfg)
        elif dense_cfg is not None:
            dense_schedule = None  # without trials: its logged schedule, else the default
            if cfg.dense_trials:
                dspace = backend.space(dense_cfg.pipeline, cfg.shape, cfg.target)
                dstudy = _study(dense_cfg, bucket, dspace, storage, None, workers, problems,
                                on_progress, "dense fallback")
                drec = _record(dense_cfg, bucket, dstudy, dspace, problems, bases)
                if drec["schedule"] is not None:
                    dense_records.append(drec)
                dense_schedule = drec["schedule"]
            rec |= _crossover(cfg, bucket, rec["schedule"], dense_schedule, problems,
                              bases[0].dtype, on_progress)
        records.append(rec | ({} if "dense_below" in rec else {"dense_below": 0}))
    passed = [r for r in records if r["schedule"] is not None]
    path = _write(cfg, log_root, meta, passed) if passed else None
    if dense_records:
        _write(dense_cfg, log_root, meta, dense_records)
    return TuneResult(records, path, space.size(), space.default(), failures)


def _dense_config(cfg: TuneConfig, log_root: Path) -> TuneConfig | None:
    """The tune of ``cfg``'s dense fallback (the dense pipeline with its attention), or None
    when ``cfg`` tunes a dense pipeline itself (nothing to fall back to)."""
    p = cfg.pipeline
    if p.select is None and not p.prune and not p.keep.sink + p.keep.window:
        return None
    dcfg = dataclasses.replace(cfg, pipeline=dense_ir(p), trials=cfg.dense_trials,
                               warm_start=[], dense_trials=0)
    dcfg.warm_start = previous_winners(dcfg, log_root)
    return dcfg


def _study(cfg, bucket, space, storage, left, workers, problems, on_progress, what=""):
    """One bucket's study, reporting progress under the bucket's name (and ``what``)."""
    name = f"{bucket.name} {what}".strip()

    def progress(study, trial):
        if on_progress:
            b = best_trial(study)
            on_progress(TuneProgress(name, tally(study)[0], cfg.trials,
                                     b.value if b else None))
    check = lambda s: get_backend(cfg.backend).check_schedule(  # noqa: E731
        cfg.pipeline, cfg.shape, s, cfg.device)
    study = tune_bucket(cfg, bucket, space, storage, check, left, progress,
                        workers=workers, problems=problems)
    progress(study, None)
    return study


def _write(cfg: TuneConfig, log_root: Path, meta: dict, records: list[dict]) -> Path:
    return write_entry(log_root, cfg.device.name, cfg.pipeline.name, {
        "pipeline_key": cfg.pipeline.key(), "backend": cfg.backend,
        "target": str(cfg.target), "shape": shape_dict(cfg.shape), "measured": True,
        "versions": {**toolchain_stamps(cfg.backend), "optuna": optuna.__version__},
        "storage": redact(cfg.storage), **meta, "buckets": records})


def _require_study(cfg: TuneConfig, storage) -> None:
    names = set(optuna.get_all_study_names(storage))
    if not any(study_name(cfg, b) in names for b in cfg.buckets):
        raise InputError(f"--resume: {redact(cfg.storage)} holds no study of this pipeline, "
                         f"device, backend and head layout (drop --resume to start one)")


def why_none_passed(study: optuna.Study, cfg: TuneConfig) -> str:
    """One line: why a study has no gate-passing trial (what a user changes next)."""
    every = study.get_trials(deepcopy=False)
    gone = retried(every)  # not the proposals that stepped back, nor a dead worker's trials
    trials = [t for t in every if counts(t, gone)]
    if not trials:
        if cfg.trials < 1:
            return "no trial ran (--trials is 0)"
        return ("no trial finished before the timeout" if cfg.timeout is not None
                else "no trial ran")
    kinds = {"did not compile or run": [t.user_attrs["error"] for t in trials
                                         if "error" in t.user_attrs],
             "failed the correctness gate": [t.user_attrs["gate"] for t in trials
                                             if t.user_attrs.get("gate", "pass") != "pass"],
             "are illegal on the device": [t.user_attrs["illegal"] for t in trials
                                           if "illegal" in t.user_attrs]}
    parts = [f"{len(v)} {k} (first: {v[0][:200]})" for k, v in kinds.items() if v]
    running = sum(t.state == TrialState.RUNNING for t in trials)
    if running:
        parts.append(f"{running} still running when this process stopped")
    return f"none of {len(trials)} trials passed: " + "; ".join(parts or ["no result"])


def previous_winners(cfg: TuneConfig, log_root: Path) -> list[dict]:
    """The winners earlier tunes logged for this pipeline, device, head layout and backend
    (this log root, the user's, the shipped ones): tried right after the default."""
    roots = list(dict.fromkeys([Path(log_root), user_root(), SHIPPED]))
    found = [find_schedule(cfg.pipeline, cfg.device.name, cfg.shape, b, cfg.backend, roots)
             for b in cfg.buckets]
    unique = {json.dumps(f[0]["schedule"], sort_keys=True): f[0]["schedule"]
              for f in found if f and f[0]["schedule"]}
    return list(unique.values())


def _record(cfg: TuneConfig, bucket, study, space, problems, bases) -> dict:
    best, dflt = best_trial(study), default_trial(study, space.default())
    trials = study.get_trials(deepcopy=False)
    gone = retried(trials)  # counted: what the budget paid for, not the proposals that stepped back
    states = [t.state.name for t in trials if counts(t, gone) and t.state != TrialState.RUNNING]
    rec = {"bucket": bucket.name, "batch": bucket.batch, "context": bucket.context,
           "data": cfg.describe_data(bucket), "timed": "DecodePipeline.plan once, run per step",
           "study": study.study_name, "trials": len(states),
           "failed": states.count("FAIL"), "pruned": states.count("PRUNED"),
           "schedule": best.params if best else None,
           "latency_ms": round(best.value, 4) if best else None,
           "default_latency_ms": round(dflt.value, 4) if dflt else None,
           "dense_latency_ms": round(sum(b.ms for b in bases), 4),
           "dense_baseline": ", ".join(dict.fromkeys(str(b) for b in bases))}
    if len(problems) > 1:
        rec["problems"] = [p.label for p in problems]
        if best:
            rec["problem_latency_ms"] = best.user_attrs.get("problem_ms")
        rec["problem_dense_latency_ms"] = [round(b.ms, 4) for b in bases]
    return rec


def _crossover(cfg: TuneConfig, bucket, schedule: dict, dense_schedule: dict | None,
               problems, baseline_dtype: str, on_progress) -> dict:
    """The tuning-log fields of where dense wins over ``schedule`` (``crossover``)."""
    contexts = ladder(bucket.context)

    def problems_at(c: int):
        return problems if c == bucket.context else bucket_problems(cfg, bucket, c)

    def on_point(c: int) -> None:
        if on_progress:
            on_progress(TuneProgress(bucket.name, contexts.index(c) + 1, len(contexts), None,
                                     "crossover"))
    cross = measure_crossover(cfg, schedule, contexts, problems_at, baseline_dtype,
                              cfg.repeats, on_point, dense_schedule=dense_schedule,
                              bucket=bucket)
    return cross.record()
