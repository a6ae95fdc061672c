"""Triton kernels in a kernel-cache entry: the generated module and, for a GPU arch, every
kernel compiled ahead of time — loaded back with no code generation written to disk and no
compile, so ``TWILIGHT_DISABLE_COMPILE=1`` holds for Triton as it does for TVM.

An entry (``Backend.export``) holds::

    kernels.py     the generated module: what runs (imported from the entry)
    kernels.json   format, target, the module's sha256, and per compiled variant its kernel,
                   launch-time constexprs and directory
    aot/<variant>/ Triton's own files for one compiled kernel (metadata .json, .cubin, .ptx …)

A variant is a kernel with its launch-time constexprs: only the sort top-p has one (``ROWB``,
the row's power of two), compiled for every power of two its candidate lists can need.
``load_exported`` regenerates the module text (milliseconds) and refuses an entry whose module
differs (``ExportMismatch``); on a cuda target it rebuilds Triton's ``CompiledKernel`` objects
from the stored files — a GPU loads the cubins on first launch, nothing is compiled — and the
pipeline launches those instead of JIT functions. On the interpreter the module is all there is.

Example::

    out = Path(tmp); export(kernels, out)                       # kernels: a TritonCompiled
    again = load_exported(p, shape, schedule, target, entry)   # entry: a KernelCache entry
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from triton.compiler import CompiledKernel

from ...schedules.triton import TRITON
from .. import ir
from ..backend import ExportMismatch, Target
from . import loader
from .aot import ast_source, compile_kernel
from .expr import next_pow2
from .pipeline import TritonCompiled, variant_name

INDEX, MODULE, FORMAT = "kernels.json", "kernels.py", 1
MAX_ROW_BLOCK = 1 << 16  # the largest sorted row precompiled for a fraction budget


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def variants(kernels: TritonCompiled) -> dict[str, tuple[str, dict]]:
    """Every kernel variant a run can launch: name → (kernel name, launch constexprs)."""
    out: dict[str, tuple[str, dict]] = {}
    widest = kernels.cand_width(1 << 30)  # bounded for a token budget
    top = min(MAX_ROW_BLOCK, next_pow2(widest))
    for name in kernels.specs:
        stage = int(name[5:].split("_")[0]) if name.startswith("prune") else -1
        if name.endswith("_decide") and stage >= 0 and kernels.sorts(stage):
            rb = 16
            while rb <= top:
                consts = {"ROWB": rb}
                out[variant_name(name, consts)] = (name, consts)
                rb *= 2
        else:
            out[name] = (name, {})
    return out


def export(kernels: TritonCompiled, out: Path) -> None:
    """Write ``kernels``' module and, for a cuda target, every variant compiled for it."""
    out = Path(out)
    (out / MODULE).write_text(kernels.source)
    index = {"format": FORMAT, "target": str(kernels.target),
             "module_sha256": _sha(kernels.source), "variants": {}}
    if kernels.target.kind == "cuda":
        module = loader.load(kernels.source, interpret=False)
        for var, (name, consts) in variants(kernels).items():
            k = compile_kernel(module, kernels.specs[name], kernels.target, consts)
            dest = out / "aot" / var
            dest.mkdir(parents=True)
            for fname, path in k.metadata_group.items():
                shutil.copyfile(path, dest / fname)
            index["variants"][var] = {"kernel": name, "consts": consts, "hash": k.hash}
    (out / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))


def load_exported(p: ir.PipelineIR, shape: ir.Shape, schedule: dict, target: Target,
                  entry) -> TritonCompiled:
    """The pipeline whose kernels ``entry`` holds, without compiling; ``ExportMismatch`` when
    they are not exactly this pipeline's (module text, target, variants)."""
    kernels = TritonCompiled(p, shape, TRITON.complete(dict(schedule)), target)
    try:
        index = json.loads(entry.read(INDEX))
        ok = index.get("format") == FORMAT and index.get("target") == str(target) \
            and index.get("module_sha256") == _sha(kernels.source) \
            and entry.text(MODULE) == kernels.source
        want = variants(kernels) if target.kind == "cuda" else {}
        ok = ok and set(index["variants"]) == set(want)
    except (KeyError, TypeError, ValueError) as e:
        raise ExportMismatch(f"unreadable {INDEX}: {type(e).__name__}: {e}") from None
    if not ok:
        raise ExportMismatch(f"entry {entry.key[:16]} holds another pipeline's Triton module or "
                             "kernels")
    kernels.module_path = entry.path / MODULE
    if target.kind == "cuda":
        module = loader.load_file(kernels.module_path, interpret=False)
        kernels.aot = {var: _compiled_kernel(module, kernels, index["variants"][var],
                                             entry.path / "aot" / var) for var in want}
    return kernels


def _compiled_kernel(module, kernels: TritonCompiled, info: dict, folder: Path):
    """Triton's ``CompiledKernel`` from its stored files (what Triton's own cache does on a
    hit): the binary is loaded onto the GPU at the first launch."""
    spec = kernels.specs[info["kernel"]]
    group = {f.name: str(f) for f in sorted(folder.iterdir())}
    return CompiledKernel(ast_source(module, spec, info["consts"]), group, info["hash"])
