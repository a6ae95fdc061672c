"""The tune driver: every shape bucket of a :class:`TuneConfig`, then one tuning-log entry.

``run_tune`` is a library function: it reports progress through callbacks and returns what it
measured; ``twilightc tune`` draws the progress bars and prints the table. A bucket where no
schedule passed (no trial finished in time, every trial failed to compile or failed the gate)
gets no log entry — a log never names a schedule that was not measured correct — and
``TuneResult.failures`` says why; the CLI then exits non-zero.

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
from optuna.trial import TrialState

from ...compiler.backend import get_backend
from ...errors import InputError
from ..evaluation.measure import dense_baseline_ms
from ..store.kernel_key import toolchain_stamps
from ..store.tuning_log import SHIPPED, find_schedule, shape_dict, user_root, write_entry
from .claims import counts, retried, tally
from .storage import open_storage, redact, storage_exists
from .tuner import TuneConfig, best_trial, bucket_problem, default_trial, study_name, tune_bucket

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
    tuning log under ``log_root``. ``on_start(summary)`` is called once with a line saying what
    is tuned; ``on_progress`` after every finished trial. ``resume=True`` refuses to start a
    study afresh: the storage must hold one of the buckets' studies already."""
    backend = get_backend(cfg.backend)
    space = backend.space(cfg.pipeline, cfg.shape, cfg.target)
    if resume and storage_exists(cfg.storage) is False:
        raise InputError(f"--resume: there is no study storage at {redact(cfg.storage)} "
                         "(drop --resume to start one)")
    storage = open_storage(cfg.storage, Path(cfg.storage))
    if resume:
        _require_study(cfg, storage)
    check = lambda s: backend.check_schedule(cfg.pipeline, cfg.shape, s, cfg.device)  # noqa: E731
    cfg.warm_start = cfg.warm_start or previous_winners(cfg, log_root)
    if on_start:
        on_start(f"tuning [bold]{cfg.pipeline.name}[/] ({cfg.pipeline.key()[:12]}) with "
                 f"{cfg.backend} on {cfg.device.name}: {len(cfg.buckets)} shape buckets × "
                 f"{cfg.trials} trials, space of {space.size():,} schedules, storage "
                 f"{redact(cfg.storage)}")
    records, failures, start = [], {}, time.monotonic()
    for i, bucket in enumerate(cfg.buckets):
        left = None if cfg.timeout is None else max(
            1.0, (cfg.timeout - (time.monotonic() - start)) / (len(cfg.buckets) - i))

        def progress(study, trial, bucket=bucket):
            if on_progress:
                b = best_trial(study)
                on_progress(TuneProgress(bucket.name, tally(study)[0], cfg.trials,
                                         b.value if b else None))
        problem = bucket_problem(cfg, bucket)  # trials and the dense baseline share it
        study = tune_bucket(cfg, bucket, space, storage, check, left, progress,
                            workers=workers, problem=problem)
        progress(study, None)
        records.append(_record(cfg, bucket, study, space, problem))
        if records[-1]["schedule"] is None:
            failures[bucket.name] = why_none_passed(study, cfg)
    passed = [r for r in records if r["schedule"] is not None]
    path = None if not passed else write_entry(log_root, cfg.device.name, cfg.pipeline.name, {
        "pipeline_key": cfg.pipeline.key(), "backend": cfg.backend,
        "target": str(cfg.target), "shape": shape_dict(cfg.shape), "measured": True,
        "versions": {**toolchain_stamps(cfg.backend), "optuna": optuna.__version__},
        "storage": redact(cfg.storage), **meta, "buckets": passed})
    return TuneResult(records, path, space.size(), space.default(), failures)


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


def _record(cfg: TuneConfig, bucket, study, space, problem) -> dict:
    best, dflt = best_trial(study), default_trial(study, space.default())
    dense_ms, dense_what = dense_baseline_ms(problem, cfg.repeats)
    trials = study.get_trials(deepcopy=False)
    gone = retried(trials)  # counted: what the budget paid for, not the proposals that stepped back
    states = [t.state.name for t in trials if counts(t, gone) and t.state != TrialState.RUNNING]
    return {"bucket": bucket.name, "batch": bucket.batch, "context": bucket.context,
            "study": study.study_name, "trials": len(states),
            "failed": states.count("FAIL"), "pruned": states.count("PRUNED"),
            "schedule": best.params if best else None,
            "latency_ms": round(best.value, 4) if best else None,
            "default_latency_ms": round(dflt.value, 4) if dflt else None,
            "dense_latency_ms": round(dense_ms, 4), "dense_baseline": dense_what}
