"""`twilightc calibrate`: every estimator measured on real SmolLM2 attention, the cheapest one
that meets the fidelity target recommended, written where `twilight.load(model=...)` finds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import twilight as tw
from twilight import knobs
from twilight.cli import main
from twilight.runtime.evaluation.estimators import calibrate
from twilight.runtime.evaluation.snapshot import load_snapshot
from twilight.runtime.store.estimator_choice import (
    CHOICES,
    calibrated,
    estimator_named,
    write_choice,
)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "smollm2_2k.npz"


@pytest.fixture(scope="module")
def measured():
    pipe = tw.builtins.quest_twilight(budget=1024)
    return pipe, *calibrate(pipe, [load_snapshot(FIXTURE)], layers=[1], time_estimate=False)


def test_every_choice_is_measured_and_the_target_can_fail(measured):
    _pipe, choices, best = measured
    assert [c.estimator for c in choices] == [e.name for e in CHOICES]
    by = {c.estimator: c for c in choices}
    assert by["exact"].meets_target and by["exact"].true_in_cand_min >= 0.9 - 1e-4
    assert not by["int2_token"].meets_target  # 2-bit per-token keys collapse the estimate
    assert by["int4_token"].bytes_per_token < by["int8_token"].bytes_per_token < \
        by["exact"].bytes_per_token
    assert by["int4_group4"].bytes_per_token < by["int4_token"].bytes_per_token < \
        by["int4_page"].bytes_per_token  # D=64, fp16: 32 + 4, 32 + 8, 32 + 16
    assert by["int4_page"].meets_target and by["int4_group4"].meets_target
    ok = [c for c in choices if c.meets_target]
    assert best is not None and best.bytes_per_token == min(c.bytes_per_token for c in ok)


def test_load_uses_the_calibrated_estimator(measured, tmp_path):
    pipe, choices, _ = measured
    page = next(c for c in choices if c.estimator == "int8_page")
    with knobs.scope(data_dir=tmp_path, cache_dir=tmp_path / "cache"):
        write_choice("SmolLM2-135M-Instruct", pipe.ir, page, choices, [str(FIXTURE)])
        p, name = calibrated(pipe.ir, "SmolLM2-135M-Instruct")
        assert name == "int8_page" and p.prune[0].estimator.name == "int8_page"
        assert calibrated(pipe.ir, "another-model") == (pipe.ir, None)
        dp = tw.load(pipe, shape=tw.Shape(9, 3, 64, 16, "float16"), backend="tvm",
                     model="SmolLM2-135M-Instruct")
        assert dp.ir.prune[0].estimator.name == "int8_page"


def test_cli_reports_and_writes(tmp_path, capsys):
    with knobs.scope(data_dir=tmp_path):
        assert main(["calibrate", "--pipeline", "quest_twilight(budget=512)", "--snapshot",
                     str(FIXTURE), "--layers", "2", "--no-timing", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["recommended"] and Path(data["written_to"]).exists()
        assert main(["calibrate", "--pipeline", "quest_top_k", "--snapshot", str(FIXTURE),
                     "--no-timing"]) == 1  # no top-p pruner: nothing to calibrate
        assert "no top-p pruner" in capsys.readouterr().err


def test_every_choice_has_a_unique_name():
    assert len({e.name for e in CHOICES}) == len(CHOICES) == 14
    assert estimator_named("int4_token_smooth0.5").smooth == 0.5
    assert estimator_named("int2_token_smooth").smooth
    with pytest.raises(ValueError, match="unknown estimator 'int3_page'"):
        estimator_named("int3_page")
