"""``twilightc eval``: fidelity of a pipeline against dense attention on a real snapshot."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .args import count

HELP = "measure a pipeline against dense attention on an attention snapshot"

DESCRIPTION = """\
Runs PIPELINE with the exact torch reference on every layer, query position and query head of
an attention snapshot captured from a real model (see scripts/capture_snapshot.py), and
compares it with dense attention on the same data.

Reported per layer and overall:
  kept tokens      mean and max tokens attended, absolute and as a fraction of the context
  est. mass        the pruner's estimated attention mass of the kept set (top-p pipelines)
  true mass        the exact attention mass of the kept set: what the estimate promises
  true in cand.    the same, relative to the selector's candidates (the pruner's fidelity)
  rank agreement   Spearman correlation of estimated and exact weights over the candidates
  rel. L2 error    ||out - dense|| / ||dense|| of each head's output

A pipeline whose true mass falls far below its estimated mass is being fooled by its key
estimator (see 'Where the published estimator breaks' in ALGORITHMS.md); compare estimators
with 'twilightc calibrate', or declare one in the pipeline (tw.quantized_keys(bits, granularity)).
"""

EPILOG = """\
json output (--json): one object with keys
  pipeline, pipeline_key, snapshot, model, context_max,
  overall: {kept_tokens_mean, kept_tokens_max, kept_fraction_mean, kept_fraction_max,
            est_mass_mean, est_mass_min, true_mass_mean, true_mass_min,
            true_mass_in_candidates_mean, true_mass_in_candidates_min,
            rank_agreement_mean, rank_agreement_min,
            rel_l2_error_mean, rel_l2_error_max, heads},
  layers: [{layer, <the same keys>}, ...]
est_mass_* and rank_agreement_* are null for pipelines without a pruner. With --backend,
also: backend, schedule_source, and per layer and overall latency_ms (the compiled step),
dense_latency_ms (the fastest torch SDPA over the same K/V, among float32, bfloat16 and
float16, converted before the timing: dense_baseline says which) and speedup_vs_dense, and per
layer path: "sparse", or the dense fallback the tuning log measured faster there.

examples:
  twilightc eval --pipeline quest_twilight --snapshot tests/fixtures/smollm2_2k.npz
  twilightc eval --pipeline 'quest_top_k(budget=256)' --snapshot snap.npz --json
  twilightc eval --pipeline ds_twilight --snapshot snap.npz --calibration other.npz
  twilightc eval --pipeline quest_twilight --snapshot snap.npz --backend auto
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
    p.add_argument("--backend", default="reference", choices=("reference", "auto", "tvm",
                                                                "triton"),
                   help="run the torch reference (default), or the compiled kernels through "
                        "twilight.load — tuned schedule, kernel cache — and time each layer's "
                        "step against the fastest torch SDPA (auto: triton on a GPU, tvm on "
                        "the CPU)")
    p.add_argument("--repeats", type=count(1), default=10,
                   help="timed runs per layer (--backend; median), after as many untimed "
                        "ones (2 to 8) (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..frontend.resolve import resolve_pipeline
    from ..runtime.evaluation.evaluate import evaluate_snapshot
    from ..runtime.evaluation.snapshot import load_snapshot

    pipeline = resolve_pipeline(args.pipeline)
    snap = load_snapshot(args.snapshot)
    calib = load_snapshot(args.calibration) if args.calibration else None
    layers = _parse_layers(args.layers, snap.num_layers)
    err = Console(stderr=True)
    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(f"eval {args.pipeline}", total=len(layers or range(snap.num_layers)))
        backend = None if args.backend == "reference" else args.backend
        report = evaluate_snapshot(pipeline, snap, layers, calib,
                                   progress=lambda _: bar.advance(task), backend=backend,
                                   repeats=args.repeats)
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
    from ..errors import InputError
    try:
        idx = [int(x) for x in text.split(",")]
    except ValueError:
        raise InputError(f"--layers {text!r}: expected comma-separated integers") from None
    bad = [i for i in idx if not 0 <= i < num_layers]
    if bad:
        raise InputError(f"--layers: {bad} outside the snapshot's {num_layers} layer slots")
    return idx


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


COLUMNS = (("kept", "kept_tokens_mean", 1), ("max", "kept_tokens_max", 0),
           ("kept%", "kept_fraction_mean", None), ("est", "est_mass_mean", 3),
           ("est min", "est_mass_min", 3), ("true", "true_mass_mean", 3),
           ("true min", "true_mass_min", 3), ("in-cand min", "true_mass_in_candidates_min", 3),
           ("rank", "rank_agreement_mean", 3), ("err", "rel_l2_error_mean", 3),
           ("err max", "rel_l2_error_max", 3))


def _print_tables(data: dict, description: str) -> None:
    out = Console(width=max(Console().width, 110))
    out.print(f"[bold]{data['pipeline']}[/] ({data['pipeline_key'][:12]}) on {description}")
    table = Table("layer", *(c[0] for c in COLUMNS))
    rows = [(str(r["layer"]), r) for r in data["layers"]] + [("all", data["overall"])]
    for name, r in rows:
        cells = [f"{100 * r[key]:.1f}%" if d is None else _fmt(r[key], d)
                 for _h, key, d in COLUMNS]
        table.add_row(name, *cells, end_section=name == rows[-2][0])
    out.print(table)
    o = data["overall"]
    if "latency_ms" in o:
        for r in data["layers"]:
            out.print(f"  layer {r['layer']}: {r['latency_ms']:.2f} ms vs {r['dense_latency_ms']:.2f}"
                      f" ms dense → {r['speedup_vs_dense']:.2f}x, ran {r['path']}")
        out.print(f"compiled kernels ({data.get('schedule_source', '?')}): "
                  f"{o['latency_ms']:.2f} ms per step over {len(data['layers'])} layers vs "
                  f"{o['dense_latency_ms']:.2f} ms dense ({data['dense_baseline']}) → "
                  f"{o['speedup_vs_dense']:.2f}x")
    out.print("kept: tokens attended · est: estimated mass of the kept set · true: its exact "
              "attention mass · in-cand: true mass relative to the candidates · rank: Spearman "
              "of estimated vs exact weights · err: relative L2 error of the output vs dense")
