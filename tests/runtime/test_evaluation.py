"""`twilightc eval` on the committed SmolLM2 fixture: the figures the foundation promises."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import twilight as tw
from twilight.cli import main
from twilight.errors import InputError
from twilight.runtime.evaluation.evaluate import METRIC_KEYS, evaluate_snapshot, spearman
from twilight.runtime.evaluation.snapshot import load_snapshot, save_snapshot

FIXTURE = Path(__file__).parents[1] / "fixtures" / "smollm2_2k.npz"


@pytest.fixture(scope="module")
def snap():
    return load_snapshot(FIXTURE)


def test_fixture_is_real_and_in_format(snap):
    assert FIXTURE.stat().st_size <= 5 * 1024 * 1024
    L, nq, hq, d = snap.q.shape
    assert snap.q.dtype == snap.k.dtype == torch.float16 and snap.context == 2048
    assert (hq, snap.k.shape[1], d) == (9, 3, 64) and "SmolLM2" in snap.model
    assert torch.equal(snap.q_pos, torch.arange(2048 - nq, 2048))
    assert torch.allclose(snap.scale, torch.full((L,), 0.125))


def test_quest_twilight_keeps_fewer_than_quest_at_its_budget_with_mass_p(snap):
    budget = 1024
    tw_rep = evaluate_snapshot(tw.builtins.quest_twilight(budget=budget, p=0.9), snap)
    qk_rep = evaluate_snapshot(tw.builtins.quest_top_k(budget=budget), snap)
    ours, theirs = tw_rep.to_json()["overall"], qk_rep.to_json()["overall"]
    assert ours["kept_tokens_mean"] < theirs["kept_tokens_mean"]
    for r in tw_rep.layers:  # every layer, query and head
        assert bool((r.est_mass >= 0.9 - 1e-5).all())
    assert theirs["est_mass_mean"] is None and ours["rank_agreement_mean"] > 0.5


def test_dense_is_exact_and_json_keys_are_stable(snap, capsys):
    assert main(["eval", "--pipeline", "dense", "--snapshot", str(FIXTURE), "--json",
                 "--layers", "0"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"pipeline", "pipeline_key", "snapshot", "model", "backend",
                         "context_max",
                         "overall", "layers"}
    assert set(data["overall"]) == set(METRIC_KEYS)
    assert set(data["layers"][0]) == {"layer", *METRIC_KEYS}
    o = data["overall"]
    assert o["true_mass_min"] > 0.9999 and o["rel_l2_error_max"] < 2e-3
    assert o["kept_fraction_mean"] == 1.0


def test_calibrated_ds_and_table_output(snap, capsys):
    assert main(["eval", "--pipeline", "ds_twilight(budget=512)", "--snapshot", str(FIXTURE),
                 "--layers", "1"]) == 0
    out = capsys.readouterr().out
    assert "ds_twilight" in out and "in-cand min" in out


def test_spearman_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 50, generator=gen), torch.rand(3, 50, generator=gen)
    mask = torch.rand(3, 50, generator=gen) > 0.3
    got = spearman(a, b, mask)
    for i in range(3):
        x, y = a[i][mask[i]].numpy(), b[i][mask[i]].numpy()
        rx, ry = x.argsort().argsort(), y.argsort().argsort()
        assert got[i].item() == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-5)
    assert spearman(a, a, mask).min().item() == pytest.approx(1.0)


def test_bad_snapshot_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, q=np.zeros((1, 2, 4, 8), np.float16))
    with pytest.raises(InputError, match="missing 'k'"):
        load_snapshot(bad)
    ok = tmp_path / "ok.npz"
    save_snapshot(ok, np.zeros((1, 2, 4, 8)), np.zeros((1, 2, 16, 8)), np.zeros((1, 2, 16, 8)),
                  [14, 15], [0.3], model="m")
    assert load_snapshot(ok).model == "m"
    assert main(["eval", "--pipeline", "dense", "--snapshot", str(bad)]) == 1


def test_compiled_backend_agrees_with_the_reference_and_is_timed(snap, tmp_path):
    from twilight import knobs
    pipe = tw.builtins.quest_twilight(budget=512)
    with knobs.scope(cache_dir=tmp_path / "cache", tuning_logs=tmp_path / "logs"):
        ours = evaluate_snapshot(pipe, snap, [1], backend="tvm", repeats=2).to_json()
    ref = evaluate_snapshot(pipe, snap, [1]).to_json()
    o, r = ours["overall"], ref["overall"]
    assert ours["backend"] == "tvm" and "default" in ours["schedule_source"]
    assert o["est_mass_min"] >= 0.9 - 1e-4  # never less than p, bisection may keep a bit more
    assert abs(o["kept_tokens_mean"] - r["kept_tokens_mean"]) <= 0.02 * r["kept_tokens_mean"]
    assert abs(o["rel_l2_error_mean"] - r["rel_l2_error_mean"]) < 0.01
    assert o["latency_ms"] > 0 and o["dense_latency_ms"] > 0 and o["speedup_vs_dense"] > 0
