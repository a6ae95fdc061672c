"""A generated kernel as data: source, argument types, constexprs, launch options.

Stage generators (``select``, ``estimate``, ``top_p``, ``attend``, ``append``) return
``KernelSpec``s; the pipeline launches them from the imported module, and ``aot`` compiles the
same spec for a ``GPUTarget`` from its argument types and constexprs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..source import SourceWriter

PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class KernelSpec:
    stage: str
    name: str
    source: str
    args: tuple[tuple[str, str], ...]  # runtime arguments: (name, Triton type)
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int = 4
    num_stages: int = 1

    @property
    def const_dict(self) -> dict[str, Any]:
        return dict(self.constexprs)


def make_kernel(stage: str, name: str, args: list[tuple[str, str]], consts: dict[str, Any],
                body: SourceWriter, num_warps: int = 4, num_stages: int = 1) -> KernelSpec:
    """A ``@triton.jit`` function around ``body`` (written at depth 0)."""
    params = [a for a, _ in args] + [f"{c}: tl.constexpr" for c in consts]
    w = SourceWriter()
    w("@triton.jit")
    with w.block(f"def {name}(\n        " + ",\n        ".join(params) + "):"):
        w(*body.lines)
    return KernelSpec(stage, name, w.text(), tuple(args), tuple(consts.items()), num_warps,
                      num_stages)


def launch(mod, spec: KernelSpec, grid: tuple[int, ...], *args, **extra_consts) -> None:
    """Run ``spec`` from the imported module ``mod`` (interpreter or GPU alike)."""
    fn = getattr(mod, spec.name)
    fn[grid](*args, **{**spec.const_dict, **extra_consts}, num_warps=spec.num_warps,
             num_stages=spec.num_stages)
