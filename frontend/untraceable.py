"""What a traced value refuses, with the user's line and what to write instead: Python
constructs that would need a number where a score has one value per token and head (``if``,
``float()``, ``math.*``, ``len()``, ``//``) and numpy or torch functions called on it."""

from __future__ import annotations

from ..errors import ExprTypeError
from .location import user_location

_TW_FOR = {"sqrt": "tw.sqrt", "log": "tw.log", "exp": "tw.exp", "tanh": "tw.tanh",
           "absolute": "tw.abs", "abs": "tw.abs", "sign": "tw.sign", "maximum": "tw.maximum",
           "minimum": "tw.minimum", "sum": "tw.sum", "max": "tw.max", "amax": "tw.max",
           "min": "tw.min", "amin": "tw.min", "mean": "tw.mean", "dot": "tw.dot",
           "where": "tw.where", "power": "x ** c (c a constant)", "pow": "x ** c (c a constant)",
           "matmul": "tw.dot(a, b) or q @ P", "exp2": "tw.exp(x * math.log(2))",
           "square": "x ** 2", "clamp": "tw.minimum/tw.maximum", "clip": "tw.minimum/tw.maximum",
           "topk": "tw.top_channels(q, r)", "tanh_": "tw.tanh"}


def _instead(name: str) -> str:
    use = _TW_FOR.get(name)
    return f"use {use}" if use else "use the tw.* functions (tw.sum, tw.exp, tw.sqrt, ...)"


class Untraceable:
    """Mixed into ``trace.Value``: each Python protocol a score cannot use raises an
    ``ExprTypeError`` naming the tw.* function to use instead."""

    def __bool__(self):
        raise ExprTypeError("a traced score value has no truth value (an if, and/or, a chained "
                            "comparison, min()/max() of values); scores are traced once, not "
                            "run per token", user_location(),
                            hint="use tw.where(cond, a, b), tw.maximum or tw.minimum")

    def __iter__(self):
        raise ExprTypeError("a traced score value cannot be iterated (a for loop, max(), sum(), "
                            "unpacking); reduce it with tw.sum/tw.max/tw.min/tw.mean",
                            user_location())

    def __len__(self):
        raise ExprTypeError("a traced vector has no Python length: it spans head_dim (or the "
                            "channels selected)", user_location(),
                            hint="tw.head_dim() is head_dim as a traced scalar")

    def _no_number(self, *_):
        raise ExprTypeError("a traced score value cannot become a Python number (float(), "
                            "int(), round(), math.*): it has one value per token and head",
                            user_location(),
                            hint="use tw.exp, tw.log, tw.sqrt, tw.tanh, tw.abs, tw.sign on "
                            "traced values")

    __float__ = __int__ = __index__ = __round__ = __complex__ = _no_number

    def __floordiv__(self, o):
        raise ExprTypeError("// is not traced", user_location(),
                            hint="use / (and tw.where for a step function)")

    __rfloordiv__ = __mod__ = __rmod__ = __floordiv__

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        raise ExprTypeError(f"numpy's np.{ufunc.__name__} on a traced score value: numpy "
                            "computes numbers, scores are traced", user_location(),
                            hint=_instead(ufunc.__name__))

    def __array_function__(self, func, types, args, kwargs):
        raise ExprTypeError(f"numpy's np.{func.__name__} on a traced score value: numpy "
                            "computes numbers, scores are traced", user_location(),
                            hint=_instead(func.__name__))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func)).strip("_")
        raise ExprTypeError(f"torch.{name} on a traced score value: torch computes tensors, "
                            "scores are traced (and emitted into kernels)", user_location(),
                            hint=_instead(name))
