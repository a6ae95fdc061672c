"""Schedule spaces: defaults, conditional parameters, validation, enumeration, and sizes
counted without enumerating (the Triton space has 63 million schedules)."""

from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twilight.schedules.common import TOP_P
from twilight.schedules.space import Param, Space


def test_default_fills_only_active_params():
    d = TOP_P.default()
    assert d == {"top_p_strategy": "bisect", "bisect_stop": "mass", "bisect_mass": 1e-3}


def test_complete_drops_inactive_and_checks_choices():
    s = TOP_P.complete({"top_p_strategy": "radix", "bisect_eps": 1e-4})
    assert s == {"top_p_strategy": "radix", "radix_bits": 8}
    with pytest.raises(ValueError, match="radix_bits=3"):
        TOP_P.complete({"top_p_strategy": "radix", "radix_bits": 3})
    with pytest.raises(ValueError, match="unknown parameters"):
        TOP_P.complete({"nope": 1})


def test_grid_is_distinct_complete_schedules():
    grid = list(TOP_P.grid())
    # sort: 1; bisect: 3 mass bounds + 2 eps + 3 iteration counts; radix: 3 bit widths
    assert len(grid) == TOP_P.size() == 1 + 3 + 2 + 3 + 3
    assert len({tuple(sorted(g.items())) for g in grid}) == len(grid)
    assert all(TOP_P.complete(g) == g for g in grid)


def test_spaces_compose_and_defaults_must_be_choices():
    tiles = Space("tiles", (Param("BLOCK_N", (32, 64), 64),))
    both = tiles + TOP_P
    assert both.default()["BLOCK_N"] == 64 and "top_p_strategy" in both.default()
    with pytest.raises(ValueError, match="default"):
        Param("x", (1, 2), 3)


# ---- sizes without enumeration ------------------------------------------------------------------
def _brute_force(space: Space) -> set:
    """The distinct complete schedules, by the definition: every product of choices, completed."""
    names = [p.name for p in space.params]
    return {tuple(sorted(space.complete(dict(zip(names, values, strict=True))).items()))
            for values in itertools.product(*(p.choices for p in space.params))}


@st.composite
def spaces(draw):
    """Small spaces whose parameters depend on earlier ones (chains and nested conditions)."""
    params = []
    for i in range(draw(st.integers(1, 6))):
        choices = tuple(range(draw(st.integers(1, 4))))
        when = []
        for earlier in draw(st.lists(st.sampled_from(params), max_size=2, unique_by=id)
                            if params else st.just([])):
            when.append((earlier.name, tuple(draw(st.lists(st.sampled_from(earlier.choices),
                                                           min_size=1, unique=True)))))
        params.append(Param(f"p{i}", choices, choices[0], when=tuple(when)))
    return Space("random", tuple(params))


@settings(max_examples=150, deadline=None)
@given(spaces())
def test_size_and_grid_match_the_definition(space):
    expected = _brute_force(space)
    assert space.size() == len(expected)
    grid = [tuple(sorted(s.items())) for s in space.grid()]
    assert len(grid) == len(set(grid)) and set(grid) == expected


def test_backend_spaces_are_counted_not_enumerated():
    from twilight.schedules.triton import TRITON
    from twilight.schedules.tvm import TVM
    plain = math.prod(len(p.choices) for p in TRITON.params if not p.when
                      and p.name not in {q.name for q in TOP_P.params})
    assert TRITON.size() == plain * TOP_P.size() == 62_914_560
    assert TVM.size() == math.prod(len(p.choices) for p in TVM.params
                                   if p.name not in {q.name for q in TOP_P.params}) * 12
    with pytest.raises(ValueError, match="62,914,560 schedules"):
        next(TRITON.grid())


def test_sample_draws_complete_schedules():
    rng = random.Random(0)
    for _ in range(50):
        s = TOP_P.sample(rng)
        assert TOP_P.complete(s) == s


FIRST_TRIAL = r"""
import optuna, twilight as tw
from twilight.compiler.backend import Target, backends
from twilight.runtime.tuning.tuner import make_sampler, suggest
pipe = tw.builtins.quest_twilight()
for name, backend in sorted(backends().items()):
    for target in ("llvm", "cuda:sm_90", "interpret"):
        if not backend.supports(Target.parse(target)):
            continue
        space = backend.space(pipe.ir, tw.Shape(32, 8, 128), Target.parse(target))
        for kind in ("tpe", "random"):
            study = optuna.create_study(sampler=make_sampler(kind, 0, space))
            schedule = suggest(study.ask(), space)
            assert space.complete(schedule) == schedule
        print(name, target, space.size())
"""


def test_first_trial_of_every_backend_space_starts_at_once():
    """Each backend's full space (the Triton one has 63 million schedules) hands out its first
    trial without enumerating anything: a hang here is the bug this guards (timeout)."""
    out = subprocess.run([sys.executable, "-c", FIRST_TRIAL], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "triton interpret 62914560" in out and "tvm llvm" in out
