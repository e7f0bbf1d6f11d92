"""Behind PgBouncer (issue #14): what holds through a transaction-pooling PgBouncer, and
what needs session pooling or a direct connection.

Each test starts Debian's ``pgbouncer`` (``apt-get install pgbouncer``) in front of its
test database, listening on a unix socket in a directory of its own, with two aliases:
``tx`` (pool_mode=transaction) and ``session`` (pool_mode=session). PgBouncer refuses to
run as root, so as root it runs as the user the test server runs as. Without the binary
the tests are skipped.

What holds through transaction pooling: enqueueing from Python (in the caller's
transaction, or on the process's own connection) and from SQL. What does not: workers,
supervisors and schedulers, which LISTEN, keep session settings and are cleaned up by
server session; they need session pooling or a direct DSN.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from contextlib import suppress
from pathlib import Path
from urllib.parse import quote

import jobs_hardening as jh
import psycopg2
import pytest
from jobs_faults import idle_listening_workers
from psycopg2.extensions import parse_dsn

import underway
from underway.db import connect_bounded
from underway.errors import ConfigurationError
from underway.worker import Worker

from .helpers import Supervisor, scalar, wait_until


def _pgbouncer() -> str | None:
    """The pgbouncer binary (Debian puts it in /usr/sbin, not on every user's PATH)."""
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )


