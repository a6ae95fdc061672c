"""Ahead-of-time compilation of generated kernels for a CUDA arch, with or without a GPU.

``compile_artifacts(compiled, target)`` is the entry point the CLI's ``--dump`` builds on
(``lower`` never compiles ahead of time). Each kernel of a lowered pipeline is compiled with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", sm, 32))``
from the *same* generated file the pipeline runs (imported in JIT mode), giving
ttir/ttgir/llir/ptx/cubin. Registers, stack and local memory come from the bundled
``cuobjdump --dump-resource-usage`` on the cubin (Triton fills them only on a device): ``spills``
is the per-thread LOCAL bytes (register spills are the only local memory these kernels use);
``shared`` is Triton's metadata. Identical kernels (same source, constexprs, types, options,
target) compile once per process.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import replace

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..backend import Artifact, Target
from . import loader
from .kernels import KernelSpec
from .prelude import LIBRARY

_CACHE: dict[str, tuple[dict, dict]] = {}
_STAGES = ("ttir", "ttgir", "llir", "ptx", "cubin")


def cuobjdump_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` of the cubin's one function."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    fn = out.split("Function", 1)[-1]
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", fn)}


def _key(spec: KernelSpec, target: Target) -> str:
    text = repr((spec.source, LIBRARY, spec.args, spec.constexprs, spec.num_warps,
                 spec.num_stages, str(target), triton.__version__))
    return hashlib.sha256(text.encode()).hexdigest()


def ast_source(module, spec: KernelSpec, consts: dict | None = None) -> ASTSource:
    """What Triton compiles for ``spec`` (its constexprs, ``consts`` overriding some): the
    argument types of the spec, no specialization on values or alignment, so the compiled
    kernel accepts any arguments of those types."""
    sig = dict(spec.args) | {name: "constexpr" for name, _ in spec.constexprs}
    return ASTSource(getattr(module, spec.name), signature=sig,
                     constexprs=spec.const_dict | dict(consts or {}))


def compile_kernel(module, spec: KernelSpec, target: Target, consts: dict | None = None):
    """Triton's ``CompiledKernel`` of ``spec`` for ``target`` (a cuda target), no GPU needed;
    its ``metadata_group`` names the files Triton wrote (what a kernel-cache entry keeps)."""
    with loader.jit_library():
        return triton.compile(ast_source(module, spec, consts),
                              target=GPUTarget("cuda", target.sm, 32),
                              options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))


def compile_spec(module, spec: KernelSpec, target: Target) -> tuple[dict, dict]:
    """``(files, metadata)`` of one kernel for ``target`` (a cuda target)."""
    key = _key(spec, target)
    if key in _CACHE:
        return _CACHE[key]
    k = compile_kernel(module, spec, target)
    files = {s: k.asm[s] for s in _STAGES if s in k.asm}
    usage = resource_usage(files["cubin"])
    meta = {"registers": usage.get("REG", 0), "spills": usage.get("LOCAL", 0),
            "stack": usage.get("STACK", 0), "shared": int(k.metadata.shared),
            "num_warps": spec.num_warps, "num_stages": spec.num_stages, "target": str(target)}
    _CACHE[key] = (files, meta)
    return files, meta


def compile_artifacts(compiled, target: Target | None = None) -> list[Artifact]:
    """Every kernel of ``compiled`` (a ``TritonCompiled``) AOT-compiled for ``target``
    (default: the compiled target, which must then be ``cuda:sm_XX``)."""
    target = target or compiled.target
    if target.kind != "cuda":
        raise ValueError(f"AOT compilation needs a cuda:sm_XX target, got {target}")
    module = loader.load(compiled.source, interpret=False)
    out = []
    for art, spec in zip(compiled.artifacts, compiled.specs.values(), strict=True):
        files, meta = compile_spec(module, spec, target)
        out.append(replace(art, files=dict(files), metadata=art.metadata | meta))
    return out
