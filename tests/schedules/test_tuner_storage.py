"""Study storage and resumption, without a backend: URL handling, the SQLite RDB path,
journal files, and recovery of trials whose worker died."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

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


def test_postgres_url_goes_to_rdb_storage(tmp_path):
    """No server listens on port 1: the URL must reach SQLAlchemy's PostgreSQL dialect, which
    either lacks its driver (a clear error naming the package) or fails to connect."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        with pytest.raises(StorageError, match="psycopg2-binary"):
            open_storage("postgresql://tw:pw@127.0.0.1:1/db", tmp_path / "d.journal")
    else:
        with pytest.raises(Exception, match="(?i)connect"):
            open_storage("postgresql://tw:pw@127.0.0.1:1/db", tmp_path / "d.journal")


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
