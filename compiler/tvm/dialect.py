"""TVMScript on the shared source writer (``compiler.source``): parameters with symbolic
shapes, buffers, and the loop kinds that differ between targets.

Stage templates are Python functions that write TVMScript text with this writer; the text is
what ``twilightc compile --dump`` shows as ``tir`` and what TVM's parser turns into a PrimFunc.
Writing text (rather than calling TVM's IR builder) lets a template unroll over the IR — any
number of reductions in a user's score, any number of summary fields — with plain Python, and
keeps every generated kernel readable.

Targets: on ``llvm`` the row loop is ``T.parallel`` and channel loops are ``T.vectorized``; on
``cuda`` rows are bound to ``blockIdx.x`` × ``threadIdx.x`` (one thread per row) and channel loops
are unrolled.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

from ..source import SourceWriter
from .build import KernelSource

NEG_INF = 'T.float32("-inf")'
POS_INF = 'T.float32("inf")'
DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


LINE = 64  # bytes of a cache line (what one prefetch asks for)


@dataclass(frozen=True)
class Dialect:
    kind: str = "llvm"  # "llvm" | "cuda"
    threads: int = 64  # cuda threads per block (rows per block)
    private: bool = False  # kernels as private subroutines of a fused module (``fused.py``)
    vnni: bool = False  # llvm: the target has AVX-512 VNNI (``build.has_vnni``)

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"

    def vec(self, n: int) -> str:
        if self.cuda:
            return f"T.unroll({n})"
        return f"T.vectorized({n})" if n > 1 else "T.serial(1)"


class Src(SourceWriter):
    """TVMScript: the shared writer plus buffers, prim_func headers and row loops."""

    def __init__(self, dialect: Dialect):
        super().__init__()
        self.d = dialect
        self.signature: tuple[tuple, tuple] = ((), ())  # (params, symbolic dims) of ``func``

    def local(self, name: str, shape, dtype: str = "float32") -> str:
        shape = shape if isinstance(shape, tuple) else (shape,)
        dims = ", ".join(str(x) for x in shape) + ("," if len(shape) == 1 else "")
        # llvm: "global" scope, which TVM puts on the stack when small (under 1 KB, on the CPU);
        # "local" it serves from the workspace pool, a call per allocation even inside loops
        scope = "local" if self.d.cuda else "global"
        self(f'{name} = T.alloc_buffer(({dims}), "{dtype}", scope="{scope}")')
        return name

    def prefetch_row(self, row: str, nbytes: int, esize: int) -> None:
        """Ask for every cache line of a row of ``nbytes`` (llvm: ``llvm.prefetch``, to read,
        into every cache level) whose element ``i`` is ``row.format(i)``. A prefetch never
        faults, so an address past the data costs nothing but the fetch."""
        for off in range(0, nbytes, LINE):
            self(f'T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", '
                 f"T.address_of({row.format(off // esize)}), 0, 3, 1))")

    def shared(self, name: str, shape, dtype: str = "float32") -> str:
        """A buffer in the block's shared memory (cuda only): one ``__shared__`` array."""
        assert self.d.cuda, "shared memory is a cuda-only staging"
        shape = shape if isinstance(shape, tuple) else (shape,)
        dims = ", ".join(str(x) for x in shape) + ("," if len(shape) == 1 else "")
        self(f'{name} = T.alloc_buffer(({dims}), "{dtype}", scope="shared")')
        return name

    @contextmanager
    def func(self, name: str, params: list[tuple[str, tuple, str]], sym: tuple[str, ...]):
        """``def name(...)`` with one handle per buffer, ``T.match_buffer`` of each, and the
        symbolic dims in ``sym`` declared as ``T.int32()`` vars.

        Private (``Dialect.private``): ``name_impl``, a subroutine of a fused module instead,
        taking a typed pointer per buffer (``T.decl_buffer`` over it) and the symbolic dims as
        ``int32`` arguments, after the pointers; it returns 0 (TVM 0.27's llvm codegen rejects a
        void subroutine holding a parallel loop)."""
        self.signature = (tuple(params), tuple(sym))
        if self.d.private:
            args = ", ".join([f'{p}_p: T.handle("{dt}")' for p, _, dt in params]
                             + [f"{v}: T.int32" for v in sym])
            header = f"@T.prim_func(private=True)\ndef {name}_impl({args}) -> T.int32:"
        else:
            args = ", ".join(f"{p}_h: T.handle" for p, _, _ in params)
            header = f"@T.prim_func\ndef {name}({args}):"
        with self.block(header):
            self('T.func_attr({"tirx.noalias": True})')
            if not self.d.private:
                for v in sym:
                    self(f"{v} = T.int32()")
                self._buffers(params, "T.match_buffer({p}_h, ")
                yield
                return
            # the device a workspace allocation is for: an entry function gets it from
            # MakePackedAPI, a subroutine has to say it (CPU 0, where the fused module runs)
            with self.block('with T.attr(0, "device_type", 1):'):
                with self.block('with T.attr(0, "device_id", 0):'):
                    self._buffers(params, "T.decl_buffer(", ", data={p}_p")
                    yield
            self("return 0")

    def _buffers(self, params, call: str, tail: str = "") -> None:
        for p, shape, dtype in params:
            dims = ", ".join(str(x) for x in shape) + ("," if len(shape) == 1 else "")
            self(f'{p} = {call.format(p=p)}({dims}), "{dtype}"{tail.format(p=p)})')

    def source(self, stage: str, name: str) -> KernelSource:
        """The written kernel as a ``KernelSource``, with its signature (buffers, dims); its
        scalars bound once (``bind_once``)."""
        params, sym = self.signature
        return KernelSource(stage, name, bind_once(self.text()), params, sym)

    @contextmanager
    def rows(self, var: str, extent: str, prologue=None):
        """The parallel loop over independent rows (requests × heads × splits).

        cuda: ``prologue(self)``, when given, is written inside the thread loops but before the
        row guard, so every thread of the block runs it (block-wide staging and its barrier);
        ``{var}_o`` / ``{var}_i`` name the block and the thread there."""
        if self.d.cuda:
            th = self.d.threads
            with self.block(f'for {var}_o in T.thread_binding(({extent} + {th - 1}) // {th}, '
                            '"blockIdx.x"):'):
                with self.block(f'for {var}_i in T.thread_binding({th}, "threadIdx.x"):'):
                    if prologue is not None:
                        prologue(self)
                    self(f"{var} = {var}_o * {th} + {var}_i")
                    with self.block(f"if {var} < {extent}:"):
                        yield
        else:
            with self.block(f"for {var} in T.parallel({extent}):"):
                yield


