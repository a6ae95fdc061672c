"""Fixtures of the tuner tests: a fresh database on the PostgreSQL server CI starts.

``.ci/run`` starts a real server with ``.ci/postgres.sh start`` and passes its URL in
``TWILIGHT_TEST_PG_URL``; a developer does the same by hand. Without that variable the tests
that need the server are skipped, saying so.
"""

from __future__ import annotations

import os
import uuid

import pytest

PG_ENV = "TWILIGHT_TEST_PG_URL"


@pytest.fixture()
def pg_url():
    """The URL of a new, empty database on the test server (dropped afterwards)."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"no PostgreSQL server: set {PG_ENV} "
                    "(export TWILIGHT_TEST_PG_URL=$(.ci/postgres.sh start))")
    psycopg = pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]'")
    name = f"tw_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    head, _, _ = base.rpartition("/")
    yield f"{head}/{name}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
