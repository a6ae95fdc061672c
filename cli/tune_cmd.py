"""``twilightc tune``: search schedules for a pipeline on the device present."""

from __future__ import annotations

import argparse
import datetime
import os
import platform

from . import args

HELP = "tune a pipeline's schedules on this device with Optuna; write a tuning log"

DESCRIPTION = """\
Searches, for PIPELINE on the device present, the schedule of every stage (tile sizes, warps,
stages, split count, vector width, fusion choices, and the top-p search strategy with its
knobs) that is fastest on each shape bucket, without breaking correctness: every trial's
output is checked against the exact torch reference (and, for top-p, its kept estimated mass
against p) before it is timed; a failing or non-compiling schedule is recorded, never chosen.

Every trial is timed exactly as serving runs it (the DecodePipeline twilight.load returns:
plan once, run per step). With --snapshot the trials run on the snapshots' real queries, keys
and values (every layer, or the --layers chosen), as 'twilightc eval --backend' does, so the
two report the same figures for the same data; without, on a synthetic problem (peaked random
keys), and the tuning log says which.

After the trials, each bucket measures where dense attention is faster than the winner: at a
ladder of contexts (powers of two up to the bucket's), the winner against twilight's own dense
kernels (their schedule tuned first, --dense-trials) and torch SDPA over the same pages. The
context below which dense wins (per layer too, on snapshots) goes into the tuning log as
dense_below, and twilight.load()'s pipeline runs dense attention there, so a loaded pipeline is
never slower than dense where this was measured.

Every ratio is against the one dense baseline: the fastest torch SDPA over the same K/V among
float32, bfloat16 and float16 (and both GQA layouts), converted before the timing.

One Optuna study per shape bucket lives in real storage (a journal file under the data dir by
default), so a tune killed half way resumes where it stopped: finished trials are kept and not
rerun, and a trial cut off by the kill is run again. The default schedule and the previous
winners are tried first. The winners go to a tuning log, <log-dir>/<device>/<pipeline>.json,
which twilight.load() reads.
"""