_ASSIGN = re.compile(r"^( *)([A-Za-z_]\w*) = (.+)$")
# a buffer, or a symbolic dim's declaration (``N = T.int32()``): left as they are
_NOT_SCALAR = re.compile(r"^T\.((alloc_buffer|decl_buffer|match_buffer|alloc_local)\(|\w+\(\)$)")


def bind_once(text: str) -> str:
    """``x = e`` as ``x: T.let = e`` wherever no other assignment of ``x`` is in its scope or
    has it in theirs: an immutable binding, which TVM keeps in a register.

    TVM 0.27's parser turns a plain scalar assignment into a one-element buffer
    (``T.local_scalar``, "local" scope) so that it could be assigned again; on llvm TVM serves
    every such buffer from its workspace pool, a runtime call to allocate and one to free per
    row of a parallel loop, and reads and writes it through memory. The generated kernels
    assign most scalars once (mutable state lives in ``buf[0]`` buffers), so those become
    bindings; a name assigned again where the first is visible keeps the buffer."""
    lines = text.split("\n")
    found: dict[str, list[tuple[int, int]]] = {}  # name -> (line, end of its scope)
    for i, line in enumerate(lines):
        m = _ASSIGN.match(line)
        if not m or _NOT_SCALAR.match(m.group(3)):
            continue
        indent, end = len(m.group(1)), len(lines)
        for j in range(i + 1, len(lines)):
            if lines[j].strip() and len(lines[j]) - len(lines[j].lstrip(" ")) < indent:
                end = j
                break
        found.setdefault(m.group(2), []).append((i, end))
    for name, spans in found.items():
        for i, end in spans:
            if all(not (i < k < end or k < i < e) for k, e in spans if k != i):
                lines[i] = lines[i].replace(f"{name} = ", f"{name}: T.let = ", 1)
    return "\n".join(lines)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
