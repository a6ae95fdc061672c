"""Generated Triton source lives in real ``.py`` files, imported by path.

Why a file: ``@triton.jit`` on ``exec``'d source runs under the interpreter but cannot compile
for a GPU (Triton reads the function's source file). Files go to
``$TWILIGHT_CACHE_DIR/triton_src/<sha256>.py`` (default ``~/.cache/twilight``), written
atomically (temp file + ``os.replace``) and reused when present.

Why two imports of one file: ``triton.jit`` decides at *decoration* time whether a function is
interpreted (``knobs.runtime.interpret``). The loader imports the same file once per mode under
distinct module names, flipping the knob around the import, so one process can run a kernel
under the interpreter on CPU tensors and AOT-compile the very same source for ``sm_90``.
The interpreter also needs Triton's own library functions (``tl.sort``, ``tl.max``, …) to
have been decorated in interpreter mode, i.e. ``TRITON_INTERPRET=1`` before ``import triton``;
:func:`interpreter_ready` says whether that holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import triton

from ... import knobs
from ..backend import BackendUnavailableError

_MODULES: dict[tuple[str, bool], ModuleType] = {}


def cache_dir() -> Path:
    return Path(knobs.cache_dir()) / "triton_src"


def source_path(source: str) -> Path:
    """Where ``source`` lives on disk: its sha256 names the file (written if missing)."""
    digest = hashlib.sha256(source.encode()).hexdigest()
    path = cache_dir() / f"tw_{digest[:32]}.py"
    if path.exists() and path.read_text() == source:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(source)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def interpret_mode(on: bool):
    """Set Triton's interpreter knob for the duration (decoration and launches read it)."""
    knobs = triton.knobs.runtime
    old = knobs.interpret
    knobs.interpret = on
    try:
        yield
    finally:
        knobs.interpret = old


_MISSING = object()


def _lang_objects() -> list:
    import triton.language as tl
    import triton.language.standard as std
    core = tl.core
    return [tl, core, tl.math, std, core.tensor, core.dtype,
            getattr(core, "tensor_descriptor_base", core.tensor)]


@contextlib.contextmanager
def interpreter_launch():
    """Interpreter mode for a launch, and ``triton.language`` exactly as before it afterwards.

    Triton's interpreter (3.7) patches ``triton.language`` for every nested device-function
    call (``InterpretedFunction.__call__``, which library functions such as ``tl.sum`` are) and
    never restores those patches; a later AOT compile in the same process then fails inside
    ``tl.load``. Snapshot the namespaces and put them back."""
    objs = _lang_objects()
    saved = [dict(vars(o)) for o in objs]
    try:
        with interpret_mode(True):
            yield
    finally:
        # Names the interpreter *added* stay: its function rewriter injects its globals into
        # library modules and caches functions that need them.
        for o, before in zip(objs, saved, strict=True):
            for name, val in before.items():
                if vars(o).get(name, _MISSING) is not val:
                    setattr(o, name, val)


_JIT_TWINS: dict[int, object] = {}


@contextlib.contextmanager
def jit_library():
    """Triton's library functions as ``JITFunction``s for the duration of an AOT compile.

    In a process that imported Triton with ``TRITON_INTERPRET=1`` (what running kernels under
    the interpreter requires) ``tl.sum``, ``tl.sort``, ... are ``InterpretedFunction``s, which the
    GPU code generator cannot call; swap in JIT twins of the same Python functions, restore
    after."""
    if not interpreter_ready():
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    owners = [m for n, m in list(sys.modules.items())
              if n.startswith("triton.language") and m is not None]
    owners.append(triton.language.core.tensor)
    saved = []
    for owner in owners:
        for name, val in list(vars(owner).items()):
            # tensor methods (x.sum()) are plain wrappers closing over the library function
            cells = [c.cell_contents for c in getattr(val, "__closure__", None) or ()]
            inner = next((c for c in cells if isinstance(c, InterpretedFunction)), None)
            target = val if isinstance(val, InterpretedFunction) else inner
            if target is not None:
                twin = _JIT_TWINS.setdefault(id(target), JITFunction(target.fn))
                saved.append((owner, name, val))
                setattr(owner, name, twin)
    try:
        with interpret_mode(False):
            yield
    finally:
        for owner, name, val in saved:
            setattr(owner, name, val)


def interpreter_ready() -> bool:
    """True when Triton's library functions were decorated for the interpreter."""
    import triton.language.standard as std
    return type(std.sum).__name__ == "InterpretedFunction"


def _preimport_gluon() -> None:
    # Triton imports gluon lazily on a first launch and asserts there that its library
    # functions match the *current* mode; import it once now, in the mode they were made in.
    with interpret_mode(interpreter_ready()), contextlib.suppress(ImportError):
        import triton.experimental.gluon  # noqa: F401


def load(source: str, interpret: bool) -> ModuleType:
    """The module of ``source`` with its kernels decorated for the interpreter or for JIT/AOT."""
    return load_file(source_path(source), interpret)


def load_file(path: Path, interpret: bool) -> ModuleType:
    """The generated module at ``path`` (e.g. in a kernel-cache entry), decorated for the
    interpreter or for JIT/AOT; imported once per path and mode."""
    path = Path(path)
    key = (str(path), interpret)
    if key in _MODULES:
        return _MODULES[key]
    if interpret and not interpreter_ready():
        raise BackendUnavailableError("Triton on the CPU runs only in its interpreter, which "
                                      "needs TRITON_INTERPRET=1 in the environment before "
                                      "triton is first imported (set it, or use a cuda target)")
    _preimport_gluon()
    tag = hashlib.sha256(str(path).encode()).hexdigest()[:12]  # one name per file
    name = f"twilight_triton_gen.{path.stem}_{tag}_{'interp' if interpret else 'jit'}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    with interpret_mode(interpret):
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    _MODULES[key] = mod
    return mod
