"""Shared fixtures: one PostgreSQL per test session, one fresh database per test.

Databases are cloned from a session-wide template that has the library schema applied once,
which is much faster than migrating every test database. ``tests/`` is put on ``sys.path`` so
test job modules (``tests/jobs_*.py``) import by plain name here just as in worker subprocesses.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import psutil
import psycopg2
import pytest
from psycopg2.extensions import connection as PgConnection

from .helpers import TESTS_DIR, describe, in_process_workers, leaked_processes
from .pgtest import PgTestServer

if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

#: ``$DATABASE_URL`` picks the server to test against. It is taken out of the environment so the
#: library (which falls back to it) behaves the same here and in subprocesses whichever server is
#: used: tests pass DSNs explicitly, and set DATABASE_URL themselves to test that fallback.
EXTERNAL_DATABASE_URL = os.environ.pop("DATABASE_URL", None)

#: Per-test timeout (seconds) unless the test has its own ``@pytest.mark.timeout`` or one is
#: given on the command line / PYTEST_TIMEOUT / ini.
DEFAULT_TEST_TIMEOUT = 120

#: How long a test's child processes may take to exit after the test before they count as leaked.
LEAK_GRACE_SECONDS = 3.0


def pytest_configure(config: pytest.Config) -> None:
    """Register our markers (so ``--strict-markers`` and ``-m`` work)."""
    config.addinivalue_line("markers", "slow: takes several seconds (deselect with -m 'not slow')")
    config.addinivalue_line(
        "markers", "fault: injects failures (killed processes, dropped connections, restarts)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every test without its own timeout marker the default timeout."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    explicit = (
        config.getoption("timeout", None) is not None
        or os.environ.get("PYTEST_TIMEOUT")
        or config.getini("timeout")
    )
    if explicit:
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT))


def _new_db_name() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


def _reset_library() -> None:
    """``underway.configure(dsn=None)`` if the library is loaded (never import it just for this)."""
    underway = sys.modules.get("underway")
    configure = getattr(underway, "configure", None)
    if configure is not None:
        configure(dsn=None)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgTestServer]:
    """The session's PostgreSQL server (``$DATABASE_URL`` or a private pgserver instance)."""
    server = PgTestServer.start(EXTERNAL_DATABASE_URL)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def template_db(pg_server: PgTestServer) -> Iterator[str]:
    """Name of a database holding the library schema (``underway.run_migrations``), to clone."""
    import underway

    name = "underway_template"
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        name += f"_{worker}"
    pg_server.ensure_running()
    pg_server.drop_database(name)
    dsn = pg_server.create_database(name)
    underway.run_migrations(dsn)
    # Nobody may stay connected to a template while it is being cloned.
    pg_server.terminate_backends(name)
    yield name
    pg_server.ensure_running()
    pg_server.drop_database(name)


@pytest.fixture
def dsn(pg_server: PgTestServer, template_db: str) -> Iterator[str]:
    """DSN of a fresh, migrated database for this test; ``underway`` is configured to use it."""
    import underway

    pg_server.ensure_running()
    name = _new_db_name()
    test_dsn = pg_server.create_database(name, template=template_db)
    underway.configure(dsn=test_dsn)
    try:
        yield test_dsn
    finally:
        try:
            underway.configure(dsn=None)
        finally:
            pg_server.ensure_running()
            pg_server.drop_database(name)


@pytest.fixture
def empty_dsn(pg_server: PgTestServer) -> Iterator[str]:
    """DSN of a fresh database without the library schema (``underway`` is not configured).

    If the test configures the library itself, it is reset to ``dsn=None`` afterwards.
    """
    pg_server.ensure_running()
    name = _new_db_name()
    test_dsn = pg_server.create_database(name)
    try:
        yield test_dsn
    finally:
        try:
            _reset_library()
        finally:
            pg_server.ensure_running()
            pg_server.drop_database(name)


@pytest.fixture
def conn(dsn: str) -> Iterator[PgConnection]:
    """An autocommit psycopg2 connection to this test's database."""
    connection = psycopg2.connect(dsn, connect_timeout=10)
    connection.autocommit = True
    try:
        yield connection
    finally:
        connection.close()


def _is_postgres_server(proc: psutil.Process) -> bool:
    """Our PostgreSQL server processes are started detached by pg_ctl; never count them."""
    return proc.name() in ("postgres", "pg_ctl")


@pytest.fixture(autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves subprocesses running (they are killed first).

    Checks pytest's descendants and orphans tagged by ``tests.helpers`` (e.g. the workers of a
    SIGKILLed supervisor), allowing a short grace period for processes that are exiting.
    """
    before = {p.pid for p in leaked_processes(ignore=_is_postgres_server)}
    yield
    deadline = time.monotonic() + LEAK_GRACE_SECONDS
    leftovers = leaked_processes(since=before, ignore=_is_postgres_server)
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.05)
        leftovers = leaked_processes(since=before, ignore=_is_postgres_server)
    if not leftovers:
        return
    descriptions = [describe(p) for p in leftovers]
    for p in leftovers:
        with suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(leftovers, timeout=10)
    pytest.fail(
        "test left processes running (now killed):\n  " + "\n  ".join(descriptions),
        pytrace=False,
    )


@pytest.fixture
def adsn(dsn: str) -> str:
    """The test database, with the tables the api jobs (``jobs_api``) write to."""
    import jobs_api

    from .helpers import query

    query(dsn, jobs_api.DDL)
    return dsn


@pytest.fixture
def make_worker(adsn: str) -> Iterator[Any]:
    """In-process workers on this test's database, of the api jobs unless told which."""
    import jobs_api

    with in_process_workers(adsn, jobs_api.IN_PROCESS) as make:
        yield make


@pytest.fixture
def cur(adsn: str) -> Iterator[Any]:
    """A cursor on an autocommit connection, for upkeep units' run_once."""
    conn = psycopg2.connect(adsn)
    conn.autocommit = True
    try:
        with conn.cursor() as c:
            yield c
    finally:
        conn.close()


@pytest.fixture
def fdsn(dsn: str) -> str:
    """The test database, with the effects table the fault jobs write to."""
    import jobs_faults

    jobs_faults.prepare(dsn)
    return dsn


@pytest.fixture
def gate(fdsn: str) -> Iterator[Any]:
    """Advisory locks held by the test; ``faults-block`` steps wait for them."""
    from jobs_faults import Gate

    g = Gate(fdsn)
    yield g
    g.close()
