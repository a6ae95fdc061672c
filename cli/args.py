"""Validated command-line values: each ``argparse`` type here turns a bad value into one line
naming the argument and what was expected (argparse prints it and exits 2), so commands never
see a value they must check again.

    >>> import argparse
    >>> p = argparse.ArgumentParser(prog="x", exit_on_error=False)
    >>> _ = p.add_argument("--repeats", type=count(1))
    >>> p.parse_args(["--repeats", "3"]).repeats
    3
    >>> head_shape("q_heads=8,kv_heads=2,head_dim=64")["kv_heads"]
    2

``UsageError`` is for what can only be checked once the command runs (a schedule key against
the backend's space): ``twilightc`` reports it like argparse does, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from ..compiler.ir import SHAPE_DTYPES, Shape
from ..errors import InputError
from ..runtime.store.tuning_log import ShapeBucket

SHAPE_FIELDS = ("q_heads", "kv_heads", "head_dim", "page_size", "dtype")


class UsageError(InputError):
    """A command-line value that is wrong in context (exit status 2, like argparse's)."""


def _fail(text: str, expected: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{text!r}: expected {expected}")


def count(minimum: int = 1) -> Callable[[str], int]:
    """A whole number ≥ ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise _fail(text, f"a whole number ≥ {minimum}") from None
        if value < minimum:
            raise _fail(text, f"a whole number ≥ {minimum}")
        return value
    parse.__name__ = "count"
    return parse


def number(minimum: float = 0.0, strict: bool = True,
           maximum: float = math.inf) -> Callable[[str], float]:
    """A finite number > ``minimum`` (``strict``) or ≥ it, and ≤ ``maximum``."""
    bound = f"{'>' if strict else '≥'} {minimum:g}" + \
        (f" and ≤ {maximum:g}" if math.isfinite(maximum) else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise _fail(text, f"a number {bound}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum) \
                or value > maximum:
            raise _fail(text, f"a finite number {bound}")
        return value
    parse.__name__ = "number"
    return parse


def buckets(text: str) -> list[ShapeBucket]:
    """``BxT,BxT,…`` shape buckets (``1x4k,4x8k``), each batch and context ≥ 1."""
    try:
        out = [ShapeBucket.parse(item) for item in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return list(dict.fromkeys(out))


def head_shape(text: str) -> dict:
    """``q_heads=32,kv_heads=8,head_dim=128,dtype=float16`` (any of ``SHAPE_FIELDS``) as the
    keyword arguments of ``Shape`` — checked as a whole (page_size as given or 16)."""
    fields: dict = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        if name not in SHAPE_FIELDS or not eq:
            raise _fail(text, f"NAME=VALUE items with NAME one of {', '.join(SHAPE_FIELDS)}")
        if name == "dtype":
            fields[name] = value.strip()
            continue
        try:
            fields[name] = int(value, 10)
        except ValueError:
            raise _fail(text, f"{name} a whole number, not {value!r}") from None
    try:
        shape = Shape(**{"q_heads": 32, "kv_heads": 8, "head_dim": 128, "page_size": 16,
                         **fields})
    except InputError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}".replace("Shape: ", "")) from None
    if shape.q_heads % shape.kv_heads:
        raise _fail(text, f"q_heads a multiple of kv_heads (got {shape.q_heads} and "
                    f"{shape.kv_heads}: each KV head serves a whole group of query heads)")
    return fields


def make_shape(fields: dict, page_size: int) -> Shape:
    """The ``Shape`` of parsed ``head_shape`` fields; the pipeline's page size unless given."""
    return Shape(**{"q_heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "float16",
                    "page_size": page_size, **fields})


def schedule_json(text: str) -> dict:
    """A JSON object of schedule parameters (its keys are checked against the backend's space
    by ``check_schedule`` once the backend is known)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise _fail(text, f"a JSON object such as '{{\"top_p_strategy\": \"radix\"}}' ({e})") \
            from None
    if not isinstance(value, dict):
        raise _fail(text, "a JSON object of parameter names and values, e.g. "
                    "'{\"top_p_strategy\": \"radix\"}'")
    return value


def check_schedule(schedule: dict, space, flag: str = "--schedule") -> dict:
    """``schedule`` completed by ``space`` (a ``schedules.space.Space``), or a UsageError that
    names the unknown parameter or the bad value and lists what is allowed."""
    names = [p.name for p in space.params]
    unknown = sorted(set(schedule) - set(names))
    if unknown:
        raise UsageError(f"{flag}: unknown parameter(s) {', '.join(map(repr, unknown))} for "
                         f"this backend and target; known: {', '.join(names)}")
    for p in space.params:
        if p.name in schedule and schedule[p.name] not in p.choices:
            raise UsageError(f"{flag}: {p.name}={schedule[p.name]!r}; expected one of "
                             f"{', '.join(map(repr, p.choices))}")
    full = space.complete(schedule)
    for name in schedule.keys() - full.keys():  # would be dropped: say so, change nothing
        when = " and ".join(f"{q} in {', '.join(map(repr, v))}"
                            for q, v in space.param(name).when)
        raise UsageError(f"{flag}: {name} has no effect here; it applies only when {when}")
    return full


def target(text: str):
    """A ``Target``: ``cuda:sm_XX``, ``llvm`` (or ``cpu``) or ``interpret``."""
    from ..compiler.backend import Target
    try:
        return Target.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def require_runnable(backend, device, flag: str = "--backend") -> None:
    """A backend that does not serve ``device`` runs here only on its local target, if it has
    one (Triton on a CPU: its interpreter, ~750x slower than torch, only with
    TRITON_INTERPRET=1 set before triton is imported)."""
    if backend.serving_target(device) is None and backend.local_target() is None:
        raise UsageError(f"{flag} {backend.name}: it does not serve {device.name} "
                         f"({device.kind}) and cannot run in this process (Triton on a CPU "
                         "runs only in its interpreter: set TRITON_INTERPRET=1, tiny shapes "
                         "only); use the backend that serves this device")


def out_dir(text: str) -> Path:
    """A directory to write into: it may not exist yet, but must not be a file."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise _fail(text, "a directory (this is an existing file)")
    return path


def writable_dir(path: Path, flag: str) -> Path:
    """Create ``path`` if missing and check that files can be written in it — before a long
    run, not after — else an InputError naming ``flag``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".twilight-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return path


__all__ = ["SHAPE_DTYPES", "UsageError", "buckets", "check_schedule", "count", "head_shape",
           "make_shape", "number", "out_dir", "require_runnable", "schedule_json", "target", "writable_dir"]
