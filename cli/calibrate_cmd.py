"""``twilightc calibrate``: choose a pipeline's key estimator for a model, on its snapshots."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .args import number

HELP = "pick the cheapest key estimator that keeps a pipeline's top-p faithful for a model"

DESCRIPTION = """\
Top-p is only as good as the attention weights it is computed from. This runs PIPELINE with
every key estimator on attention snapshots of one model — exact keys, and INT8/INT4/INT2 codes

  intN_token         per token over head_dim (Twilight's published estimator)
  intN_token_smooth  per token after dividing each key channel by its absolute maximum
                     (the query is multiplied back), so outlier channels set no token's range
  intN_page          per channel within a page, zero point and scale from the page's key
                     min/max (Quest's summary, shared with it)
  intN_group4        per channel within a group of 4 pages (a quarter of the side data)

and reports for each:

  fidelity  the true attention mass of the kept set relative to the candidates (mean, and
            the worst head), overall true mass, output error vs dense, kept tokens
  cost      bytes read per candidate token and KV head, and the estimate stage's latency on
            this device (compiled kernels)

It recommends the cheapest choice whose mean true mass is ≥ p − MEAN_DROP and whose worst head
is ≥ p − MIN_DROP, and writes it to $TWILIGHT_DATA_DIR/calibration/<model>.json, where
twilight.load(pipeline, ..., model=MODEL) uses it.
"""

EPILOG = """\
examples:
  twilightc calibrate --pipeline quest_twilight --snapshot smollm2_8k.npz smollm2_8k_b.npz
  twilightc calibrate --pipeline 'quest_twilight(p=0.95)' --snapshot s.npz --min-drop 0.1 --json
"""


def register(sub) -> None:
    p = sub.add_parser("calibrate", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, metavar="PIPELINE",
                   help="a pipeline with a top-p pruner (built-in, NAME(...), module:attr)")
    p.add_argument("--snapshot", required=True, nargs="+", metavar="FILE",
                   help="attention snapshots of the model (all of one model)")
    p.add_argument("--model", default=None,
                   help="the name to file the choice under (default: the snapshots' model)")
    p.add_argument("--layers", default=None, metavar="I,J,...",
                   help="only these layer slots of each snapshot (default: all)")
    p.add_argument("--mean-drop", type=number(0, strict=False), default=0.02, metavar="X",
                   help="mean true mass must be ≥ p - X (default: %(default)s)")
    p.add_argument("--min-drop", type=number(0, strict=False), default=0.2, metavar="X",
                   help="no head's true mass below p - X (default: %(default)s)")
    p.add_argument("--no-timing", action="store_true", help="skip the estimate-stage timing")
    p.add_argument("--no-write", action="store_true", help="report only; write no choice")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..errors import InputError
    from ..frontend.builtins import Calibrated
    from ..frontend.resolve import resolve_pipeline
    from ..runtime.evaluation.estimators import calibrate
    from ..runtime.evaluation.snapshot import load_snapshot
    from ..runtime.store.estimator_choice import write_choice
    from .eval_cmd import _parse_layers

    pipe = resolve_pipeline(args.pipeline)
    snaps = [load_snapshot(s) for s in args.snapshot]
    if isinstance(pipe, Calibrated):
        pipe = pipe.make(snaps[0].q[0].float(), snaps[0].k[0].float())
    model = args.model or snaps[0].model
    if not model:
        raise InputError("the snapshots name no model: pass --model NAME")
    layers = _parse_layers(args.layers, min(s.num_layers for s in snaps))
    try:
        choices, best = calibrate(pipe, snaps, args.mean_drop, args.min_drop, layers,
                                  time_estimate=not args.no_timing)
    except ValueError as e:
        raise InputError(str(e)) from None
    path = None if args.no_write or best is None else write_choice(
        model, pipe.ir, best, choices, [s.path for s in snaps])
    if args.json:
        json.dump({"model": model, "pipeline": pipe.ir.name, "recommended":
                   best and best.estimator, "written_to": path and str(path),
                   "choices": [dataclasses.asdict(c) for c in choices]}, sys.stdout, indent=1)
        print()
        return 0
    table = Table()
    table.add_column("estimator", no_wrap=True)
    for name in ("B/token", "true/cand mean", "true/cand min", "true mean", "err mean",
                 "kept", "estimate ms", "meets target"):
        table.add_column(name)
    for c in choices:
        table.add_row(c.estimator, f"{c.bytes_per_token:.0f}", f"{c.true_in_cand_mean:.3f}",
                      f"{c.true_in_cand_min:.3f}", f"{c.true_mass_mean:.3f}",
                      f"{c.rel_error_mean:.3f}", f"{c.kept_tokens_mean:.0f}",
                      "—" if c.estimate_ms is None else f"{c.estimate_ms:.3f}",
                      "yes" if c.meets_target else "no", style="bold" if c is best else None)
    out = Console(width=max(Console().width, 120))
    out.print(f"{pipe.ir.name} on {model} ({len(snaps)} snapshot(s))")
    out.print(table)
    out.print("B/token: bytes read per candidate token and KV head · true/cand: true attention "
              "mass of the kept set relative to the candidates · estimate ms: the estimate "
              "stage alone on this device (tuned schedule if logged, else the default)")
    if best is None:
        out.print("no estimator meets the target; loosen --mean-drop/--min-drop or raise p")
    else:
        out.print(f"recommended: {best.estimator} → {path}" if path else
                  f"recommended: {best.estimator} (not written: --no-write)")
    return 0
