"""Where studies live: a journal file, SQLite, or a database server many machines share.

``open_storage(spec)`` turns what a user wrote after ``--storage`` into an Optuna storage and
every way that can fail into one :class:`StorageError` line. Three promises:

* **credentials never leave**: ``redact(spec)`` is what is printed, logged and written into
  tuning logs (``postgresql://tw:***@db/tune``); error messages are redacted too;
* ``postgresql://`` works with whichever driver is installed (SQLAlchemy 2.1 maps the bare
  scheme to psycopg 3; with only psycopg2 installed the URL is pointed at it);
* a journal cut mid-line (a killed writer, a full disk) or holding a garbled line still opens:
  :class:`TolerantJournalFileBackend` skips such lines with a :class:`JournalDamageWarning`,
  and terminates a torn last line before appending, so that later records are not glued to it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import optuna.storages
from optuna.storages.journal import JournalFileBackend

from ...errors import TwilightError

__all__ = ["JournalDamageWarning", "StorageError", "TolerantJournalFileBackend", "is_url",
           "open_storage", "redact", "storage_exists"]

_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")
# what to install for a database with no driver: the package names pip knows
_DRIVERS = {"postgresql": "'psycopg[binary]' (or psycopg2-binary)", "mysql": "PyMySQL",
            "mariadb": "PyMySQL"}


class StorageError(TwilightError):
    """A study storage that cannot be opened (missing driver, unreachable server, bad path)."""


class JournalDamageWarning(UserWarning):
    """A journal line that is not a whole record (torn by a kill, garbled) was skipped."""


# ---- redaction ------------------------------------------------------------------------------
_NETLOC_SECRET = re.compile(r"^([A-Za-z][\w+.-]*://[^/@:?#]*):[^/?#]*@")
_QUERY_SECRET = re.compile(r"(?i)\b(password|passwd|pwd|sslpassword)=[^&;#]*")


def redact(spec: str | os.PathLike | None) -> str:
    """``spec`` with any password replaced by ``***`` (URLs' ``user:password@`` and
    ``password=`` query parameters); paths come back unchanged.

    >>> redact("postgresql://tw:s3cret@db:5432/tune?sslmode=require&password=x")
    'postgresql://tw:***@db:5432/tune?sslmode=require&password=***'
    """
    text = os.fspath(spec) if spec is not None else ""
    return _QUERY_SECRET.sub(r"\1=***", _NETLOC_SECRET.sub(r"\1:***@", text))


def _scrub(message: str, spec: str) -> str:
    """An error message with the secret parts of ``spec`` cut out, first line only."""
    secrets = [m.group(0).split(":", 2)[-1][:-1] for m in _NETLOC_SECRET.finditer(spec)]
    secrets += [m.group(0).split("=", 1)[1] for m in _QUERY_SECRET.finditer(spec)]
    message = message.replace(spec, redact(spec))
    for s in filter(None, secrets):
        message = message.replace(s, "***")
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return lines[0] if lines else message


# ---- opening ----------------------------------------------------------------------------------
def is_url(spec: str) -> bool:
    return "://" in spec


def _path_of(spec: str) -> Path:
    return Path(spec.removeprefix("journal:")).expanduser()


def storage_exists(spec: str) -> bool | None:
    """Whether a file storage exists already (``None`` for a server: ask the server)."""
    if is_url(spec) and not spec.startswith("sqlite:///"):
        return None
    return Path(spec.removeprefix("sqlite:///") if is_url(spec) else _path_of(spec)).exists()


def open_storage(spec: str | None, default_path: Path):
    """``None`` → a journal file at ``default_path``; ``PATH.journal`` (or any other path,
    ``journal:PATH``) → that journal file; ``PATH.db``/``sqlite:///PATH``,
    ``postgresql://…``, ``mysql://…`` → an RDB storage with heartbeats, so trials of a dead
    worker are failed and retried. Every failure is a :class:`StorageError` naming the storage
    (redacted)."""
    spec = os.fspath(spec) if spec else os.fspath(default_path)
    if is_url(spec) or spec.endswith(_SQLITE_SUFFIXES):
        url = spec if is_url(spec) else f"sqlite:///{Path(spec).expanduser().resolve()}"
        return _open_rdb(url, spec)
    path = _path_of(spec)
    _make_parent(path, spec)
    if path.is_dir():
        raise StorageError(f"--storage {spec}: is a directory; name a journal file in it, "
                           f"e.g. {path / 'tune.journal'}")
    try:
        return optuna.storages.JournalStorage(TolerantJournalFileBackend(str(path)))
    except OSError as e:
        raise StorageError(f"--storage {spec}: cannot open the journal file "
                           f"({e.strerror or e})") from None


def _make_parent(path: Path, spec: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"--storage {redact(spec)}: cannot create the folder {path.parent} "
                           f"({e.strerror or e})") from None


def _open_rdb(url: str, spec: str):
    scheme = url.partition("://")[0].lower()
    dialect = scheme.partition("+")[0]
    if dialect not in _RDB_SCHEMES:
        raise StorageError(f"--storage {redact(spec)}: unknown storage scheme {scheme!r}; use a "
                           "journal file path, sqlite:///PATH, postgresql://… or mysql://…")
    if dialect == "sqlite":
        _make_parent(Path(url.removeprefix("sqlite:///")), spec)
    url = _with_installed_driver(url, spec)
    try:
        return _rdb_storage(url)
    except ImportError as e:
        raise StorageError(f"--storage {redact(spec)}: {_scrub(str(e), url)} "
                           f"(pip install {_DRIVERS.get(dialect, 'the database driver')})") \
            from None
    except Exception as e:  # sqlalchemy's OperationalError, ArgumentError, a driver's own
        cause = _scrub(str(getattr(e, "orig", None) or e), url)
        if type(e).__name__ == "OperationalError":
            raise StorageError(f"--storage {redact(spec)}: cannot connect: {cause}") from None
        raise StorageError(f"--storage {redact(spec)}: cannot open ({type(e).__name__}: "
                           f"{cause})") from None


def _rdb_storage(url: str, attempts: int = 5):
    """An RDBStorage; processes that open a new database at once race to create its tables
    (one gets "already exists", SQLite "database is locked"): the loser tries again."""
    sqlite = url.startswith("sqlite")
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url, heartbeat_interval=30, grace_period=120,
                    heartbeat_stale_trial_callback=optuna.storages.
                    RetryHeartbeatStaleTrialCallback(max_retry=1),
                    # the driver leaves transactions to SQLAlchemy (see _serialize_sqlite)
                    engine_kwargs={"connect_args": {"timeout": 60, "isolation_level": None}}
                    if sqlite else None)
            if sqlite:
                _serialize_sqlite(storage.engine)
            return storage
        except Exception as e:
            racing = any(s in str(e).lower() for s in ("already exists", "database is locked",
                                                        "unique constraint"))
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.2)
    raise AssertionError("unreachable")


def _serialize_sqlite(engine) -> None:
    """Every SQLite transaction takes the write lock when it begins (``BEGIN IMMEDIATE``).

    Optuna pops a waiting trial by reading it ``FOR UPDATE`` and then marking it running;
    SQLite ignores ``FOR UPDATE`` and Python's driver begins a transaction only at the first
    write, so two processes could both pop one enqueued trial and measure it twice (one then
    fails with "Cannot tell a COMPLETE trial"). SQLAlchemy's recipe for SQLite: the driver
    in autocommit mode (``isolation_level=None``) and an explicit BEGIN on each transaction."""
    from sqlalchemy import event

    event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))


def _with_installed_driver(url: str, spec: str) -> str:
    """``postgresql://`` → the driver present: psycopg 3 (SQLAlchemy's default for the bare
    scheme) or else psycopg2; neither is a StorageError saying what to install."""
    scheme, sep, rest = url.partition("://")
    if scheme.lower() not in ("postgresql", "postgres"):
        return url
    for module, name in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{name}{sep}{rest}"
    raise StorageError(f"--storage {redact(spec)}: no PostgreSQL driver is installed "
                       f"(pip install {_DRIVERS['postgresql']})")


# ---- a journal that survives a torn or garbled line ----------------------------------------
class TolerantJournalFileBackend(JournalFileBackend):
    """Optuna's journal file, read leniently: a line that is not one whole JSON record is
    skipped with a warning (once per line) instead of stopping every later reader; a last
    line with no newline is left unread (a writer may still be writing it). Before appending,
    under the journal's lock, a torn last line is terminated, so new records start clean.

    Skipped lines take no log number: every reader of the file skips the same lines, so log
    numbers (which Optuna replays by) agree between processes."""

    def __init__(self, file_path: str, lock_obj=None) -> None:
        super().__init__(file_path, lock_obj)
        self._warned: set[int] = set()

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        start = max((n for n in self._log_number_offset if n <= log_number_from), default=0)
        offset = self._log_number_offset[start]
        with open(self._file_path, "rb") as f:
            f.seek(offset)
            number = start
            for line in f:
                if not line.endswith(b"\n"):
                    return  # a torn tail, or one being written: not a record (yet)
                line_at, offset = offset, offset + len(line)
                record = self._decode(line, line_at)
                if record is None:
                    continue
                number += 1
                self._log_number_offset[number] = offset
                if number - 1 >= log_number_from:
                    yield record

    def _decode(self, line: bytes, at: int) -> dict | None:
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            why = f"{type(e).__name__}"
        else:
            if isinstance(record, dict) and isinstance(record.get("op_code"), int) \
                    and "worker_id" in record:
                return record
            why = "not an Optuna journal record"
        if at not in self._warned:
            self._warned.add(at)
            warnings.warn(f"study journal {self._file_path}: skipped a damaged line at byte "
                          f"{at} ({why}; a writer killed mid-line or a full disk leaves one)",
                          JournalDamageWarning, stacklevel=2)
        return None

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
        self._lock.acquire()
        try:
            with open(self._file_path, "ab+") as f:
                if f.seek(0, os.SEEK_END) > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a torn line of a dead writer: close it off
                        text = "\n" + text
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        finally:
            self._lock.release()
