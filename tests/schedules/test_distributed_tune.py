"""Many processes tuning one study: every schedule measured once, the budget met exactly.

Real processes (started at one instant, behind a barrier) share a journal file, a SQLite file
or a database on a real PostgreSQL server (``pg_url``) and run ``tune_bucket`` with the real
Optuna storages, samplers and claim protocol. The backend under test is the torch reference
itself (the gate passes) with a short sleep standing in for a compile, so that trials overlap
the way real ones do; ``test_two_cli_tunes_share_a_journal`` runs the real ``twilightc tune``
with the TVM backend twice at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from twilight.runtime.tuning.claims import counts, retried
from twilight.runtime.tuning.storage import open_storage

pytestmark = pytest.mark.slow

WORKER = r"""
import sys, time, random
from pathlib import Path
import twilight as tw
from twilight.compiler.backend import Backend, Target, register_backend
from twilight.runtime.evaluation.reference import reference
from twilight.runtime.store.tuning_log import ShapeBucket
from twilight.runtime.tuning.tuner import TuneConfig, tune_bucket, open_storage
from twilight.schedules.devices import PROFILES
from twilight.schedules.space import Param, Space

SPACE = Space("toy", (Param("a", (1, 2, 3, 4), 1), Param("b", ("x", "y", "z"), "x"),
                      Param("c", (0, 1), 0, when=(("b", ("x", "y")),))))

class Run:  # the stages a served step calls (DecodePipeline.run), answering as the reference
    artifacts = []
    def __init__(self, p):
        self.ref = reference(p)
    def plan(self, batch, tokens):
        pass
    def select(self, x):
        return None, None
    def attend(self, x, idx, cnt):
        return self.ref.run(x.q, x.cache, x.ids)

@register_backend
class SlowReference(Backend):
    name = "slow_reference"
    def supports(self, target): return True
    def serving_target(self, device): return Target("llvm")
    def complete(self, schedule): return SPACE.complete(schedule)
    def version_stamp(self): return {}
    def space(self, p, shape, target): return SPACE
    def lower(self, p, shape, schedule, target):
        time.sleep(random.uniform(0.02, 0.15))  # a compile takes a while: trials overlap
        return Run(p)

storage_spec, trials, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
pipe = tw.builtins.quest_top_k(budget=32)
cfg = TuneConfig(pipe.ir, tw.Shape(2, 1, 16, 16, "float32"), [ShapeBucket(1, 64)],
                 "slow_reference", PROFILES["cpu"], trials=trials, repeats=1,
                 storage=storage_spec)
storage = open_storage(storage_spec, Path(storage_spec))
while not go.exists():
    time.sleep(0.01)
tune_bucket(cfg, cfg.buckets[0], SPACE, storage)
"""


def _run_workers(tmp_path, spec: str, processes: int, trials: int):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    go = tmp_path / "go"
    env = {**os.environ, "TWILIGHT_DATA_DIR": str(tmp_path / "data")}
    procs = [subprocess.Popen([sys.executable, str(script), spec, str(trials), str(go)],
                              env=env, stderr=subprocess.PIPE) for _ in range(processes)]
    time.sleep(1.0)  # let them import; they start together once 'go' exists
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()[-3000:]
    storage = open_storage(spec, tmp_path / "x")
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def _check(trials, budget: int) -> None:
    gone = retried(trials)
    counted = [t for t in trials if counts(t, gone)]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len(counted) == budget, [(t.number, t.state, t.user_attrs) for t in trials]
    keys = [json.dumps(t.params, sort_keys=True) for t in counted]
    assert len(set(keys)) == len(keys), "a schedule was measured twice"
    workers = {t.user_attrs.get("worker") for t in counted}
    assert len(workers) >= 2  # the budget was shared, not done by one process


def test_four_processes_sharing_a_journal_split_the_budget(tmp_path):
    _check(_run_workers(tmp_path, str(tmp_path / "s.journal"), 4, trials=10), 10)


def test_two_processes_sharing_sqlite_split_the_budget(tmp_path):
    _check(_run_workers(tmp_path, str(tmp_path / "s.db"), 2, trials=10), 10)


def test_three_processes_sharing_postgresql_split_the_budget(tmp_path, pg_url):
    _check(_run_workers(tmp_path, pg_url, 3, trials=10), 10)


def test_budget_larger_than_the_space_measures_each_schedule_once(tmp_path):
    # a: 4 × (b=x: 2 c, b=y: 2 c, b=z: no c) = 20 schedules; 30 asked, 20 measured, none twice
    trials = _run_workers(tmp_path, str(tmp_path / "s.journal"), 2, trials=30)
    gone = retried(trials)
    counted = [t for t in trials if counts(t, gone)]
    assert len({json.dumps(t.params, sort_keys=True) for t in counted}) == len(counted) == 20


def test_two_cli_tunes_share_a_study(tmp_path, request):
    """The real 'twilightc tune' (TVM on the CPU) twice at once, --trials 4 each: 4 trials in
    all, none repeated, both exit 0; a password in the URL appears nowhere. On the PostgreSQL
    server when there is one (its URL has a password), else on a journal file."""
    spec = request.getfixturevalue("pg_url") if os.environ.get("TWILIGHT_TEST_PG_URL") \
        else str(tmp_path / "s.journal")
    env = {**os.environ, "TWILIGHT_DATA_DIR": str(tmp_path / "data"),
           "TWILIGHT_TUNING_LOGS": str(tmp_path / "logs"), "TWILIGHT_CACHE_DIR":
           str(tmp_path / "cache")}
    args = [sys.executable, "-m", "twilight.cli", "tune", "--gpu", "cpu", "--pipeline",
            "quest_twilight(budget=64)", "--head-shape", "q_heads=2,kv_heads=1,head_dim=16,"
            "dtype=float32", "--shapes", "1x128", "--trials", "4", "--repeats", "2",
            "--storage", spec]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    storage = open_storage(spec, tmp_path / "x")
    # the pipeline's study (its dense fallback's is there too, tuned after it)
    (name,) = [n for n in optuna.get_all_study_names(storage) if n.startswith("quest_twilight")]
    _check(optuna.load_study(study_name=name, storage=storage).get_trials(), 4)
    log = (tmp_path / "logs" / "cpu" / "quest_twilight.json").read_text()
    password = spec.partition("://")[2].partition("@")[0].partition(":")[2]
    if password:
        assert "***" in log and all("***" in o for o in outs)
        assert password not in log and not any(password in o for o in outs)
