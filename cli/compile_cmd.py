"""``twilightc compile``: lower a pipeline with one backend and dump every intermediate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import args

HELP = "lower a pipeline to kernels and dump the generated code"

DESCRIPTION = """\
Lowers PIPELINE for one problem shape with one backend and target, and writes every
intermediate to --dump DIR:

  DIR/ir.json                  the pipeline IR (canonical JSON; its sha256 is the pipeline key)
  DIR/<stage>/<kernel>.<ext>   per kernel: the generated source (Triton .py, TVMScript .tir)
                               and what the toolchain made of it (ttir, ttgir, llir, ptx, cubin
                               for Triton on cuda; lowered TIR and llvm or cuda source for TVM)
  DIR/resources.json           per kernel: registers, spills, shared memory where known

No GPU is needed: for cuda targets Triton compiles ahead of time (ptx, cubin; registers and
spills read with cuobjdump) and TVM emits CUDA source, which nvcc compiles to a cubin when the
machine has it (registers, spills and shared memory from ptxas -v).

The shape's page size is the pipeline's own (tw.Pipeline(..., page_size=N)); --shape sets the
head layout and dtype. A dict of pipelines in a file is addressed by key:
'file.py:pipelines[name]'.
"""

EPILOG = """\
examples:
  twilightc compile --pipeline quest_twilight --backend triton --target cuda:sm_90 --dump out/
  twilightc compile --pipeline 'quest_top_k(budget=512)' --backend tvm --target llvm \\
      --shape q_heads=32,kv_heads=8,head_dim=128 --dump out/
  twilightc compile --pipeline quest_twilight --backend tvm --target cuda:sm_80 \\
      --schedule '{"top_p_strategy": "radix"}' --dump out/
  twilightc compile --pipeline 'my_selectors.py:pipelines[loki]' --backend tvm --target llvm \\
      --shape q_heads=9,kv_heads=3,head_dim=64 --dump out/
"""


def register(sub) -> None:
    p = sub.add_parser("compile", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, metavar="PIPELINE",
                   help="a built-in name, NAME(arg=value, ...), module:attr or file.py:attr "
                   "(attr[key] for a dict of pipelines)")
    p.add_argument("--backend", required=True, choices=("triton", "tvm"))
    p.add_argument("--target", required=True, metavar="TARGET", type=args.target,
                   help="cuda:sm_80, cuda:sm_90, llvm (CPU) or interpret (Triton interpreter)")
    p.add_argument("--shape", metavar="K=V,...", type=args.head_shape,
                   default=args.head_shape(DEFAULT_SHAPE),
                   help=f"q_heads (a multiple of kv_heads), kv_heads, head_dim, dtype "
                        f"({', '.join(args.SHAPE_DTYPES)}) (default: {DEFAULT_SHAPE}); the "
                        "page size is the pipeline's")
    p.add_argument("--schedule", default={}, metavar="JSON", type=args.schedule_json,
                   help="schedule parameters as a JSON object (missing ones take defaults; "
                        "an unknown name or value is an error that lists the allowed ones)")
    p.add_argument("--dump", required=True, metavar="DIR", type=args.out_dir,
                   help="directory to write the intermediates to (created)")
    p.set_defaults(run=run)


DEFAULT_SHAPE = "q_heads=32,kv_heads=8,head_dim=128,dtype=float16"


def run(ns) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..compiler.backend import get_backend
    from ..compiler.ir import canonical_json
    from ..compiler.verify import verify
    from ..errors import StructureError
    from ..frontend.builtins import Calibrated
    from ..frontend.resolve import resolve_pipeline

    pipe = resolve_pipeline(ns.pipeline)
    if isinstance(pipe, Calibrated):
        raise StructureError(f"{pipe.name} needs calibrated channels to compile; pass them, "
                             f"e.g. '{pipe.name}(channels=[[...], ...])'")
    given = ns.shape.get("page_size", pipe.ir.page_size)
    if given != pipe.ir.page_size:
        raise args.UsageError(f"--shape page_size={given}: the pipeline is built for "
                              f"page_size={pipe.ir.page_size}; drop page_size from --shape (it "
                              "follows the pipeline), or build the pipeline with the page size "
                              "you want (tw.Pipeline(..., page_size=N))")
    shape = args.make_shape(ns.shape, pipe.ir.page_size)
    verify(pipe.ir, shape)
    backend = get_backend(ns.backend)
    if not backend.supports(ns.target):
        raise args.UsageError(f"--target {ns.target}: backend {ns.backend} does not support "
                              "it")
    schedule = args.check_schedule(ns.schedule, backend.space(pipe.ir, shape, ns.target))
    compiled = backend.lower(pipe.ir, shape, schedule, ns.target)

    ns.dump.mkdir(parents=True, exist_ok=True)
    (ns.dump / "ir.json").write_text(canonical_json(pipe.ir))
    resources = write_artifacts(backend.dump_artifacts(compiled, ns.target), ns.dump,
                                source_ext=getattr(backend, "source_ext", "src"))
    (ns.dump / "resources.json").write_text(json.dumps(resources, indent=1))
    table = Table("stage", "kernel", "files", "registers", "spills", "shared bytes")
    for r in resources:
        exts = " ".join(f.removeprefix(r["name"] + ".") for f in r["files"])
        table.add_row(r["stage"], r["name"], exts, *(
            str(r["metadata"].get(k, "—")) for k in ("registers", "spills", "shared")))
    Console(width=max(Console().width, 110)).print(table)
    Console().print(f"wrote {len(resources)} kernels to {ns.dump}")
    return 0


def write_artifacts(artifacts, root: Path, source_ext: str = "src") -> list[dict]:
    out = []
    for a in artifacts:
        folder = root / a.stage
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for ext, data in {source_ext: a.source, **a.files}.items():
            path = folder / f"{a.name}.{ext}"
            if isinstance(data, bytes):
                path.write_bytes(data)
            else:
                path.write_text(str(data))
            names.append(path.name)
        out.append({"stage": a.stage, "name": a.name, "files": names,
                    "metadata": {k: v for k, v in a.metadata.items()
                                 if isinstance(v, int | float | str | bool)}})
    return out
