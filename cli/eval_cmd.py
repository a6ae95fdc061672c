"""``twilightc eval``: fidelity of a pipeline against dense attention on a real snapshot."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

HELP = "measure a pipeline against dense attention on an attention snapshot"

DESCRIPTION = """\
Runs PIPELINE with the exact torch reference on every layer, query position and query head of
an attention snapshot captured from a real model (see scripts/capture_snapshot.py), and
compares it with dense attention on the same data.

Reported per layer and overall:
  kept tokens      mean and max tokens attended, absolute and as a fraction of the context
  est. mass        the pruner's estimated attention mass of the kept set (top-p pipelines)
  true mass        the exact attention mass of the kept set: what the estimate promises
  rel. L2 error    ||out - dense|| / ||dense|| of each head's output

A pipeline whose true mass falls far below its estimated mass is being fooled by its key
estimator (see 'Where the published estimator breaks' in ALGORITHMS.md).
"""

EPILOG = """\
json output (--json): one object with keys
  pipeline, pipeline_key, snapshot, model, context_max,
  overall: {kept_tokens_mean, kept_tokens_max, kept_fraction_mean, kept_fraction_max,
            est_mass_mean, est_mass_min, true_mass_mean, true_mass_min,
            rel_l2_error_mean, rel_l2_error_max, heads},
  layers: [{layer, <the same keys>}, ...]
est_mass_* are null for pipelines without a pruner.

examples:
  twilightc eval --pipeline quest_twilight --snapshot tests/fixtures/smollm2_2k.npz
  twilightc eval --pipeline 'quest_top_k(budget=256)' --snapshot snap.npz --json
  twilightc eval --pipeline ds_twilight --snapshot snap.npz --calibration other.npz
"""


def register(sub) -> None:
    p = sub.add_parser("eval", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, metavar="PIPELINE",
                   help="a built-in name, NAME(arg=value, ...), module:attr or file.py:attr")
    p.add_argument("--snapshot", required=True, metavar="FILE", help="an attention snapshot .npz")
    p.add_argument("--layers", metavar="I,J,...",
                   help="evaluate only these layer slots of the snapshot (0-based; default all)")
    p.add_argument("--calibration", metavar="FILE",
                   help="snapshot to calibrate Double Sparsity channels on (default: --snapshot)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..frontend.resolve import resolve_pipeline
    from ..runtime.evaluation import evaluate_snapshot
    from ..runtime.snapshot import load_snapshot

    pipeline = resolve_pipeline(args.pipeline)
    snap = load_snapshot(args.snapshot)
    calib = load_snapshot(args.calibration) if args.calibration else None
    layers = _parse_layers(args.layers, snap.num_layers)
    err = Console(stderr=True)
    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(f"eval {args.pipeline}", total=len(layers or range(snap.num_layers)))
        report = evaluate_snapshot(pipeline, snap, layers, calib,
                                   progress=lambda _: bar.advance(task))
    data = report.to_json()
    if args.json:
        json.dump(data, sys.stdout, indent=1)
        print()
    else:
        _print_tables(data, snap.describe())
    return 0


def _parse_layers(text: str | None, num_layers: int) -> list[int] | None:
    if not text:
        return None
    from ..frontend.errors import InputError
    try:
        idx = [int(x) for x in text.split(",")]
    except ValueError:
        raise InputError(f"--layers {text!r}: expected comma-separated integers") from None
    bad = [i for i in idx if not 0 <= i < num_layers]
    if bad:
        raise InputError(f"--layers: {bad} outside the snapshot's {num_layers} layer slots")
    return idx


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" if pct else f"{x:.4g}" if isinstance(x, float) else str(x)


def _print_tables(data: dict, description: str) -> None:
    out = Console()
    out.print(f"[bold]{data['pipeline']}[/] ({data['pipeline_key'][:12]}) on {description}")
    table = Table("layer", "kept mean", "kept max", "kept %", "est. mass mean/min",
                  "true mass mean/min", "rel. L2 err mean/max")
    rows = [(str(r["layer"]), r) for r in data["layers"]] + [("all", data["overall"])]
    for name, r in rows:
        table.add_row(name, _fmt(r["kept_tokens_mean"]), _fmt(r["kept_tokens_max"]),
                      _fmt(r["kept_fraction_mean"], True),
                      f"{_fmt(r['est_mass_mean'])} / {_fmt(r['est_mass_min'])}",
                      f"{_fmt(r['true_mass_mean'])} / {_fmt(r['true_mass_min'])}",
                      f"{_fmt(r['rel_l2_error_mean'])} / {_fmt(r['rel_l2_error_max'])}",
                      end_section=name == rows[-2][0])
    out.print(table)
