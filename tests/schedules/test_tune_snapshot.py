"""`twilightc tune --snapshot` tunes on the snapshot's real q/k/v through the served path, and
`twilightc eval --backend` then reports the same figure for the same data: same problems, same
DecodePipeline.run, timed the same way, so the same milliseconds within the noise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from twilight import knobs
from twilight.cli import main
from twilight.compiler.backend import CPU_THREADS
from twilight.runtime.evaluation.snapshot import load_snapshot, save_snapshot
from twilight.runtime.serving.load import DecodePipeline
from twilight.runtime.store.tuning_log import read_log

FIXTURE = Path(__file__).parents[1] / "fixtures" / "smollm2_2k.npz"
T, NQ = 512, 4


@pytest.fixture
def small(tmp_path):
    """Two real SmolLM2 layers of the fixture, cut to 4 queries over 512 tokens."""
    s = load_snapshot(FIXTURE)
    path = tmp_path / "small.npz"
    save_snapshot(path, s.q[:2, -NQ:], s.k[:2, :, :T], s.v[:2, :, :T],
                  torch.arange(T - NQ, T), s.scale[:2], s.model, s.layers[:2])
    with knobs.scope(data_dir=tmp_path / "data", tuning_logs=tmp_path / "logs",
                     cache_dir=tmp_path / "cache", disable_compile=None):
        yield path, load_snapshot(path)


@pytest.fixture
def queries_run(monkeypatch):
    """Every query tensor DecodePipeline.run is called with, as bytes (what was timed)."""
    seen: list[bytes] = []
    run = DecodePipeline.run

    def spy(self, q, *a, **k):
        seen.append(q.cpu().numpy().tobytes())
        return run(self, q, *a, **k)
    monkeypatch.setattr(DecodePipeline, "run", spy)
    return seen


def _tune(path, capsys):
    assert main(["tune", "--gpu", "cpu", "--snapshot", str(path), "--trials", "2",
                 "--dense-trials", "1", "--repeats", "15"]) == 0
    printed = capsys.readouterr().out
    log = read_log(Path(knobs.tuning_logs_dir()) / "cpu" / "quest_twilight.json")
    (rec,) = log["entries"][-1]["buckets"]
    return printed, rec


def _eval(path, capsys):
    assert main(["eval", "--pipeline", "quest_twilight", "--snapshot", str(path),
                 "--backend", "tvm", "--json", "--repeats", "15"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def one_thread():
    """torch and twilight's kernels on one thread each: CI runs two test processes on two
    cores, and two-thread pools oversubscribed that way made single calls 20-100x slower at
    random (a tune/eval pair read 26x, then 0.73x, then 25x), which is the machine, not what
    this test asks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    token = CPU_THREADS.set(1)
    try:
        yield
    finally:
        CPU_THREADS.reset(token)
        torch.set_num_threads(threads)


def test_tune_on_a_snapshot_and_eval_agree(small, queries_run, capsys, one_thread):
    path, snap = small
    printed, rec = _tune(path, capsys)
    assert "measured on snapshot: small.npz layers [2, 15]" in printed
    tuned = set(queries_run)
    layer_q = {snap.q[i].numpy().tobytes() for i in range(2)}
    assert tuned == layer_q  # the trials and the crossover at full context: the real queries
    assert rec["bucket"] == f"b{NQ}_t{T}" and rec["data"].startswith("snapshot: small.npz")
    assert rec["timed"].startswith("DecodePipeline.plan once")
    assert rec["problems"] == ["small.npz layer 2", "small.npz layer 15"]
    assert rec["crossover"]["contexts"] == [128, 256, 512]
    assert set(rec["dense_below_layers"]) == {"2", "15"}
    # the crossover's SDPA is the first layer's fastest dtype; the baseline reads e.g.
    # "torch SDPA float32, GQA group as query rows, torch SDPA bfloat16" (one per layer)
    first = re.match(r"torch SDPA (float32|bfloat16|float16)\b", rec["dense_baseline"])
    assert first, rec["dense_baseline"]
    assert rec["dense_impl"] in ("kernels", f"sdpa:{first[1]}")

    queries_run.clear()
    data = _eval(path, capsys)
    assert set(queries_run) == layer_q  # eval times the same problems through the same run()
    for row in data["layers"]:  # and serves each layer as the tune decided
        dense = T < rec["dense_below_layers"][str(row["layer"])]
        assert row["path"].startswith("dense") == dense, (row, rec)

    # The same milliseconds within 25%: alone, 16 runs here read 0.95-1.11. The two figures are
    # taken seconds apart, and under CI's other test process one of them can land on a busy
    # stretch (CI once read 0.77). So a pair out of the band is measured again, tune and eval,
    # up to twice more; a real disagreement (a different path or problem timed) stays out of
    # the band every time.
    ratios = []
    for attempt in range(3):
        if attempt:
            _, rec = _tune(path, capsys)
            data = _eval(path, capsys)
        ratios.append(data["overall"]["latency_ms"] / rec["served_latency_ms"])
        if 1 / 1.25 < ratios[-1] < 1.25:
            break
    assert 1 / 1.25 < ratios[-1] < 1.25, (ratios, data["overall"], rec)


def test_tune_rejects_shapes_with_snapshots_and_layers_without(small, capsys):
    path, _ = small
    for argv, says in ((["--snapshot", str(path), "--shapes", "1x512"],
                        "--shapes: with --snapshot the shape buckets are the snapshots'"),
                       (["--layers", "0"], "--layers: only with --snapshot")):
        with pytest.raises(SystemExit) as e:
            main(["tune", "--gpu", "cpu", *argv])
        assert e.value.code == 2 and says in capsys.readouterr().err