class Bouncer:
    """A PgBouncer process in front of one database; ``dsn(alias)`` connects through it."""

    PORT = 6439

    def __init__(self, binary: str, target_dsn: str, run_as: str | None, pool_size: int) -> None:
        target = parse_dsn(target_dsn)
        self.dir = Path(tempfile.mkdtemp(prefix="underway-pgbouncer-"))
        self.log = self.dir / "pgbouncer.log"
        server = f"host={target['host']} dbname={target['dbname']} user={target['user']}"
        (self.dir / "users.txt").write_text(f'"{target["user"]}" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"tx = {server} pool_mode=transaction\n"
            f"session = {server} pool_mode=session\n"
            "[pgbouncer]\n"
            f"unix_socket_dir = {self.dir}\n"
            f"listen_port = {self.PORT}\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'users.txt'}\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 100\n"
            f"logfile = {self.log}\n"
            f"pidfile = {self.dir / 'pgbouncer.pid'}\n"
            "ignore_startup_parameters = extra_float_digits\n"
        )
        args = [binary]
        if run_as is not None:
            user = pwd.getpwnam(run_as)
            for path in [self.dir, *self.dir.iterdir()]:
                os.chown(path, user.pw_uid, user.pw_gid)
            args += ["-u", run_as]
        self.dir.chmod(0o755)
        self.user = target["user"]
        self.proc = subprocess.Popen(
            [*args, str(self.dir / "pgbouncer.ini")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._ready, timeout=10, message=f"pgbouncer up: {self.output()}")

    def dsn(self, alias: str) -> str:
        """A DSN for database ``alias`` (``tx`` or ``session``) through this PgBouncer."""
        return f"postgresql://{self.user}@/{alias}?host={quote(str(self.dir))}&port={self.PORT}"

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"pgbouncer exited: {self.output()}"
        try:
            psycopg2.connect(self.dsn("session"), connect_timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True

    def output(self) -> str:
        """PgBouncer's log so far."""
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the process this fixture started, and remove its directory."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # PgBouncer's immediate shutdown
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        with suppress(OSError):
            shutil.rmtree(self.dir)


def _start(pg_server, dsn, pool_size):
    binary = _pgbouncer()
    if binary is None:
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    run_as = None
    if os.geteuid() == 0:
        # PgBouncer will not run as root: run it as the test server's user.
        run_as = pg_server.system_user or "nobody"
    return Bouncer(binary, dsn, run_as, pool_size)


@pytest.fixture
def bouncer(pg_server, dsn):
    """A PgBouncer in front of this test's database, with room for 4 server connections
    per pool."""
    jh.prepare(dsn)
    started = _start(pg_server, dsn, pool_size=4)
    yield started
    started.close()


@pytest.fixture
def tiny_bouncer(pg_server, dsn):
    """A PgBouncer whose pools have a single server connection, shared by every client."""
    started = _start(pg_server, dsn, pool_size=1)
    yield started
    started.close()


def _backend_pid(conn) -> int:
    """The server session's pid (for a bounded connection too, which runs asynchronously)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        settle = getattr(conn, "settle", None)
        if settle is not None:
            settle()
        return cur.fetchone()[0]


# -- what holds ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_enqueue_through_transaction_pooling(dsn, bouncer):
    """Through a transaction-pooling PgBouncer, tasks enqueued from Python in the caller's
    transaction exist once it commits and not when it rolls back; enqueue_many, enqueues
    on the process's own connection and underway.enqueue from SQL work; a worker on a
    direct connection runs them all."""
    conn = psycopg2.connect(bouncer.dsn("tx"))
    try:
        with conn:
            ids = [jh.echo.enqueue({"in": "transaction"}, conn=conn).id]
            ids += [t.id for t in jh.echo.enqueue_many([{"n": 1}, {"n": 2}], conn=conn)]
        rolled_back = jh.echo.enqueue({"in": "rolled back"}, conn=conn).id
        conn.rollback()
        with conn, conn.cursor() as cur:
            cur.execute("SELECT underway.enqueue('hardening-echo', '{\"from\": \"sql\"}')")
            ids.append(cur.fetchone()[0])
    finally:
        conn.close()
    underway.configure(dsn=bouncer.dsn("tx"))
    ids += [jh.echo.enqueue({"own": n}).id for n in range(3)]
    underway.configure(dsn=dsn)
    assert scalar(dsn, "SELECT count(*) FROM underway.task WHERE id = %s", (rolled_back,)) == 0

    worker = Worker(dsn, {jh.echo.name: jh.echo})
    try:
        while worker.run_once():
            pass
    finally:
        worker.disconnect()
    assert sorted(task for task, _, _ in jh.effects(dsn)) == sorted(ids)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_supervisor_runs_through_session_pooling(dsn, bouncer):
    """A supervisor (two workers and the scheduler) given a session-pooling PgBouncer runs
    every task, woken by LISTEN/NOTIFY through it (the poll interval is 30 s), and stops
    cleanly."""
    with Supervisor(
        ["jobs_hardening"], bouncer.dsn("session"), ["--workers", "2", "--poll-interval", "30"]
    ) as sup:
        wait_until(lambda: len(sup.worker_pids()) == 3, message=repr(sup))
        wait_until(
            lambda: len(idle_listening_workers(dsn)) == 2, message=f"two idle workers: {sup!r}"
        )
        ids = [t.id for t in jh.echo.enqueue_many([{"n": n} for n in range(10)])]
        wait_until(
            lambda: sorted(task for task, _, _ in jh.effects(dsn)) == ids,
            timeout=5,
            message=f"tasks run at once: {sup!r}",
        )
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup


# -- what does not -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_worker_whose_statements_land_in_two_sessions_stops_with_an_error(dsn, bouncer):
    """A worker behind transaction pooling stops with a ConfigurationError that names
    transaction pooling and says what DSN to give: at connect, or, if its statements reach
    two server sessions later (its first server connection taken by another client of the
    pool meanwhile), when it next waits."""
    worker = Worker(bouncer.dsn("tx"), {jh.echo.name: jh.echo})
    other = psycopg2.connect(bouncer.dsn("tx"))
    try:
        with pytest.raises(ConfigurationError) as stopped:
            worker.connect()
            with other.cursor() as cur:  # begins a transaction: holds a server connection
                cur.execute("SELECT pg_backend_pid()")
                assert cur.fetchone()[0] == worker.backend_pid
            worker.wait()
    finally:
        other.close()
        worker.disconnect()
    message = str(stopped.value)
    assert "pool_mode=transaction" in message and "direct or session-pooled DSN" in message


@pytest.mark.timeout(60)
def test_worker_behind_transaction_pooling_is_refused_when_it_connects(dsn, bouncer):
    """A worker given a transaction-pooling DSN is refused when it connects, before it
    relies on LISTEN and on being cleaned up by session, even while no other client
    shares the pool."""
    worker = Worker(bouncer.dsn("tx"), {jh.echo.name: jh.echo})
    try:
        with pytest.raises(ConfigurationError):
            worker.connect()
            worker.wait()
    finally:
        worker.disconnect()


@pytest.mark.timeout(60)
def test_bounded_connection_leaves_no_setting_on_a_transaction_pool(dsn, tiny_bouncer):
    """A supervisor's or scheduler's connection through a transaction-pooling PgBouncer is
    refused, or at least leaves no session setting behind for the application's own
    clients of the pool (one server connection, shared)."""
    try:
        bounded = connect_bounded(tiny_bouncer.dsn("tx"), application_name="probe", timeout=5)
    except ConfigurationError:
        return
    app = psycopg2.connect(tiny_bouncer.dsn("tx"))
    app.autocommit = True
    try:
        assert _backend_pid(app) == _backend_pid(bounded)
        with app.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "0"
    finally:
        app.close()
        bounded.close()
