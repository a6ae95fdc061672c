"""Drive a tune bucket by bucket with progress bars, then print and log the winners."""

from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..compiler.backend import get_backend
from ..runtime.kernel_key import toolchain_stamps
from ..runtime.measure import dense_baseline_ms
from ..runtime.tuning_log import SHIPPED, find_schedule, shape_dict, user_root, write_entry
from ..schedules.tuner import (
    TuneConfig,
    best_trial,
    bucket_problem,
    default_trial,
    open_storage,
    tune_bucket,
)


def run_tune(cfg: TuneConfig, log_root: Path, meta: dict, console: Console,
             workers: int = 1) -> list[dict]:
    backend = get_backend(cfg.backend)
    space = backend.space(cfg.pipeline, cfg.shape, cfg.target)
    storage = open_storage(cfg.storage, Path(cfg.storage))
    check = lambda s: backend.check_schedule(cfg.pipeline, cfg.shape, s, cfg.device)  # noqa: E731
    cfg.warm_start = cfg.warm_start or previous_winners(cfg, log_root)
    records, start = [], time.monotonic()
    console.print(f"tuning [bold]{cfg.pipeline.name}[/] ({cfg.pipeline.key()[:12]}) with "
                  f"{cfg.backend} on {cfg.device.name}: {len(cfg.buckets)} shape buckets × "
                  f"{cfg.trials} trials, space of {space.size()} schedules, storage {cfg.storage}")
    cols = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
            "{task.total}"), TextColumn("best {task.fields[best]}"), TimeElapsedColumn())
    with Progress(*cols, console=console) as bar:
        for i, bucket in enumerate(cfg.buckets):
            left = None if cfg.timeout is None else max(
                1.0, (cfg.timeout - (time.monotonic() - start)) / (len(cfg.buckets) - i))
            task = bar.add_task(bucket.name, total=cfg.trials, best="—")

            def progress(study, trial, task=task):
                b = best_trial(study)
                bar.update(task, completed=len(study.trials),
                           best=f"{b.value:.3f} ms" if b else "—")
            problem = bucket_problem(cfg, bucket)  # trials and the dense baseline share it
            study = tune_bucket(cfg, bucket, space, storage, check, left, progress,
                                workers=workers, problem=problem)
            progress(study, None)
            records.append(_record(cfg, bucket, study, space, problem))
    _print_table(console, records, space.default())
    path = write_entry(log_root, cfg.device.name, cfg.pipeline.name, {
        "pipeline_key": cfg.pipeline.key(), "backend": cfg.backend,
        "target": str(cfg.target), "shape": shape_dict(cfg.shape), "measured": True,
        "versions": {**toolchain_stamps(cfg.backend), "optuna": optuna.__version__}, "storage": cfg.storage, **meta,
        "buckets": records})
    console.print(f"tuning log: {path}")
    return records


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
    rec = {"bucket": bucket.name, "batch": bucket.batch, "context": bucket.context,
           "study": study.study_name, "trials": len(states),
           "failed": states.count("FAIL"), "pruned": states.count("PRUNED"),
           "schedule": best.params if best else None,
           "latency_ms": round(best.value, 4) if best else None,
           "default_latency_ms": round(dflt.value, 4) if dflt else None,
           "dense_latency_ms": round(dense_ms, 4), "dense_baseline": dense_what}
    return rec


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "—"


def _print_table(console: Console, records: list[dict], default: dict) -> None:
    table = Table("bucket", "best ms", "default ms", "dense ms", "vs default", "vs dense",
                  "trials (failed/pruned)", "winner: changes from the default schedule")
    for r in records:
        changes = {k: v for k, v in (r["schedule"] or {}).items() if default.get(k) != v}
        sched = ", ".join(f"{k}={v}" for k, v in changes.items()) if r["schedule"] else \
            "no schedule passed the gate"
        table.add_row(r["bucket"], str(r["latency_ms"]), str(r["default_latency_ms"]),
                      str(r["dense_latency_ms"]),
                      _ratio(r["default_latency_ms"], r["latency_ms"]),
                      _ratio(r["dense_latency_ms"], r["latency_ms"]),
                      f"{r['trials']} ({r['failed']}/{r['pruned']})", sched or "(the default)")
    console.print(table)
    for r in records:
        if r["schedule"] is not None and r["latency_ms"] == r["default_latency_ms"]:
            console.print(f"{r['bucket']}: the default schedule was already the best found.")
