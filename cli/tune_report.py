"""``twilightc tune``'s output: progress bars while ``run_tune`` works, then the winners."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import TwilightError
from ..runtime.tuning.driver import TuneProgress, run_tune
from ..runtime.tuning.tuner import TuneConfig


class NoPassingScheduleError(TwilightError):
    """A tuned bucket where no schedule passed: nothing was logged for it."""


def tune_and_report(cfg: TuneConfig, log_root: Path, meta: dict, console: Console,
                    workers: int = 1, resume: bool = False) -> list[dict]:
    cols = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
            "{task.total}"), TextColumn("best {task.fields[best]}"), TimeElapsedColumn())
    tasks: dict[str, int] = {}
    with Progress(*cols, console=console) as bar:
        def on_progress(p: TuneProgress) -> None:
            if p.bucket not in tasks:
                tasks[p.bucket] = bar.add_task(p.bucket, total=p.total, best="—")
            bar.update(tasks[p.bucket], completed=p.done,
                       best=f"{p.best_ms:.3f} ms" if p.best_ms is not None else "—")
        result = run_tune(cfg, log_root, meta, workers=workers, on_start=console.print,
                          on_progress=on_progress, resume=resume)
    _print_table(console, result.records, result.default)
    if result.log_path is not None:
        console.print(f"tuning log: {result.log_path}")
    if result.failures:
        lines = [f"{b}: {why}" for b, why in result.failures.items()]
        what = "nothing was logged" if result.log_path is None else \
            "those buckets were left out of the tuning log"
        raise NoPassingScheduleError(f"no schedule passed in {len(lines)} of "
                                     f"{len(result.records)} shape buckets ({what}):\n  "
                                     + "\n  ".join(lines))
    return result.records


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
