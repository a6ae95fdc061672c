"""The Triton backend: generated kernels for every stage of any pipeline the DSL expresses.

``get_backend("triton").lower(ir, shape, schedule, target)`` returns a
:class:`~twilight.compiler.triton.pipeline.TritonCompiled`:

* ``Target("interpret")`` runs every kernel under Triton's interpreter on CPU tensors (needs
  ``TRITON_INTERPRET=1`` before ``import triton``);
* ``Target("cuda", "sm_90")`` runs on a GPU. ``lower`` itself never compiles ahead of time:
  :func:`twilight.compiler.triton.aot.compile_artifacts` turns a lowered pipeline into
  artifacts with ttir/ttgir/llir/ptx/cubin and registers/spills/shared, with or without a GPU.

Example::

    import twilight as tw
    from twilight.compiler.backend import Target, get_backend
    pipe = tw.builtins.quest_twilight(budget=256)
    shape = tw.Shape(q_heads=8, kv_heads=2, head_dim=64, page_size=16, dtype="float16")
    kern = get_backend("triton").lower(pipe.ir, shape, {}, Target("interpret"))
    out = kern.run(q, cache)
"""

from __future__ import annotations

from pathlib import Path

import torch
import triton

from ...schedules.triton import TRITON
from ...version import source_stamp
from .. import ir
from ..backend import Backend, Target, register_backend
from ..verify import verify
from . import export
from .aot import compile_artifacts
from .loader import interpreter_ready
from .pipeline import TritonCompiled


@register_backend
class TritonBackend(Backend):
    name = "triton"
    source_ext = "py"  # what the generated source is, for --dump

    preference = 0  # the GPU backend of choice

    def supports(self, target: Target) -> bool:
        return target.kind in ("interpret", "cuda")

    def serving_target(self, device) -> Target | None:
        """A GPU's ``cuda:sm_XX``; never the CPU (the interpreter is for tests)."""
        return Target("cuda", device.arch) if device.kind == "cuda" else None

    def local_target(self) -> Target | None:
        """The GPU when one is present, else the interpreter when this process can run it
        (``TRITON_INTERPRET=1`` before ``import triton``)."""
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return Target("cuda", f"sm_{major}{minor}")
        return Target("interpret") if interpreter_ready() else None

    def lower(self, p: ir.PipelineIR, shape: ir.Shape, schedule: dict | None,
              target: Target):
        if not self.supports(target):
            raise ValueError(f"the Triton backend runs on 'interpret' or 'cuda:sm_XX', not "
                             f"{target}")
        verify(p, shape, stage="triton")
        return TritonCompiled(p, shape, TRITON.complete(dict(schedule or {})), target)

    def version_stamp(self) -> dict[str, str]:
        """Triton's version and a hash of this backend's own generators (and the IR), so that
        editing a generator invalidates the kernels it made."""
        here = Path(__file__).resolve().parent
        return {"triton": triton.__version__,
                "codegen_sources": source_stamp(here, here.parent / "ir.py")}

    def exports(self, target: Target) -> bool:
        """Kernel-cache entries for both targets: the generated module (interpreter) and, for
        a GPU arch, every kernel compiled ahead of time (``export``)."""
        return self.supports(target)

    def export(self, kernels, out: Path) -> None:
        export.export(kernels, out)

    def load_exported(self, p: ir.PipelineIR, shape: ir.Shape, schedule: dict, target: Target,
                      entry):
        return export.load_exported(p, shape, schedule, target, entry)

    def fresh(self, kernels):
        return kernels.fresh()

    def dump_artifacts(self, compiled, target: Target):
        """On a cuda target, AOT-compile every kernel (ttir … cubin, registers, spills)."""
        if target.kind != "cuda":
            return list(compiled.artifacts)
        return compile_artifacts(compiled, target)
