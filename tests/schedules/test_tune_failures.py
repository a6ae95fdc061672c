"""A tune that cannot produce a winner says so and logs nothing; what an older, broken tune
left behind (``"schedule": null``, a damaged log) never breaks ``twilight.load``."""

from __future__ import annotations

import json

import pytest
import torch

import twilight as tw
from twilight import knobs
from twilight.cli import main
from twilight.compiler import backend as backend_mod
from twilight.compiler.backend import Backend, get_backend
from twilight.runtime.serving import load as load_mod
from twilight.runtime.store.tuning_log import TuningLogWarning, log_path, shape_dict

HEADS = "q_heads=4,kv_heads=2,head_dim=32,dtype=float32"
PIPE = "quest_top_k(budget=64)"


@pytest.fixture()
def dirs(tmp_path):
    with knobs.scope(data_dir=tmp_path / "data", tuning_logs=tmp_path / "logs",
                     cache_dir=tmp_path / "cache"):
        yield tmp_path


def _tune(extra=()):
    return main(["tune", "--gpu", "cpu", "--pipeline", PIPE, "--head-shape", HEADS,
                 "--shapes", "1x256", "--repeats", "2", *extra])


class _AlwaysWrong(Backend):
    """The real TVM backend with a fault injected: every answer is off by half."""

    name = "tvm"

    def __init__(self, real=None):
        self.real = real

    def supports(self, target):
        return self.real.supports(target)

    def serving_target(self, device):
        return self.real.serving_target(device)

    def complete(self, schedule):
        return self.real.complete(schedule)

    def version_stamp(self):
        return self.real.version_stamp()

    def space(self, p, shape, target):
        return self.real.space(p, shape, target)

    def lower(self, p, shape, schedule, target):
        compiled = self.real.lower(p, shape, schedule, target)
        attend = compiled.attend  # the served path runs the stages, not Compiled.run
        fused = compiled.call_fused  # ... or, on the CPU, the fused call

        def wrong(*a, **k):
            return attend(*a, **k) * 1.5

        def wrong_fused(*a, **k):
            out = fused(*a, **k)
            return (out[0] * 1.5, out[1]) if isinstance(out, tuple) else out * 1.5
        compiled.attend, compiled.call_fused = wrong, wrong_fused
        return compiled


def test_no_passing_schedule_exits_1_says_why_and_logs_nothing(dirs, monkeypatch, capsys):
    faulty = _AlwaysWrong(get_backend("tvm"))
    monkeypatch.setitem(backend_mod._REGISTRY, "tvm", faulty)
    assert _tune(["--trials", "2"]) == 1
    err = capsys.readouterr().err
    assert "no schedule passed in 1 of 1 shape buckets (nothing was logged)" in err
    assert "b1_t256: none of 2 trials passed: 2 failed the correctness gate" in err
    assert "Traceback" not in err
    assert not (dirs / "logs" / "cpu" / "quest_top_k.json").exists()


def _write_log(root, pipe, shape, schedule, backend="tvm"):
    path = log_path(root, "cpu", pipe.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": 1, "device": "cpu", "pipeline": pipe.name, "entries": [
        {"pipeline_key": pipe.ir.key(), "backend": backend, "target": "llvm",
         "shape": shape_dict(shape), "measured": True,
         "buckets": [{"bucket": "b1_t4096", "batch": 1, "context": 4096,
                      "schedule": schedule, "latency_ms": None}]}]}))
    return path


@pytest.mark.parametrize("damage", ["null schedule", "unknown knob", "not json", "a list"])
def test_load_skips_a_damaged_log_with_a_warning(dirs, damage):
    pipe = tw.builtins.quest_top_k(budget=64)
    shape = tw.Shape(4, 2, 32, 16, "float32")
    path = _write_log(dirs / "logs", pipe, shape,
                      None if damage == "null schedule" else {"no_such_knob": 3})
    if damage == "not json":
        path.write_text('{"format": 1, "entries": [')
    elif damage == "a list":
        path.write_text("[1, 2]")
    load_mod._TOLD.clear()
    with pytest.warns(TuningLogWarning):
        loaded = tw.load(pipe, "cpu", shape, "tvm")
    assert loaded.schedule_source == "default"
    kv = loaded.make_cache()
    rid = kv.add_request()
    kv.append(torch.randn(2, 40, 32), torch.randn(2, 40, 32), rid)
    assert loaded.plan(1, 64).run(torch.randn(1, 4, 32), kv).shape == (1, 4, 32)


def test_logs_show_skips_damaged_logs(dirs, capsys):
    pipe = tw.builtins.quest_top_k(budget=64)
    good = _write_log(dirs / "logs", pipe, tw.Shape(4, 2, 32, 16, "float32"),
                      {"split_kv": 2})
    (good.parent / "broken.json").write_text("not json")
    (good.parent / "odd.json").write_text(json.dumps({"format": 1, "entries": [{"x": 1}]}))
    assert main(["logs", "show", "--root", str(dirs / "logs")]) == 0
    captured = capsys.readouterr()
    assert "split_kv=2" in captured.out
    assert "broken.json: unreadable" in captured.err and "entry skipped" in captured.err


def test_resume_without_a_study_is_refused_and_creates_nothing(dirs, capsys):
    store = dirs / "none.journal"
    assert _tune(["--resume", "--storage", str(store)]) == 1
    assert "--resume: there is no study storage" in capsys.readouterr().err
    assert not store.exists()
    other = dirs / "other.journal"  # a storage that exists but holds another study
    assert _tune(["--trials", "1", "--storage", str(other), "--pipeline",
                  "quest_top_k(budget=32)"]) == 0
    capsys.readouterr()
    assert _tune(["--resume", "--storage", str(other)]) == 1
    assert "holds no study of this pipeline" in capsys.readouterr().err


def test_storage_password_is_never_printed(dirs, capsys):
    assert _tune(["--storage", "postgresql://tw:hunter2@127.0.0.1:1/x"]) == 1
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err
    assert "postgresql://tw:***@127.0.0.1:1/x: cannot connect" in captured.err
