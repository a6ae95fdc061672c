"""Turn a pipeline named on the command line into a pipeline object.

Accepted forms::

    quest_twilight                       a built-in, default arguments
    quest_twilight(p=0.85, budget=2048)  a built-in with arguments (Python literals)
    my_pkg.selectors:pipe                an attribute of an importable module
    ./my_selectors.py:pipe               an attribute of a Python file

The attribute may be a ``Pipeline``, a ``Calibrated`` pipeline, or a function returning one.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

from ..errors import StructureError
from .builtins import PIPELINES, Calibrated
from .dsl import Pipeline


def resolve_pipeline(spec: str) -> Pipeline | Calibrated:
    spec = spec.strip()
    if ":" in spec and "(" not in spec.split(":", 1)[0]:
        obj = _load_attr(*spec.rsplit(":", 1))
    else:
        obj = _builtin(spec)
    if callable(obj) and not isinstance(obj, Pipeline | Calibrated):
        obj = obj()
    if not isinstance(obj, Pipeline | Calibrated):
        raise StructureError(f"pipeline {spec!r} is a {type(obj).__name__}, not a tw.Pipeline")
    return obj


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


def _load_attr(module: str, attr: str):
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise StructureError(f"pipeline file {module} does not exist")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise StructureError(f"cannot import {module!r}: {e}") from None
    if not hasattr(mod, attr):
        raise StructureError(f"{module} has no attribute {attr!r}")
    return getattr(mod, attr)
