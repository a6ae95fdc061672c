"""``twilightc compile``: lower a pipeline with one backend and dump every intermediate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "lower a pipeline to kernels and dump the generated code"

DESCRIPTION = """\
Lowers PIPELINE for one problem shape with one backend and target, and writes every
intermediate to --dump DIR:

  DIR/ir.json                  the pipeline IR (canonical JSON; its sha256 is the pipeline key)
  DIR/<stage>/<kernel>.<ext>   per kernel: the generated source (Triton .py, TVMScript .tir)
                               and what the toolchain made of it (ttir, ttgir, llir, ptx, cubin
                               for Triton on cuda; lowered TIR and llvm or cuda source for TVM)
  DIR/resources.json           per kernel: registers, spills, shared memory where known

No GPU is needed: for cuda targets Triton compiles ahead of time and TVM emits CUDA source
(compiled to a cubin by nvcc when present).
"""

EPILOG = """\
examples:
  twilightc compile --pipeline quest_twilight --backend triton --target cuda:sm_90 --dump out/
  twilightc compile --pipeline 'quest_top_k(budget=512)' --backend tvm --target llvm \\
      --shape q_heads=32,kv_heads=8,head_dim=128 --dump out/
  twilightc compile --pipeline quest_twilight --backend tvm --target cuda:sm_80 \\
      --schedule '{"top_p_strategy": "radix"}' --dump out/
"""


def register(sub) -> None:
    p = sub.add_parser("compile", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, metavar="PIPELINE",
                   help="a built-in name, NAME(arg=value, ...), module:attr or file.py:attr")
    p.add_argument("--backend", required=True, choices=("triton", "tvm"))
    p.add_argument("--target", required=True, metavar="TARGET",
                   help="cuda:sm_80, cuda:sm_90, llvm (CPU) or interpret (Triton interpreter)")
    p.add_argument("--shape", default="q_heads=32,kv_heads=8,head_dim=128,page_size=16,"
                   "dtype=float16", metavar="K=V,...",
                   help="q_heads, kv_heads, head_dim, page_size, dtype (default: %(default)s)")
    p.add_argument("--schedule", default="{}", metavar="JSON",
                   help="schedule parameters as a JSON object (missing ones take defaults)")
    p.add_argument("--dump", required=True, metavar="DIR", type=Path,
                   help="directory to write the intermediates to (created)")
    p.set_defaults(run=run)


def parse_shape(text: str, page_size: int):
    from ..compiler.ir import Shape
    from ..errors import InputError
    fields = {"page_size": page_size}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in ("q_heads", "kv_heads", "head_dim", "page_size", "dtype"):
            raise InputError(f"--shape: unknown field {name!r}")
        fields[name] = value if name == "dtype" else int(value)
    try:
        return Shape(**fields)
    except TypeError as e:
        raise InputError(f"--shape {text!r}: {e}") from None


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..compiler.backend import Target, get_backend
    from ..compiler.ir import canonical_json
    from ..compiler.verify import verify
    from ..errors import InputError, StructureError
    from ..frontend.builtins import Calibrated
    from ..frontend.resolve import resolve_pipeline

    pipe = resolve_pipeline(args.pipeline)
    if isinstance(pipe, Calibrated):
        raise StructureError(f"{pipe.name} needs calibrated channels to compile; pass them, "
                             f"e.g. '{pipe.name}(channels=[[...], ...])'")
    shape = parse_shape(args.shape, pipe.ir.page_size)
    verify(pipe.ir, shape)
    try:
        schedule = json.loads(args.schedule)
        target = Target.parse(args.target)
    except (ValueError, json.JSONDecodeError) as e:
        raise InputError(str(e)) from None
    backend = get_backend(args.backend)
    if not backend.supports(target):
        raise InputError(f"backend {args.backend} does not support target {target}")
    compiled = backend.lower(pipe.ir, shape, schedule, target)

    args.dump.mkdir(parents=True, exist_ok=True)
    (args.dump / "ir.json").write_text(canonical_json(pipe.ir))
    resources = write_artifacts(backend.dump_artifacts(compiled, target), args.dump,
                                source_ext=getattr(backend, "source_ext", "src"))
    (args.dump / "resources.json").write_text(json.dumps(resources, indent=1))
    table = Table("stage", "kernel", "files", "registers", "spills", "shared bytes")
    for r in resources:
        exts = " ".join(f.removeprefix(r["name"] + ".") for f in r["files"])
        table.add_row(r["stage"], r["name"], exts, *(
            str(r["metadata"].get(k, "—")) for k in ("registers", "spills", "shared")))
    Console(width=max(Console().width, 110)).print(table)
    Console().print(f"wrote {len(resources)} kernels to {args.dump}")
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
