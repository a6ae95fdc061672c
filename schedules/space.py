"""Schedule spaces as data: named parameters with choices, defaults and conditions.

A schedule is a plain ``dict`` of parameter values. A space declares which parameters exist,
their choices, their defaults, and when a parameter is active (``when``: it only matters if
another parameter takes one of some values — e.g. ``bisect_eps`` only for
``top_p_strategy == "bisect"``). The tuner maps spaces to ``trial.suggest_*``; backends read
schedules; nothing here knows about Optuna or kernels.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Param:
    name: str
    choices: tuple
    default: Any
    when: tuple[tuple[str, tuple], ...] = ()  # ((other_param, (values...)), ...)
    doc: str = ""

    def __post_init__(self):
        if self.default not in self.choices:
            raise ValueError(f"param {self.name}: default {self.default!r} not in {self.choices}")

    def active(self, schedule: dict) -> bool:
        return all(schedule.get(p) in vals for p, vals in self.when)


@dataclass(frozen=True)
class Space:
    name: str
    params: tuple[Param, ...] = field(default_factory=tuple)

    def __add__(self, other: Space) -> Space:
        return Space(f"{self.name}+{other.name}", self.params + other.params)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"space {self.name} has no parameter {name!r}")

    def default(self) -> dict:
        return self.complete({})

    def complete(self, schedule: dict) -> dict:
        """``schedule`` with every active parameter filled in (defaults), inactive ones
        dropped, and every value checked against its choices."""
        unknown = set(schedule) - {p.name for p in self.params}
        if unknown:
            raise ValueError(f"space {self.name}: unknown parameters {sorted(unknown)}")
        out: dict = {}
        for p in self.params:  # conditions refer to earlier parameters
            if not p.active(out):
                continue
            value = schedule.get(p.name, p.default)
            if value not in p.choices:
                raise ValueError(f"space {self.name}: {p.name}={value!r} not in {p.choices}")
            out[p.name] = value
        return out

    def grid(self) -> Iterator[dict]:
        """Every distinct complete schedule (for spaces small enough to enumerate)."""
        seen = set()
        names = [p.name for p in self.params]
        for values in itertools.product(*(p.choices for p in self.params)):
            s = self.complete(dict(zip(names, values, strict=True)))
            key = tuple(sorted(s.items()))
            if key not in seen:
                seen.add(key)
                yield s

    def size(self) -> int:
        return sum(1 for _ in self.grid())
