"""``twilightc tune``: search schedules for a pipeline on the device present."""

from __future__ import annotations

import argparse
import datetime
import os
import platform

HELP = "tune a pipeline's schedules on this device with Optuna; write a tuning log"

DESCRIPTION = """\
Searches, for PIPELINE on the device present, the schedule of every stage (tile sizes, warps,
stages, split count, vector width, fusion choices, and the top-p search strategy with its
knobs) that is fastest on each shape bucket, without breaking correctness: every trial's
output is checked against the exact torch reference (and, for top-p, its kept estimated mass
against p) before it is timed; a failing or non-compiling schedule is recorded, never chosen.

One Optuna study per shape bucket lives in real storage (a journal file under the data dir by
default), so a tune killed half way resumes where it stopped: finished trials are kept and not
rerun, and a trial cut off by the kill is run again. The default schedule and the previous
winners are tried first. The winners go to a tuning log, <log-dir>/<device>/<pipeline>.json,
which twilight.load() reads.
"""

EPILOG = """\
devices (--gpu): a100 h100 h200 l40s rtx4090 cpu auto
  Naming a device that is not present is an error that says what is present.

storage (--storage):
  PATH.journal             an Optuna journal file (default: $TWILIGHT_DATA_DIR/studies/...)
  PATH.db | sqlite:///P    SQLite
  postgresql://user:pw@host/db
                           PostgreSQL: start the same command on many machines with the
                           same URL and they tune one study together (pip install psycopg2)

examples:
  twilightc tune --gpu cpu
  twilightc tune --gpu auto --pipeline 'quest_twilight(p=0.9)' --shapes 1x4k,4x16k --trials 40
  twilightc tune --gpu h100 --backend triton --storage postgresql://tw@db/tune --timeout 3600
  twilightc tune --gpu cpu --log-dir tuning_logs      # write into the shipped logs
  twilightc tune --gpu auto --snapshot tests/fixtures/smollm2_2k.npz   # then:
  twilightc eval --pipeline quest_twilight --snapshot tests/fixtures/smollm2_2k.npz --backend auto
"""


def register(sub) -> None:
    p = sub.add_parser("tune", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", required=True, metavar="DEVICE",
                   help="a100, h100, h200, l40s, rtx4090, cpu or auto")
    p.add_argument("--pipeline", default="quest_twilight", metavar="PIPELINE",
                   help="built-in name, NAME(arg=value), module:attr (default: %(default)s)")
    p.add_argument("--backend", default="any", choices=("any", "triton", "tvm"),
                   help="any: the backend that serves the device (triton on a GPU, tvm on the CPU; "
                        "default: %(default)s)")
    p.add_argument("--shapes", default=None, metavar="BxT,...",
                   help="shape buckets, batch x context (default: 1x4k,4x8k on cpu; "
                        "8x16k,64x16k on a GPU)")
    p.add_argument("--head-shape", default="q_heads=32,kv_heads=8,head_dim=128,dtype=float16",
                   metavar="K=V,...", help="head layout (default: %(default)s)")
    p.add_argument("--snapshot", default=None, metavar="FILE",
                   help="take the head layout, dtype and shape bucket (queries × context) from "
                        "an attention snapshot, to tune for what 'twilightc eval --backend' runs")
    p.add_argument("--trials", type=int, default=12, help="trials per shape bucket "
                   "(default: %(default)s)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop after S seconds in all (default: none)")
    p.add_argument("--storage", default=None, metavar="URL", help="study storage (see below)")
    p.add_argument("--resume", action="store_true",
                   help="require an existing study to resume (studies always resume anyway)")
    p.add_argument("--sampler", default="tpe", choices=("tpe", "grid", "random"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=10, help="timed runs per trial (median)")
    p.add_argument("--workers", type=int, default=1,
                   help="trials run at once in this process (compiles overlap; on the CPU "
                        "timings then disturb each other). Many machines: share --storage.")
    p.add_argument("--log-dir", default=None, metavar="DIR",
                   help="tuning log root (default: $TWILIGHT_TUNING_LOGS)")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from rich.console import Console

    from .. import knobs
    from ..compiler.backend import backend_for
    from ..errors import InputError
    from ..frontend.resolve import resolve_pipeline
    from ..runtime.store.tuning_log import ShapeBucket, user_root
    from ..runtime.tuning.tuner import TuneConfig
    from ..schedules.devices import DeviceError, resolve_device
    from .compile_cmd import parse_shape
    from .tune_report import tune_and_report

    try:
        device = resolve_device(args.gpu)
    except DeviceError as e:
        raise InputError(str(e)) from None
    pipe = resolve_pipeline(args.pipeline)
    shape = parse_shape(args.head_shape, pipe.ir.page_size)
    if args.snapshot:
        from ..compiler.ir import Shape
        from ..runtime.evaluation.snapshot import load_snapshot
        snap = load_snapshot(args.snapshot)
        _, nq, hq, d = snap.q.shape
        shape = Shape(hq, snap.k.shape[1], d, pipe.ir.page_size,
                      str(snap.q.dtype).removeprefix("torch."))
        if len(set(snap.scale.tolist())) == 1:  # as 'twilightc eval' will run it
            from ..frontend.dsl import Pipeline
            from ..runtime.evaluation.evaluate import with_model_scale
            pipe = Pipeline.from_ir(with_model_scale(pipe.ir, float(snap.scale[0]), d))
        args.shapes = args.shapes or f"{nq}x{int(snap.q_pos.max()) + 1}"
    try:  # "any": the backend that serves this device (Triton on a GPU, TVM on the CPU)
        backend = backend_for(device, None if args.backend == "any" else [args.backend])[0].name
    except KeyError as e:
        raise InputError(f"--backend {args.backend}: {e.args[0]}") from None
    shapes = args.shapes or ("1x4k,4x8k" if device.kind == "cpu" else "8x16k,64x16k")
    try:
        buckets = [ShapeBucket.parse(s) for s in shapes.split(",")]
    except ValueError as e:
        raise InputError(str(e)) from None
    default_store = Path(knobs.data_dir()) / "studies" / device.name / f"{pipe.name}.journal"
    if args.resume and not args.storage and not default_store.exists():
        raise InputError(f"--resume: no study to resume at {default_store}")
    cfg = TuneConfig(pipe.ir, shape, buckets, backend, device, trials=args.trials,
                     timeout=args.timeout, storage=args.storage or str(default_store),
                     sampler=args.sampler, seed=args.seed, repeats=args.repeats)
    root = Path(args.log_dir) if args.log_dir else user_root()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host_cpu": platform.processor() or platform.machine(),
            "host_cores": os.cpu_count(),
            # timings on a busy machine are worth less: say how busy it was when tuning began
            "host_load_1min": round(os.getloadavg()[0], 2)}
    tune_and_report(cfg, root, meta, Console(width=max(Console().width, 120)),
                    workers=args.workers)
    return 0
