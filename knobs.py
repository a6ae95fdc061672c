"""Every environment knob of twilight, in one typed, documented module.

Knobs are read from the environment each time they are asked for (never cached at import), so a
process may change them, and ``scope()`` can override them in tests. ``scope()`` writes the
environment itself, so the override reaches child processes too::

    >>> from twilight import knobs
    >>> with knobs.scope(cache_dir="/tmp/tw-cache", disable_compile=True):
    ...     str(knobs.cache_dir()), knobs.disable_compile()
    ('/tmp/tw-cache', True)

The knobs (``describe()`` renders them for ``--help`` epilogs):

* ``TWILIGHT_CACHE_DIR`` — compiled kernels; default ``$XDG_CACHE_HOME/twilight`` or
  ``~/.cache/twilight``;
* ``TWILIGHT_DISABLE_COMPILE=1`` — a kernel-cache miss is an error instead of a compile (for
  production, where every kernel was built ahead of time);
* ``TWILIGHT_DEBUG=1`` — full Python tracebacks instead of one-line errors;
* ``TWILIGHT_DATA_DIR`` — tuning studies; default ``$XDG_DATA_HOME/twilight`` or
  ``~/.local/share/twilight``;
* ``TWILIGHT_TUNING_LOGS`` — the user's tuning logs; default ``<TWILIGHT_DATA_DIR>/tuning_logs``;
* ``TWILIGHT_CHECK_FINITE=0`` — ``run()`` skips its NaN/inf check of the query (a one-scalar
  reduction: < 0.1% of a CPU decode step, but a host sync per step on a GPU); a non-finite query
  then gives unspecified output. Keys and values are checked at ``append`` regardless.

A knob marked ``codegen`` changes generated code; ``codegen_knobs()`` hands the current values
of those to the kernel cache key (none today, but a knob added with ``codegen=True`` is keyed
without touching the cache).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TwilightError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class KnobError(TwilightError, ValueError):
    """An environment knob holds a value twilight cannot read."""


@dataclass(frozen=True)
class Knob:
    """One environment variable: its name, how to read it, its default and what it does."""

    name: str  # the keyword of ``scope()``
    env: str
    kind: str  # "path" | "bool"
    default: Callable[[], Any]
    doc: str
    codegen: bool = False

    def raw(self) -> str | None:
        return os.environ.get(self.env)

    def get(self) -> Any:
        text = self.raw()
        if text is None or not text.strip():  # set but blank: the default, for every kind
            return self.default()
        if self.kind == "path":
            return Path(text).expanduser()
        low = text.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise KnobError(f"{self.env}={text!r}: expected one of 1/true/yes/on or 0/false/no/off")

    def to_env(self, value: Any) -> str:
        if self.kind == "bool":
            return "1" if value else "0"
        return os.fspath(value)


def _xdg(var: str, fallback: str) -> Path:
    base = os.environ.get(var, "").strip()
    return Path(base).expanduser() / "twilight" if base else Path.home() / fallback / "twilight"


KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("cache_dir", "TWILIGHT_CACHE_DIR", "path",
         lambda: _xdg("XDG_CACHE_HOME", ".cache"),
         "where compiled kernels are kept (see 'twilightc cache')"),
    Knob("disable_compile", "TWILIGHT_DISABLE_COMPILE", "bool", lambda: False,
         "1: a kernel-cache miss raises CacheMissError instead of compiling"),
    Knob("debug", "TWILIGHT_DEBUG", "bool", lambda: False,
         "1: show full Python tracebacks instead of one-line errors"),
    Knob("data_dir", "TWILIGHT_DATA_DIR", "path",
         lambda: _xdg("XDG_DATA_HOME", ".local/share"),
         "where tuning studies are kept"),
    Knob("tuning_logs", "TWILIGHT_TUNING_LOGS", "path",
         lambda: data_dir() / "tuning_logs",
         "the user's tuning logs (default: <TWILIGHT_DATA_DIR>/tuning_logs)"),
    Knob("check_finite", "TWILIGHT_CHECK_FINITE", "bool", lambda: True,
         "0: run() skips the NaN/inf check of the query (serving; K/V are checked at append)"),
)}


def cache_dir() -> Path:
    """``TWILIGHT_CACHE_DIR``: the root of the kernel cache."""
    return KNOBS["cache_dir"].get()


def disable_compile() -> bool:
    """``TWILIGHT_DISABLE_COMPILE``: whether a kernel-cache miss is an error."""
    return KNOBS["disable_compile"].get()


def debug() -> bool:
    """``TWILIGHT_DEBUG``: whether errors show full tracebacks."""
    return KNOBS["debug"].get()


def data_dir() -> Path:
    """``TWILIGHT_DATA_DIR``: the root of twilight's tuning studies."""
    return KNOBS["data_dir"].get()


def tuning_logs_dir() -> Path:
    """``TWILIGHT_TUNING_LOGS``: the directory of the user's tuning logs."""
    return KNOBS["tuning_logs"].get()


def check_finite() -> bool:
    """``TWILIGHT_CHECK_FINITE``: whether ``run()`` refuses a query holding NaN or inf."""
    return KNOBS["check_finite"].get()


def codegen_knobs() -> dict[str, str]:
    """The knobs that change generated code, ``{env name: value}`` (unset ones left out);
    part of every kernel cache key.

    >>> isinstance(codegen_knobs(), dict)
    True
    """
    return {k.env: k.raw() for k in KNOBS.values() if k.codegen and k.raw() is not None}


def describe() -> str:
    """The knobs as an ``environment:`` block for a ``--help`` epilog."""
    width = max(len(k.env) for k in KNOBS.values()) + 2
    return "\n".join(f"  {k.env:<{width}}{k.doc}" for k in KNOBS.values())


@contextlib.contextmanager
def scope(**values: Any) -> Iterator[None]:
    """Override knobs (by their keyword: ``cache_dir``, ``disable_compile``, ``debug``,
    ``data_dir``, ``tuning_logs``, ``check_finite``) until the block ends; ``None`` unsets one (its default then
    applies). The environment is written, so child processes inherit the override.

    >>> with scope(debug=True):
    ...     debug()
    True
    """
    unknown = sorted(set(values) - set(KNOBS))
    if unknown:
        raise TypeError(f"scope(): unknown knob(s) {unknown}; known: {', '.join(KNOBS)}")
    saved = {KNOBS[n].env: os.environ.get(KNOBS[n].env) for n in values}
    try:
        for name, value in values.items():
            knob = KNOBS[name]
            if value is None:
                os.environ.pop(knob.env, None)
            else:
                os.environ[knob.env] = knob.to_env(value)
        yield
    finally:
        for env, old in saved.items():
            if old is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = old