EPILOG = """\
devices (--gpu): a100 h100 h200 l40s rtx4090 cpu auto
  Naming a device that is not present is an error that says what is present.

trials (--trials N): the study's total per shape bucket, shared by every process tuning it.
  Two machines started with --trials 8 on one --storage measure 8 schedules between them,
  never one schedule twice; rerunning a finished tune with a larger N adds the difference.

storage (--storage):
  PATH.journal             an Optuna journal file (default: $TWILIGHT_DATA_DIR/studies/...);
                           many processes on one machine (or a shared file system) may share it
  PATH.db | sqlite:///P    SQLite
  postgresql://user@host/db
                           PostgreSQL: start the same command on many machines with the
                           same URL and they tune one study together (pip install
                           'psycopg[binary]', or psycopg2-binary). Keep the password out of
                           the URL (PGPASSWORD or ~/.pgpass); a password in it is never
                           printed nor written to the tuning log, which shows user:***@host.

exit status:
  0 every shape bucket has a winner in the tuning log; 1 a bucket where no schedule passed
  (no trial finished in time, or every one failed): it gets no log entry, the error says why;
  2 a bad command line

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
                   help="any: the backend that serves the device (triton on a GPU, tvm on the "
                        "CPU; default: %(default)s); triton on the CPU runs only in Triton's "
                        "interpreter, with TRITON_INTERPRET=1 (slow: tiny shapes only)")
    p.add_argument("--shapes", default=None, metavar="BxT,...", type=args.buckets,
                   help="shape buckets, batch x context, each ≥ 1 (default: 1x4k,4x8k on "
                        "cpu; 8x16k,64x16k on a GPU)")
    p.add_argument("--head-shape", metavar="K=V,...", type=args.head_shape,
                   default=args.head_shape(DEFAULT_HEADS),
                   help=f"head layout: q_heads (a multiple of kv_heads), kv_heads, head_dim, "
                        f"dtype ({', '.join(args.SHAPE_DTYPES)}) (default: {DEFAULT_HEADS})")
    p.add_argument("--snapshot", nargs="+", default=None, metavar="FILE",
                   help="tune on the real attention of these snapshots (one head layout): "
                        "their head layout, dtype, shape buckets (queries × context) and data, "
                        "as 'twilightc eval --backend' runs them")
    p.add_argument("--layers", default=None, metavar="all|I,J,...",
                   help="with --snapshot: the layer slots to measure on (default: all of a "
                        "snapshot with up to 4, else 4 spread evenly)")
    p.add_argument("--trials", type=args.count(1), default=12, metavar="N",
                   help="trials per shape bucket, in all: processes sharing --storage share "
                        "them (default: %(default)s)")
    p.add_argument("--dense-trials", type=args.count(0), default=8, metavar="N",
                   help="trials per bucket for the dense fallback's schedule (the dense "
                        "pipeline with this one's attention; its own tuning log), before "
                        "measuring where dense wins; 0: its logged or default schedule "
                        "(default: %(default)s)")
    p.add_argument("--timeout", type=args.number(0), default=None, metavar="S",
                   help="stop after S seconds in all (default: none)")
    p.add_argument("--storage", default=None, metavar="URL", help="study storage (see below)")
    p.add_argument("--resume", action="store_true",
                   help="require an existing study to resume (studies always resume anyway)")
    p.add_argument("--sampler", default="tpe", choices=("tpe", "grid", "random"),
                   help="tpe (default), random, or grid: every schedule once, for spaces of at "
                        "most 100,000 (the TVM space; not the Triton one)")
    p.add_argument("--seed", type=args.count(0), default=0,
                   help="seeds the measured problem and, mixed with the process, the sampler")
    p.add_argument("--repeats", type=args.count(1), default=10,
                   help="timed runs per trial and problem (median), after as many untimed ones "
                        "(2 to 8) (default: %(default)s)")
    p.add_argument("--workers", type=args.count(1), default=1,
                   help="trials run at once in this process (compiles overlap; on the CPU "
                        "timings then disturb each other). Many machines: share --storage.")
    p.add_argument("--log-dir", default=None, metavar="DIR", type=args.out_dir,
                   help="tuning log root (default: $TWILIGHT_TUNING_LOGS)")
    p.set_defaults(run=run)


DEFAULT_HEADS = "q_heads=32,kv_heads=8,head_dim=128,dtype=float16"


def run(ns) -> int:
    from pathlib import Path

    from rich.console import Console

    from .. import knobs
    from ..compiler.backend import backend_for, get_backend
    from ..compiler.verify import verify
    from ..frontend.resolve import resolve_pipeline
    from ..runtime.evaluation.problems import snapshot_bucket
    from ..runtime.store.tuning_log import user_root
    from ..runtime.tuning.tuner import TuneConfig
    from ..schedules.devices import resolve_device
    from .tune_report import tune_and_report

    device = resolve_device(ns.gpu)
    pipe = resolve_pipeline(ns.pipeline)
    if not hasattr(pipe, "ir"):
        raise args.UsageError(f"--pipeline {ns.pipeline}: {pipe.name} needs calibrated "
                              f"channels to tune; pass them, e.g. '{pipe.name}(channels=...)'")
    shape = args.make_shape(ns.head_shape, pipe.ir.page_size)
    buckets, snapshots = ns.shapes, []
    if ns.snapshot:
        if buckets:
            raise args.UsageError("--shapes: with --snapshot the shape buckets are the "
                                  "snapshots' (queries × context)")
        pipe, shape, snapshots = _from_snapshots(ns.snapshot, pipe, ns.layers)
        buckets = list(dict.fromkeys(snapshot_bucket(s) for s, _ in snapshots))
    elif ns.layers:
        raise args.UsageError("--layers: only with --snapshot")
    if ns.backend == "any":  # the backend that serves this device (Triton on a GPU, TVM here)
        backend = backend_for(device)[0].name
    else:
        backend = get_backend(ns.backend).name
        args.require_runnable(get_backend(backend), device)
    buckets = buckets or args.buckets("1x4k,4x8k" if device.kind == "cpu" else "8x16k,64x16k")
    verify(pipe.ir, shape, stage="tune")
    default_store = Path(knobs.data_dir()) / "studies" / device.name / f"{pipe.name}.journal"
    cfg = TuneConfig(pipe.ir, shape, buckets, backend, device, trials=ns.trials,
                     timeout=ns.timeout, storage=ns.storage or str(default_store),
                     sampler=ns.sampler, seed=ns.seed, repeats=ns.repeats,
                     snapshots=snapshots, dense_trials=ns.dense_trials)
    _check_memory(cfg)
    if ns.sampler == "grid":
        _check_grid(cfg)
    root = args.writable_dir(ns.log_dir or user_root(),
                             "--log-dir" if ns.log_dir else "TWILIGHT_TUNING_LOGS")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host_cpu": platform.processor() or platform.machine(),
            "host_cores": os.cpu_count(),
            # timings on a busy machine are worth less: say how busy it was when tuning began
            "host_load_1min": round(os.getloadavg()[0], 2)}
    tune_and_report(cfg, root, meta, Console(width=max(Console().width, 120)),
                    workers=ns.workers, resume=ns.resume)
    return 0


def _from_snapshots(paths: list[str], pipe, layers: str | None):
    """The pipeline (with the model's softmax scale), head layout and (snapshot, layer slots)
    pairs of ``--snapshot``; the snapshots must share one head layout and dtype."""
    from ..compiler.ir import Shape
    from ..frontend.dsl import Pipeline
    from ..runtime.evaluation.evaluate import with_model_scale
    from ..runtime.evaluation.snapshot import load_snapshot
    from .eval_cmd import _parse_layers

    snaps = [load_snapshot(p) for p in paths]
    layouts = {(s.q.shape[2], s.k.shape[1], s.q.shape[3], s.q.dtype) for s in snaps}
    if len(layouts) > 1:
        raise args.UsageError(f"--snapshot: the snapshots differ in head layout or dtype "
                              f"{sorted(map(str, layouts))}; tune each layout on its own")
    hq, hkv, d, dtype = layouts.pop()
    shape = Shape(hq, hkv, d, pipe.ir.page_size, str(dtype).removeprefix("torch."))
    scales = {float(x) for s in snaps for x in s.scale.tolist()}
    if len(scales) == 1:  # as 'twilightc eval' will run it
        pipe = Pipeline.from_ir(with_model_scale(pipe.ir, scales.pop(), d))
    chosen = []
    for s in snaps:
        n = s.num_layers
        if layers in (None, "all"):
            idx = list(range(n)) if layers == "all" or n <= 4 else \
                sorted({round(j * (n - 1) / 3) for j in range(4)})
        else:
            idx = _parse_layers(layers, n)
        chosen.append((s, idx))
    return pipe, shape, chosen


def _check_grid(cfg) -> None:
    from ..compiler.backend import get_backend
    space = get_backend(cfg.backend).space(cfg.pipeline, cfg.shape, cfg.target)
    if space.size() > 100_000:
        raise args.UsageError(f"--sampler grid: the {cfg.backend} space has {space.size():,} "
                              "schedules, too many to try each; use tpe or random")


def _check_memory(cfg) -> None:
    """Refuse a shape bucket whose K/V alone would not fit the device, before allocating it."""
    import torch
    item = torch.empty((), dtype=getattr(torch, cfg.shape.dtype)).element_size()
    if cfg.device.kind == "cuda" and torch.cuda.is_available():
        have, where = torch.cuda.get_device_properties(0).total_memory, "the GPU's"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's"
    for b in cfg.buckets:
        need = 2 * b.batch * b.context * cfg.shape.kv_heads * cfg.shape.head_dim * item
        if need > have // 2:
            raise args.UsageError(f"--shapes {b.batch}x{b.context}: its K/V cache alone takes "
                                  f"{need / 2**30:.1f} GiB, more than half of {where} "
                                  f"{have / 2**30:.0f} GiB")
