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
            name = p.bucket if p.phase == "trials" else f"{p.bucket} where dense wins"
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=p.total, best="—")
            bar.update(tasks[name], completed=p.done,
                       best=f"{p.best_ms:.3f} ms" if p.best_ms is not None else "—")
        result = run_tune(cfg, log_root, meta, workers=workers, on_start=console.print,
                          on_progress=on_progress, resume=resume)
    _print_table(console, result.records, result.default)
    for r in result.records:
        _print_dense(console, r)
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


def _dense_impl(kind: str) -> str:
    return "twilight's dense kernels" if kind == "kernels" else \
        f"torch SDPA {kind.partition(':')[2]} over the gathered pages"


def _print_dense(console: Console, r: dict) -> None:
    """What was measured on, what dense is, and where the loaded pipeline will run dense."""
    console.print(f"{r['bucket']}: measured on {r['data']}; dense = fastest of "
                  f"{r['dense_baseline']} (contiguous K/V, converted before timing)")
    below = r.get("dense_below", 0)
    if "dense_impl" not in r:
        return
    impl, cross = _dense_impl(r["dense_impl"]), r["crossover"]
    pairs = ", ".join(f"{c}: {s:.2f}/{d:.2f}" for c, s, d in zip(
        cross["contexts"], cross["sparse_ms"], cross[f"dense_ms[{r['dense_impl']}]"],
        strict=True))
    console.print(f"  pipeline vs {impl} (ms, context: pipeline/dense): {pairs}")
    if below == 0:
        console.print("  the pipeline is faster than dense attention at every context measured: "
                      "load() never falls back")
    else:
        console.print(f"  dense attention ({impl}) is faster below {below} tokens: load() runs "
                      "it there")
    for layer, n in (r.get("dense_below_layers") or {}).items():
        console.print(f"  layer {layer}: dense below {n} tokens" if n else
                      f"  layer {layer}: the pipeline wins at every context measured")


def _print_table(console: Console, records: list[dict], default: dict) -> None:
    table = Table("bucket", "best ms", "default ms", "served ms", "dense ms", "vs default",
                  "served vs dense", "dense below", "trials (failed/pruned)",
                  "winner: changes from the default schedule")
    for r in records:
        changes = {k: v for k, v in (r["schedule"] or {}).items() if default.get(k) != v}
        sched = ", ".join(f"{k}={v}" for k, v in changes.items()) if r["schedule"] else \
            "no schedule passed the gate"
        served = r.get("served_latency_ms", r["latency_ms"])
        table.add_row(r["bucket"], str(r["latency_ms"]), str(r["default_latency_ms"]),
                      str(served), str(r["dense_latency_ms"]),
                      _ratio(r["default_latency_ms"], r["latency_ms"]),
                      _ratio(r["dense_latency_ms"], served),
                      str(r.get("dense_below", "—")),
                      f"{r['trials']} ({r['failed']}/{r['pruned']})", sched or "(the default)")
    console.print(table)
    console.print("best: the winner alone · served: what twilight.load() runs (the winner, or "
                  "dense attention where measured faster) · dense: the fastest torch SDPA")
    for r in records:
        if r["schedule"] is not None and r["latency_ms"] == r["default_latency_ms"]:
            console.print(f"{r['bucket']}: the default schedule was already the best found.")
