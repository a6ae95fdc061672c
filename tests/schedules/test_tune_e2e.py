"""`twilightc tune` end to end on the CPU with the TVM backend, at toy sizes: a real study on
real storage, the gate, the tuning log, and resumption after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

import twilight as tw
from twilight import knobs
from twilight.cli import main
from twilight.compiler.backend import Backend, get_backend, register_backend
from twilight.runtime.store.tuning_log import ShapeBucket, find_schedule
from twilight.runtime.tuning.tuner import (
    TuneConfig,
    best_trial,
    finished_count,
    open_storage,
    tune_bucket,
)
from twilight.schedules.devices import PROFILES

HEADS = "q_heads=4,kv_heads=2,head_dim=32,dtype=float32"
PIPE = "quest_twilight(budget=128)"


@pytest.fixture()
def dirs(tmp_path):
    with knobs.scope(data_dir=tmp_path / "data", tuning_logs=tmp_path / "logs",
                     cache_dir=tmp_path / "cache"):
        yield tmp_path


def _tune_args(extra=()):
    return ["tune", "--gpu", "cpu", "--pipeline", PIPE, "--head-shape", HEADS,
            "--shapes", "1x512", "--repeats", "3", *extra]


def test_tune_writes_a_log_that_load_finds(dirs, capsys):
    assert main(_tune_args(["--trials", "4"])) == 0
    out = capsys.readouterr().out
    assert "b1_t512" in out and "tuning log" in out
    pipe = tw.builtins.quest_twilight(budget=128)
    shape = tw.Shape(4, 2, 32, 16, "float32")
    rec, entry = find_schedule(pipe.ir, "cpu", shape, ShapeBucket(1, 600),
                               roots=[dirs / "logs"])
    assert entry["measured"] and entry["backend"] == "tvm" and rec["trials"] == 4
    assert rec["latency_ms"] <= rec["default_latency_ms"] and rec["dense_latency_ms"] > 0
    assert rec["data"].startswith("synthetic") and rec["dense_baseline"].startswith("torch SDPA")
    assert rec["crossover"]["contexts"] == [128, 256, 512] and rec["dense_below"] >= 0
    dense_rec, _ = find_schedule(tw.builtins.dense().ir, "cpu", shape, ShapeBucket(1, 512),
                                 roots=[dirs / "logs"])  # its dense fallback, tuned too
    assert dense_rec["trials"] >= 1
    study = optuna.load_study(study_name=rec["study"], storage=open_storage(
        entry["storage"], dirs / "x"))
    assert study.trials[0].params == get_backend("tvm").space(
        pipe.ir, shape, tw.compiler.backend.Target("llvm")).default()  # default tried first


class _WrongWhenSplit(Backend):
    """The TVM backend with a fault injected: split_kv=2 schedules return a wrong answer."""

    name = "tvm_faulty"

    def supports(self, target):
        return get_backend("tvm").supports(target)

    def serving_target(self, device):
        return get_backend("tvm").serving_target(device)

    def complete(self, schedule):
        return get_backend("tvm").complete(schedule)

    def lower(self, p, shape, schedule, target):
        compiled = get_backend("tvm").lower(p, shape, schedule, target)
        if schedule.get("split_kv") != 2:
            return compiled
        attend = compiled.attend  # the served path runs the stages, not Compiled.run
        fused = compiled.call_fused  # ... or, on the CPU, the fused call

        def wrong(*a, **k):
            return attend(*a, **k) * 1.5

        def wrong_fused(*a, **k):
            out = fused(*a, **k)
            return (out[0] * 1.5, out[1]) if isinstance(out, tuple) else out * 1.5
        compiled.attend, compiled.call_fused = wrong, wrong_fused
        return compiled

    def version_stamp(self):
        return {}

    def space(self, p, shape, target):
        from twilight.schedules.space import Space
        full = get_backend("tvm").space(p, shape, target)
        return Space("small", tuple(q for q in full.params if q.name in ("split_kv",)))


def test_gate_failures_are_recorded_and_never_win(dirs):
    register_backend(_WrongWhenSplit)
    pipe = tw.builtins.quest_twilight(budget=128)
    shape = tw.Shape(4, 2, 32, 16, "float32")
    space = _WrongWhenSplit().space(pipe.ir, shape, get_backend("tvm").local_target())
    # the whole grid (every split_kv), so the faulty value is always tried
    cfg = TuneConfig(pipe.ir, shape, [ShapeBucket(1, 256)], "tvm_faulty", PROFILES["cpu"],
                     trials=space.size(), sampler="grid", repeats=2)
    study = tune_bucket(cfg, cfg.buckets[0], space,
                        open_storage(str(dirs / "s.db"), dirs / "x"))
    failed = [t for t in study.trials if t.params.get("split_kv") == 2]
    assert failed and all(t.state == TrialState.FAIL for t in failed)
    assert "differs from the reference" in failed[0].user_attrs["gate"]
    assert best_trial(study).params["split_kv"] != 2


def _pipeline_study(journal):
    """The pipeline's study (the journal also holds its dense fallback's, tuned after it)."""
    storage = open_storage(str(journal), journal)
    names = [n for n in optuna.get_all_study_names(storage) if n.startswith("quest_twilight")]
    if not names:
        raise ValueError("the study is not created yet")
    return optuna.load_study(study_name=names[0], storage=storage)


def _measured(study):
    """Trials measured to the end: passed the gate (complete) or failed it (an int8 query's
    estimate may keep other tokens than the float reference's); not those a kill cut off."""
    return [t for t in study.trials if t.state == TrialState.COMPLETE
            or t.state == TrialState.FAIL and t.user_attrs.get("gate", "pass") != "pass"]


def test_killed_tune_resumes_without_losing_or_repeating_trials(dirs):
    env = {**os.environ, "TWILIGHT_DATA_DIR": str(dirs / "data"),
           "TWILIGHT_TUNING_LOGS": str(dirs / "logs"), "TWILIGHT_CACHE_DIR": str(dirs / "c")}
    args = [sys.executable, "-m", "twilight.cli", *_tune_args(["--trials", "8", "--repeats",
                                                                "200"])]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = dirs / "data" / "studies" / "cpu" / "quest_twilight.journal"
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        if journal.exists():
            try:
                study = _pipeline_study(journal)
            except ValueError:  # the study is not created yet
                continue
            done = len(_measured(study))
            # killed mid-trial, not in the one-write window before a new trial names its
            # worker (that orphan waits out UNMARKED_GRACE_S: test_tuner_storage covers it)
            if done >= 2 and all("worker" in t.user_attrs for t in study.trials
                                 if t.state == TrialState.RUNNING):
                break
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _pipeline_study(journal)
    finished_before = [t.params for t in _measured(before)]
    assert 2 <= len(finished_before) < 8

    subprocess.run(args[:-2], env=env, check=True, capture_output=True)  # quick repeats
    after = _pipeline_study(journal)
    measured = _measured(after)
    assert len(measured) == finished_count(after) == 8  # the budget, exactly: nothing lost
    assert [t.params for t in measured[: len(finished_before)]] == finished_before
    keys = [json.dumps(t.params, sort_keys=True) for t in measured]
    retried = [t for t in after.trials if t.user_attrs.get("retry_of") is not None]
    assert len(keys) - len(set(keys)) <= len(retried)  # only a cut-off trial runs again
    assert not [t for t in after.trials if t.state == TrialState.RUNNING]


def test_triton_tune_starts_at_once_on_its_full_space(dirs):
    """`tune --backend triton` searches the full Triton space (63 million schedules, which
    used to be enumerated before the first trial: a hang). On the CPU it runs in Triton's
    interpreter, so: tiny shapes, one trial, and a timeout that a hang would exceed."""
    env = {**os.environ, "TWILIGHT_DATA_DIR": str(dirs / "data"), "TRITON_INTERPRET": "1",
           "TWILIGHT_TUNING_LOGS": str(dirs / "logs"), "TWILIGHT_CACHE_DIR": str(dirs / "c")}
    done = subprocess.run(
        [sys.executable, "-m", "twilight.cli", "tune", "--gpu", "cpu", "--backend", "triton",
         "--pipeline", "quest_twilight(budget=64)", "--head-shape",
         "q_heads=2,kv_heads=1,head_dim=16,dtype=float32", "--shapes", "1x128", "--trials", "1",
         "--repeats", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "space of 62,914,560 schedules" in done.stdout
    log = json.loads((dirs / "logs" / "cpu" / "quest_twilight.json").read_text())
    assert log["entries"][0]["backend"] == "triton" and log["entries"][0]["target"] == \
        "interpret"


def test_triton_on_a_cpu_without_its_interpreter_is_refused(dirs):
    """Without TRITON_INTERPRET=1 (read when triton is first imported: a fresh process), the
    Triton backend cannot run on a CPU: a usage error, before anything is tuned."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TWILIGHT_DATA_DIR=str(dirs / "data"), TWILIGHT_TUNING_LOGS=str(dirs / "logs"))
    done = subprocess.run([sys.executable, "-m", "twilight.cli", *_tune_args(
        ["--backend", "triton"])], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--backend triton: it does not serve cpu" in done.stderr
    assert "TRITON_INTERPRET=1" in done.stderr and "Traceback" not in done.stderr
