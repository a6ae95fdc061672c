"""Schedule spaces: defaults, conditional parameters, validation, enumeration."""

from __future__ import annotations

import pytest

from twilight.schedules.common import TOP_P
from twilight.schedules.space import Param, Space


def test_default_fills_only_active_params():
    d = TOP_P.default()
    assert d == {"top_p_strategy": "bisect", "bisect_stop": "eps", "bisect_eps": 1e-5}


def test_complete_drops_inactive_and_checks_choices():
    s = TOP_P.complete({"top_p_strategy": "radix", "bisect_eps": 1e-4})
    assert s == {"top_p_strategy": "radix", "radix_bits": 8}
    with pytest.raises(ValueError, match="radix_bits=3"):
        TOP_P.complete({"top_p_strategy": "radix", "radix_bits": 3})
    with pytest.raises(ValueError, match="unknown parameters"):
        TOP_P.complete({"nope": 1})


def test_grid_is_distinct_complete_schedules():
    grid = list(TOP_P.grid())
    # sort: 1; bisect: 3 eps + 5 iteration counts; radix: 3 bit widths
    assert len(grid) == TOP_P.size() == 1 + 3 + 5 + 3
    assert len({tuple(sorted(g.items())) for g in grid}) == len(grid)
    assert all(TOP_P.complete(g) == g for g in grid)


def test_spaces_compose_and_defaults_must_be_choices():
    tiles = Space("tiles", (Param("BLOCK_N", (32, 64), 64),))
    both = tiles + TOP_P
    assert both.default()["BLOCK_N"] == 64 and "top_p_strategy" in both.default()
    with pytest.raises(ValueError, match="default"):
        Param("x", (1, 2), 3)
