"""``twilightc logs show|plot``: read tuning logs and draw their history."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "show tuning logs, or plot tuning history and best latency per shape"

DESCRIPTION = """\
Tuning logs hold the winning schedule of every shape bucket that 'twilightc tune' measured,
with its latency, the default schedule's and the dense baseline's. User logs
($TWILIGHT_TUNING_LOGS) take precedence over those shipped with twilight.

  show   print every log entry (filter by --device and --pipeline)
  plot   draw, to a PNG, each bucket's tuning history (latency of every trial and the best so
         far, read back from the Optuna study) and the best latency per shape bucket against
         the default schedule and dense attention
"""

EPILOG = """\
examples:
  twilightc logs show
  twilightc logs show --device cpu --pipeline quest_twilight
  twilightc logs plot --device cpu --pipeline quest_twilight --out tuning.png
"""


def register(sub) -> None:
    p = sub.add_parser("logs", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("show", "plot"))
    p.add_argument("--device", default=None, help="only this device's logs")
    p.add_argument("--pipeline", default=None, help="only this pipeline's logs (its name)")
    p.add_argument("--root", action="append", default=None, metavar="DIR",
                   help="log roots to read (default: user logs, then shipped ones)")
    p.add_argument("--out", default="tuning.png", type=Path, help="PNG to write (plot)")
    p.set_defaults(run=run)


def _entries(args):
    """``(path, log, entry)`` of every well-formed entry; a damaged log or entry is skipped
    with a warning (it names the file)."""
    from ..runtime.store.tuning_log import SHIPPED, entries, read_log_or_warn, user_root
    roots = [Path(r) for r in args.root] if args.root else [user_root(), SHIPPED]
    for root in roots:
        for path in sorted(Path(root).glob("*/*.json")):
            data = read_log_or_warn(path)
            if data is None:
                continue
            if args.device and data.get("device") != args.device:
                continue
            if args.pipeline and data.get("pipeline") != args.pipeline:
                continue
            for entry in entries(data, path):
                yield path, data, entry


def run(args) -> int:
    entries = list(_entries(args))
    if not entries:
        from ..errors import InputError
        raise InputError("no tuning logs match (try 'twilightc logs show' without filters)")
    return _show(entries) if args.action == "show" else _plot(entries, args.out)


def _show(entries) -> int:
    from rich.console import Console
    from rich.table import Table
    table = Table("device", "pipeline", "key", "backend", "heads×dim", "bucket", "best ms",
                  "default ms", "dense ms", "trials", "schedule", "date")
    for _path, data, e in entries:
        s = e["shape"]
        for r in e["buckets"]:
            table.add_row(str(data.get("device", "?")) + ("" if e.get("measured", True)
                                                          else " (model)"),
                          str(data.get("pipeline", "?")), e["pipeline_key"][:10], e["backend"],
                          f"{s.get('q_heads', '?')}/{s.get('kv_heads', '?')}×"
                          f"{s.get('head_dim', '?')}",
                          r.get("bucket", f"b{r['batch']}_t{r['context']}"),
                          *(str(r.get(k, "—")) for k in ("latency_ms", "default_latency_ms",
                                                         "dense_latency_ms", "trials")),
                          ", ".join(f"{k}={v}" for k, v in r["schedule"].items()),
                          str(e.get("date", ""))[:10])
    Console(width=max(Console().width, 180)).print(table)
    return 0


def _plot(entries, out: Path) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    from ..runtime.tuning.storage import open_storage, storage_exists
    buckets = [(data, e, r) for _p, data, e in entries for r in e["buckets"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    hist, bars = axes
    for data, e, r in buckets:
        label = f"{data.get('pipeline', '?')} {r.get('bucket', '?')}"
        spec = str(e.get("storage") or "")
        if not spec or storage_exists(spec) is False:
            continue  # the study stayed on the machine that tuned (or was deleted)
        try:
            study = optuna.load_study(study_name=r["study"], storage=open_storage(spec, None))
        except Exception:  # a server out of reach, a password kept out of the log, ...
            continue
        done = [t for t in study.trials if t.value is not None]
        xs = [t.number for t in done]
        ys = [t.value for t in done]
        best = [min(ys[: i + 1]) for i in range(len(ys))]
        line = hist.plot(xs, best, drawstyle="steps-post", label=f"{label} best")[0]
        hist.scatter(xs, ys, s=12, alpha=0.5, color=line.get_color())
    hist.set(xlabel="trial", ylabel="latency (ms)", title="tuning history", yscale="log")
    hist.legend(fontsize=7)
    names = [f"{d.get('pipeline', '?')}\n{r.get('bucket', '?')}" for d, _e, r in buckets]
    xs = range(len(buckets))
    for off, key, label in ((-0.27, "latency_ms", "tuned"), (0.0, "default_latency_ms",
                                                            "default schedule"),
                            (0.27, "dense_latency_ms", "dense (fastest torch SDPA)")):
        bars.bar([x + off for x in xs], [r.get(key) or 0 for _d, _e, r in buckets], width=0.27,
                 label=label)
    bars.set_xticks(list(xs), names, fontsize=7)
    bars.set(ylabel="latency (ms)", title=f"best latency per shape ({buckets[0][0].get('device', '?')})",
             yscale="log")
    bars.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0
