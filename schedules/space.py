"""Schedule spaces as data: named parameters with choices, defaults and conditions.

A schedule is a plain ``dict`` of parameter values. A space declares which parameters exist,
their choices, their defaults, and when a parameter is active (``when``: it only matters if
another parameter takes one of some values — e.g. ``bisect_eps`` only for
``top_p_strategy == "bisect"``). The tuner maps spaces to ``trial.suggest_*``; backends read
schedules; nothing here knows about Optuna or kernels.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
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

    def fingerprint(self) -> str:
        """8 hex digits of the parameters' names, choices and conditions: Optuna refuses a
        study whose categorical choices changed, and a trial of another space is not one of
        this space's, so the tuner names studies by it."""
        desc = repr([(p.name, p.choices, p.when) for p in self.params])
        return hashlib.sha256(desc.encode()).hexdigest()[:8]

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

    def grid(self, limit: int = 100_000) -> Iterator[dict]:
        """Every distinct complete schedule, for spaces of at most ``limit`` schedules (a
        backend's full space has billions: ``ValueError`` rather than a hang)."""
        if self.size() > limit:
            raise ValueError(f"space {self.name} has {self.size():,} schedules, more than "
                             f"{limit:,} to enumerate")
        yield from self._walk({}, 0)

    def _walk(self, partial: dict, i: int) -> Iterator[dict]:
        # depth first over the active parameters only: each complete schedule once
        if i == len(self.params):
            yield dict(partial)
            return
        p = self.params[i]
        if not p.active(partial):
            yield from self._walk(partial, i + 1)
            return
        for value in p.choices:
            partial[p.name] = value
            yield from self._walk(partial, i + 1)
        del partial[p.name]

    def size(self) -> int:
        """How many distinct complete schedules there are, without enumerating them.

        A product over the parameters, split into branches only where a later ``when``
        condition looks at a value: walking the parameters in order, count the schedules per
        assignment of the parameters that some later condition still reads (a parameter no
        later condition reads multiplies every branch by its number of choices)."""
        names = [p.name for p in self.params]
        read_later = [{n for q in self.params[i + 1:] for n, _ in q.when}
                      for i in range(len(names))]
        branches: Counter = Counter({(): 1})  # tuple of (name, value) still read → count
        for p, keep in zip(self.params, read_later, strict=True):
            nxt: Counter = Counter()
            for state, count in branches.items():
                values = p.choices if p.active(dict(state)) else (_ABSENT,)
                for v in values:
                    grown = state + (((p.name, v),) if v is not _ABSENT else ())
                    nxt[tuple(kv for kv in grown if kv[0] in keep)] += count
            branches = nxt
        return sum(branches.values())

    def sample(self, rng: random.Random) -> dict:
        """A random complete schedule: each active parameter drawn uniformly, in order."""
        out: dict = {}
        for p in self.params:
            if p.active(out):
                out[p.name] = rng.choice(p.choices)
        return out


_ABSENT = object()  # an inactive parameter's "value" while counting
