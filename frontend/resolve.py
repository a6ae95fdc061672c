"""Turn a pipeline named on the command line into a pipeline object.

Accepted forms::

    quest_twilight                       a built-in, default arguments
    quest_twilight(p=0.85, budget=2048)  a built-in with arguments (Python literals)
    my_pkg.selectors:pipe                an attribute of an importable module
    ./my_selectors.py:pipe               an attribute of a Python file
    ./my_selectors.py:pipelines[loki]    one entry of a dict of pipelines (key quoted or not)

The attribute must be a ``Pipeline``, a ``Calibrated`` pipeline, or a *factory*: a Python
function (``def``) that takes no arguments and returns one, e.g. ``def pipe(): return
tw.Pipeline(...)``. Anything else — a class, a builtin, any other callable object — is refused
without being called (``builtins:exit`` names a callable, not a pipeline).

Errors in a built-in's arguments name the text on the command line (``--pipeline
'quest_top_k(budget=-1)': ...``), not a line of twilight's own code.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from collections.abc import Mapping
from pathlib import Path

from ..errors import PipelineError, StructureError
from .builtins import PIPELINES, Calibrated
from .dsl import Pipeline

_KEYED = re.compile(r"^(?P<attr>[A-Za-z_]\w*)\[(?P<key>.+)\]$")


def resolve_pipeline(spec: str) -> Pipeline | Calibrated:
    spec = spec.strip()
    if ":" in spec and "(" not in spec.split(":", 1)[0]:
        module, attr = spec.rsplit(":", 1)
        keyed = _KEYED.match(attr.strip())
        obj = _load_attr(module, keyed["attr"] if keyed else attr)
        if keyed:
            obj = _entry(obj, _key(keyed["key"]), spec)
        elif isinstance(obj, Mapping):
            raise StructureError(f"pipeline {spec!r} is a dict of {len(obj)} pipelines; name one: "
                                 f"'{spec}[KEY]', KEY one of: {', '.join(map(str, obj))}")
    else:
        obj = _builtin(spec)
    if _is_factory(obj):
        obj = obj()
        if not isinstance(obj, Pipeline | Calibrated):
            raise StructureError(f"pipeline {spec!r}: the function returned a "
                                 f"{type(obj).__name__}, not a tw.Pipeline")
    if not isinstance(obj, Pipeline | Calibrated):
        raise StructureError(f"pipeline {spec!r} is a {type(obj).__name__}, not a tw.Pipeline "
                             "(or a function of no arguments that returns one)")
    return obj


def _is_factory(obj) -> bool:
    """A plain Python function callable with no arguments (never a class or a builtin)."""
    if not inspect.isfunction(obj):
        return False
    try:
        inspect.signature(obj).bind()
    except TypeError:
        return False
    return True


def _key(text: str):
    """A dict key as written in ``attr[key]``: a Python literal (``'loki'``, ``3``) or a bare
    word."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text.strip()


def _entry(obj, key, spec: str):
    if not isinstance(obj, Mapping):
        raise StructureError(f"pipeline {spec!r}: {type(obj).__name__} is not a dict of "
                             "pipelines; drop the [key]")
    if key not in obj:
        raise StructureError(f"pipeline {spec!r}: no key {key!r}; keys: "
                             f"{', '.join(map(str, obj))}")
    return obj[key]


def _builtin(spec: str):
    try:
        node = ast.parse(spec, mode="eval").body
    except SyntaxError as e:
        raise StructureError(f"cannot read pipeline {spec!r}: {e.msg}") from None
    name_node, kwargs = node, {}
    if isinstance(node, ast.Call):
        if node.args:
            raise StructureError(f"pipeline {spec!r}: give arguments by name, e.g. "
                                 "quest_twilight(p=0.9)")
        name_node = node.func
        try:
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except ValueError:
            raise StructureError(f"pipeline {spec!r}: arguments must be Python literals") \
                from None
    if not isinstance(name_node, ast.Name) or name_node.id not in PIPELINES:
        raise StructureError(f"unknown pipeline {spec!r}; built-ins: {', '.join(PIPELINES)}; "
                             "or give module:attr or path/to/file.py:attr")
    try:
        return PIPELINES[name_node.id](**kwargs)
    except TypeError as e:
        raise StructureError(f"pipeline {spec!r}: {e}") from None
    except PipelineError as e:  # the user wrote the arguments here, not in twilight's code
        raise type(e)(f"pipeline {spec!r}: {e.message}", None, e.hint) from None


def _load_attr(module: str, attr: str):
    try:
        if module.endswith(".py"):
            path = Path(module)
            if not path.is_file():
                raise StructureError(f"pipeline file {module} does not exist")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
    except PipelineError:
        raise  # a DSL error: it names the user's line already
    except ImportError as e:
        raise StructureError(f"cannot import {module!r}: {e}") from None
    except Exception as e:  # the user's module failed while it ran: say where
        raise StructureError(f"pipeline {module}:{attr}: {_where(e)}{type(e).__name__}: {e}") \
            from None
    if not attr.isidentifier() or not hasattr(mod, attr):
        raise StructureError(f"{module} has no attribute {attr!r}")
    return getattr(mod, attr)


def _where(e: Exception) -> str:
    """``file:line: `` of the innermost frame of an exception (a SyntaxError's own line)."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}: "
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}: " if tb else ""
