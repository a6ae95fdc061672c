"""Study storage and resumption, without a backend: URL handling, the SQLite RDB path,
journal files, and recovery of trials whose worker died."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from twilight.runtime.tuning.storage import JournalDamageWarning, redact
from twilight.runtime.tuning.tuner import (
    StorageError,
    finished_count,
    open_storage,
    recover_stale_trials,
)


@pytest.mark.parametrize("spec, kind", [
    ("{tmp}/s.journal", "JournalStorage"),
    ("journal:{tmp}/s2.journal", "JournalStorage"),
    ("{tmp}/s.db", "RDBStorage"),
    ("sqlite:///{tmp}/s3.db", "RDBStorage"),
])
def test_storage_specs(tmp_path, spec, kind):
    storage = open_storage(spec.format(tmp=tmp_path), tmp_path / "default.journal")
    assert type(storage).__name__ == kind
    study = optuna.create_study(study_name="x", storage=storage)
    study.optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=3)
    again = optuna.load_study(study_name="x", storage=open_storage(spec.format(tmp=tmp_path),
                                                                   tmp_path / "d.journal"))
    assert len(again.trials) == 3


def test_default_storage_is_a_journal_file(tmp_path):
    storage = open_storage(None, tmp_path / "sub" / "tune.journal")
    optuna.create_study(study_name="y", storage=storage).optimize(
        lambda t: t.suggest_int("a", 0, 3), n_trials=2)
    assert (tmp_path / "sub" / "tune.journal").stat().st_size > 0


def test_unreachable_server_is_one_redacted_line(tmp_path):
    """No server listens on port 1: one line that names the storage without its password."""
    with pytest.raises(StorageError) as err:
        open_storage("postgresql://tw:hunter2@127.0.0.1:1/db", tmp_path / "d.journal")
    text = str(err.value)
    assert "cannot connect" in text and "tw:***@127.0.0.1:1/db" in text
    assert "hunter2" not in text and "\n" not in text


@pytest.mark.parametrize("spec, why", [
    ("{tmp}/file/s.journal", "cannot create the folder"),  # 'file' is a file
    ("{tmp}", "is a directory"),
    ("{tmp}/file/s.db", "cannot create the folder"),
    ("mongodb://h/x", "unknown storage scheme"),
])
def test_unusable_storage_is_one_line(tmp_path, spec, why):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=why):
        open_storage(spec.format(tmp=tmp_path), tmp_path / "d.journal")


def test_redact_hides_every_password():
    assert redact("postgresql://tw:s3cret@db:5432/tune") == "postgresql://tw:***@db:5432/tune"
    assert redact("postgresql+psycopg2://tw:p%40ss:w@db/t") == "postgresql+psycopg2://tw:***@db/t"
    assert redact("postgresql://db/t?user=tw&password=s3cret&sslmode=require") == \
        "postgresql://db/t?user=tw&password=***&sslmode=require"
    assert redact("postgresql://tw@db/t") == "postgresql://tw@db/t"  # nothing to hide
    assert redact("/data/studies/x.journal") == "/data/studies/x.journal"


def _roundtrip(url: str) -> None:
    storage = open_storage(url, None)
    study = optuna.create_study(study_name="pg", storage=storage, load_if_exists=True)
    study.optimize(lambda t: t.suggest_int("a", 0, 9), n_trials=2)
    assert len(optuna.load_study(study_name="pg", storage=open_storage(url, None)).trials) >= 2


def test_postgresql_url_works_with_psycopg3(pg_url):
    pytest.importorskip("psycopg")
    _roundtrip(pg_url)


def test_postgresql_url_falls_back_to_psycopg2(pg_url, monkeypatch):
    """With only psycopg2 installed, a bare postgresql:// URL goes to it (SQLAlchemy 2.1 alone
    would ask for psycopg 3); the module is hidden here, the server and driver are real."""
    pytest.importorskip("psycopg2")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "psycopg" else real(name, *a))
    _roundtrip(pg_url)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(StorageError, match=r"pip install 'psycopg\[binary\]'"):
        open_storage(pg_url, None)


def test_wrong_password_is_one_redacted_line(pg_url):
    user, _, rest = pg_url.partition("://")[2].partition(":")
    bad = f"postgresql://{user}:not-the-password{rest[rest.index('@'):]}"
    with pytest.raises(StorageError) as err:
        open_storage(bad, None)
    assert "not-the-password" not in str(err.value) and "***" in str(err.value)


# ---- journals that a kill or a full disk cut short ------------------------------------------
def _study(path, n: int = 0):
    study = optuna.create_study(study_name="j", storage=open_storage(str(path), path),
                                load_if_exists=True)
    study.optimize(lambda t: t.suggest_int("a", 0, 99), n_trials=n)
    return study


@pytest.mark.parametrize("damage", [
    b'{"op_code": 5, "worker_id": "w", "trial_id": 0, "param_na',  # cut mid-line (a kill)
    b"\xff\xfe\x00garbage\n",  # not UTF-8
    b"[1, 2, 3]\n",  # JSON, not a record
    b'{"op_code": 4\n',  # a truncated record that got a newline
])
def test_damaged_journal_line_is_skipped_and_the_study_resumes(tmp_path, damage):
    path = tmp_path / "s.journal"
    _study(path, 3)
    with open(path, "ab") as f:
        f.write(damage)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        study = _study(path, 2)  # reads past the damage, then appends after it
        assert len(study.trials) == 5
        again = _study(path)  # a fresh reader sees the same five, the damage skipped
    assert [t.params for t in again.trials] == [t.params for t in study.trials]
    assert all(t.state == TrialState.COMPLETE for t in again.trials)
    damaged = [w for w in seen if issubclass(w.category, JournalDamageWarning)]
    assert damaged and "skipped a damaged line" in str(damaged[0].message)
    assert path.read_bytes().count(b"\n") == path.read_bytes().rstrip(b"\n").count(b"\n") + 1


_KILLED_WORKER = """
import os, sys, optuna
from optuna.storages.journal import JournalFileBackend
s = optuna.storages.JournalStorage(JournalFileBackend(sys.argv[1]))
study = optuna.load_study(study_name="k", storage=s)
t = study.ask()
t.suggest_categorical("x", [1, 2, 3])
t.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
os._exit(0)  # dies mid-trial, as a killed tune would
"""


def test_trial_of_a_dead_worker_is_failed_and_enqueued_again(tmp_path):
    path = str(tmp_path / "k.journal")
    study = optuna.create_study(study_name="k", storage=open_storage(path, tmp_path / "x"))
    study.optimize(lambda t: t.suggest_categorical("x", [1, 2, 3]), n_trials=2)
    subprocess.run([sys.executable, "-c", _KILLED_WORKER, path], check=True)
    study = optuna.load_study(study_name="k", storage=open_storage(path, tmp_path / "x"))
    running = study.get_trials(states=(TrialState.RUNNING,))
    assert len(running) == 1
    lost = running[0].params
    assert recover_stale_trials(study) == 1
    assert finished_count(study) == 2  # the crashed trial does not count toward the budget
    study.optimize(lambda t: t.suggest_categorical("x", [1, 2, 3]), n_trials=1)
    assert study.trials[-1].params == lost  # retried, not lost
    assert finished_count(study) == 3
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_running_trial_of_a_live_worker_is_left_alone(tmp_path):
    study = optuna.create_study(study_name="l", storage=open_storage(
        str(tmp_path / "l.journal"), tmp_path / "x"))
    t = study.ask()
    import os
    import socket
    t.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    assert recover_stale_trials(study) == 0


_KILLED_AT_START = """
import sys, optuna
from optuna.storages.journal import JournalFileBackend
s = optuna.storages.JournalStorage(JournalFileBackend(sys.argv[1]))
study = optuna.load_study(study_name="u", storage=s)
study._pop_waiting_trial_id()  # what ``ask`` does first; killed before anything more
sys.exit(0)
"""


def test_trial_killed_before_it_named_its_worker_is_recovered_after_the_grace(tmp_path,
                                                                              monkeypatch):
    """A tune killed between Optuna creating (here: popping an enqueued) trial and the trial
    recording its worker leaves a RUNNING trial with no worker and no params: it was left
    RUNNING forever, and its enqueued schedule lost. Past ``UNMARKED_GRACE_S`` it is failed and
    its enqueued schedule queued again; younger, it may be another process's trial being
    created, and is left alone."""
    from twilight.runtime.tuning import tuner
    path = str(tmp_path / "u.journal")
    study = optuna.create_study(study_name="u", storage=open_storage(path, tmp_path / "x"))
    study.enqueue_trial({"x": 2})
    subprocess.run([sys.executable, "-c", _KILLED_AT_START, path], check=True)
    study = optuna.load_study(study_name="u", storage=open_storage(path, tmp_path / "x"))
    (orphan,) = study.get_trials(states=(TrialState.RUNNING,))
    assert orphan.params == {} and "worker" not in orphan.user_attrs
    assert recover_stale_trials(study) == 0  # young: perhaps being created right now
    monkeypatch.setattr(tuner, "UNMARKED_GRACE_S", 0.0)
    assert recover_stale_trials(study) == 1
    assert not study.get_trials(states=(TrialState.RUNNING,))
    study.optimize(lambda t: t.suggest_categorical("x", [1, 2, 3]), n_trials=1)
    assert study.trials[-1].params == {"x": 2}  # the enqueued schedule, not lost
    assert study.trials[-1].user_attrs["retry_of"] == orphan.number


@pytest.mark.parametrize("kind", ["tpe", "random", "grid"])
def test_samplers_mark_the_worker_before_the_objective_runs(tmp_path, kind):
    """The worker is written when the trial is created (the sampler's ``before_trial``), not
    when the objective gets round to it, so the window above is one storage write wide."""
    from twilight.runtime.tuning.tuner import _WORKER, make_sampler
    from twilight.schedules.space import Param, Space
    space = Space("s", (Param("x", (1, 2, 3), 1),))
    study = optuna.create_study(study_name="m", sampler=make_sampler(kind, 0, space),
                                storage=open_storage(str(tmp_path / "m.journal"), tmp_path))
    trial = study.ask()
    assert study.trials[-1].user_attrs["worker"] == _WORKER
    assert trial.suggest_categorical("x", [1, 2, 3]) in (1, 2, 3)


def test_a_synthetic_study_is_named_by_the_synthetic_problems_version(monkeypatch):
    """Trials timed on an older synthetic problem (other keys, other kept counts) must not be
    resumed as if measured on today's: the study name carries ``SYNTHETIC_VERSION``."""
    import twilight as tw
    from twilight.runtime.store.tuning_log import ShapeBucket
    from twilight.runtime.tuning import tuner
    from twilight.schedules.devices import PROFILES
    cfg = tuner.TuneConfig(tw.builtins.quest_twilight().ir, tw.Shape(4, 2, 32), [],
                           "tvm", PROFILES["cpu"])
    name = tuner.study_name(cfg, ShapeBucket(1, 4096))
    assert f"b1_t4096-synthetic{tuner.SYNTHETIC_VERSION}-s" in name
    monkeypatch.setattr(tuner, "SYNTHETIC_VERSION", tuner.SYNTHETIC_VERSION + 1)
    assert tuner.study_name(cfg, ShapeBucket(1, 4096)) != name


def test_a_study_is_named_by_its_schedule_space(monkeypatch):
    """Optuna refuses to resume a study whose categorical choices changed ("does not support
    dynamic value space"), so a release that changes a knob's choices starts new studies."""
    import twilight as tw
    from twilight.compiler.tvm import TVMBackend
    from twilight.runtime.store.tuning_log import ShapeBucket
    from twilight.runtime.tuning import tuner
    from twilight.schedules.devices import PROFILES
    from twilight.schedules.space import Param, Space
    cfg = tuner.TuneConfig(tw.builtins.quest_twilight().ir, tw.Shape(4, 2, 32), [],
                           "tvm", PROFILES["cpu"])
    name = tuner.study_name(cfg, ShapeBucket(1, 4096))
    assert name == tuner.study_name(cfg, ShapeBucket(1, 4096))
    real = TVMBackend.space

    def fewer(self, *a):
        sp = real(self, *a)
        return Space(sp.name, tuple(Param(p.name, p.choices[:1], p.choices[0], p.when)
                                    if p.name == "vector_width" else p for p in sp.params))
    monkeypatch.setattr(TVMBackend, "space", fewer)
    assert tuner.study_name(cfg, ShapeBucket(1, 4096)) != name
