"""Least privilege (issue #14): ``examples/least_privilege.sql`` sets up an owner that
migrates, a worker role that runs supervisors and the admin functions, and an enqueue-only
role; these tests run it with psql on the test server and use each role for real.

The roles are cluster-wide, so each test makes its own (``uw_<tag>_owner`` ...) with a
password login, and drops them afterwards. The server trusts local connections, so the
passwords are not checked here; what is checked is each role's privileges.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass

import jobs_hardening as jh
import psycopg2
import psycopg2.errors
import pytest
from jobs_faults import Gate, task_row
from psycopg2 import sql as pgsql

import underway
from underway import admin
from underway.db import SCHEMA_VERSION

from .helpers import REPO_ROOT, Supervisor, dbname_of, query, scalar, wait_until
from .test_hardening import _alive, _kill_busy_worker

SCRIPT = REPO_ROOT / "examples" / "least_privilege.sql"
PASSWORD = "pw-for-tests"


def _psql() -> str | None:
    """A psql binary: the system's, else the one shipped with pgserver."""
    found = shutil.which("psql")
    if found:
        return found
    try:
        from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError:
        return None
    candidate = os.path.join(str(POSTGRES_BIN_PATH), "psql")
    return candidate if os.path.exists(candidate) else None


@dataclass
class Roles:
    """The three roles of a test, and DSNs to log in as each."""

    admin_dsn: str
    owner: str
    worker: str
    enqueuer: str

    def dsn(self, role: str) -> str:
        """The test database's DSN, logged in as ``role`` with its password."""
        assert self.admin_dsn.startswith("postgresql://postgres@"), self.admin_dsn
        return self.admin_dsn.replace("postgresql://postgres@", f"postgresql://{role}:{PASSWORD}@")

    def run_script(self) -> str:
        """Run examples/least_privilege.sql as the superuser; its output."""
        psql = _psql()
        if psql is None:
            pytest.skip("no psql binary (neither on PATH nor in pgserver)")
        done = subprocess.run(
            [
                psql,
                self.admin_dsn,
                "-X",
                "-q",
                "-v",
                f"owner={self.owner}",
                "-v",
                f"worker={self.worker}",
                "-v",
                f"enqueuer={self.enqueuer}",
                "-f",
                str(SCRIPT),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    def allow_login(self) -> None:
        """Give every role a password login."""
        for role in (self.owner, self.worker, self.enqueuer):
            query(
                self.admin_dsn,
                pgsql.SQL("ALTER ROLE {} LOGIN PASSWORD %s").format(pgsql.Identifier(role)),
                (PASSWORD,),
            )


@pytest.fixture
def roles(pg_server, empty_dsn):
    """Three fresh roles for this test's database; dropped (with all they own and were
    granted) afterwards."""
    tag = uuid.uuid4().hex[:8]
    made = Roles(empty_dsn, f"uw_{tag}_owner", f"uw_{tag}_worker", f"uw_{tag}_enqueue")
    yield made
    names = [made.owner, made.worker, made.enqueuer]
    pg_server.terminate_backends(dbname_of(empty_dsn))
    with pg_server.admin_connection(dbname_of(empty_dsn)) as conn, conn.cursor() as cur:
        for name in names:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
            if cur.fetchone():
                cur.execute(pgsql.SQL("DROP OWNED BY {}").format(pgsql.Identifier(name)))
    with pg_server.admin_connection() as conn, conn.cursor() as cur:
        for name in names:
            cur.execute(pgsql.SQL("DROP ROLE IF EXISTS {}").format(pgsql.Identifier(name)))


def _set_up(roles: Roles) -> None:
    """The three steps of the script's instructions: script, migrations as the owner,
    script again; plus the effects table the test jobs write to, for the worker."""
    roles.run_script()
    roles.allow_login()
    assert underway.run_migrations(roles.dsn(roles.owner)) == list(range(1, SCHEMA_VERSION + 1))
    roles.run_script()
    jh.prepare(roles.admin_dsn)
    for grant in (
        "GRANT SELECT, INSERT ON hardening_effect TO {}",
        "GRANT USAGE ON SEQUENCE hardening_effect_id_seq TO {}",
    ):
        query(roles.admin_dsn, pgsql.SQL(grant).format(pgsql.Identifier(roles.worker)))


def _refused(dsn: str, statement: str, params=None) -> None:
    """Running ``statement`` on ``dsn`` is refused for want of a privilege."""
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        query(dsn, statement, params)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_least_privilege_roles_migrate_run_and_enqueue(roles, tmp_path):
    """With the script's roles: the owner migrates (and keeps no CREATE on the database);
    the enqueue-only role enqueues from Python (its own transaction, enqueue_many, the
    process connection) and from SQL, and can read, change or run nothing else; a real
    supervisor logged in as the worker role runs every task and ends a SIGKILLed worker's
    session; the admin functions work as the worker, which cannot change the schema and
    can check an up-to-date schema without CREATE on the database."""
    _set_up(roles)
    owner, worker, enqueuer = (roles.dsn(r) for r in (roles.owner, roles.worker, roles.enqueuer))
    assert not scalar(
        roles.admin_dsn,
        "SELECT has_database_privilege(%s, current_database(), 'CREATE')",
        (roles.owner,),
    )

    # -- the enqueue-only role
    conn = psycopg2.connect(enqueuer)
    try:
        with conn:
            ids = [jh.echo.enqueue({"from": "python"}, conn=conn).id]
            ids += [t.id for t in jh.echo.enqueue_many([{"n": 1}, {"n": 2}], conn=conn)]
        with conn, conn.cursor() as cur:
            cur.execute("SELECT underway.enqueue('hardening-echo', '{\"from\": \"sql\"}')")
            ids.append(cur.fetchone()[0])
        with conn:
            ids.append(admin.enqueue("hardening-echo", {"from": "admin"}, conn=conn))
    finally:
        conn.close()
    underway.configure(dsn=enqueuer)
    ids.append(jh.echo.enqueue({"from": "process connection"}).id)
    underway.configure(dsn=roles.admin_dsn)
    for statement in (
        "SELECT input FROM underway.task",
        "SELECT state FROM underway.task",
        "SELECT error FROM underway.attempt",
        "UPDATE underway.task SET priority = 9",
        "DELETE FROM underway.task",
        "UPDATE underway.job SET priority = 9",
        "SELECT * FROM underway.claim_task(ARRAY['hardening-echo'], 1, 30)",
        "SELECT underway.enqueue('hardening-echo', '{}', key => 'k')",
        "CREATE TABLE underway.mine ()",
    ):
        _refused(enqueuer, statement)

    # -- a real supervisor as the worker role
    gate = Gate(roles.admin_dsn)
    try:
        wait = gate.hold(1411)
        with Supervisor(["jobs_hardening"], worker, ["--workers", "1", "--no-scheduler"]) as sup:
            wait_until(
                lambda: all(task_row(roles.admin_dsn, i)["state"] == "succeeded" for i in ids),
                timeout=20,
                message=f"the enqueued tasks run: {sup!r}",
            )
            task, backend, _ = _kill_busy_worker(roles.admin_dsn, sup, tmp_path, 1412, wait)
            wait_until(
                lambda: not _alive(roles.admin_dsn, backend),
                message=f"the dead worker's session ended by the worker role: {sup!r}",
            )
            wait_until(
                lambda: task_row(roles.admin_dsn, task)["state"] == "succeeded", message=repr(sup)
            )
            sup.signal(signal.SIGTERM)
            assert sup.wait(20) == 0, sup
        assert "permission denied" not in sup.output(), sup
    finally:
        gate.close()

    # -- the admin functions as the worker role
    conn = psycopg2.connect(worker)
    conn.autocommit = True
    try:
        admin.pause("hardening-echo", conn=conn)
        assert [q.queue for q in admin.queues(conn=conn) if q.paused] == ["hardening-echo"]
        assert admin.resume("hardening-echo", conn=conn) is True
        assert {t.id for t in admin.list_tasks(job="hardening-echo", conn=conn)} >= set(ids)
        assert admin.dead_letters("hardening-dlq", conn=conn) == []
        assert admin.redrive("hardening-dlq", conn=conn) == []
        assert admin.retry(job="hardening-echo", conn=conn) == []
        admin.purge_expired(conn=conn)
        admin.set_rate_limit("hardening-echo", 5, "s", conn=conn)
        assert [lim.name for lim in admin.limits(conn=conn)] == ["hardening-echo"]
        assert admin.clear_rate_limit("hardening-echo", conn=conn) is True
        jh.ticker.schedule("@daily", conn=conn)
        assert [s.job for s in admin.schedules(conn=conn)] == ["hardening-tick"]
        admin.supervisors(conn=conn)
        admin.throughput(conn=conn)
        admin.unhandled_jobs(conn=conn)
        keyed = admin.enqueue("hardening-echo", {"key": 1}, key="k", conn=conn)
        underway.task(keyed, conn=conn).cancel(conn=conn)
        assert task_row(roles.admin_dsn, keyed)["state"] == "cancelled"
    finally:
        conn.close()
    for statement in (
        "CREATE TABLE underway.mine ()",
        "DROP TABLE underway.task",
        "ALTER TABLE underway.task ADD COLUMN mine integer",
        "TRUNCATE underway.attempt",
        "CREATE FUNCTION underway.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    ):
        _refused(worker, statement)
    assert underway.run_migrations(worker) == []
    assert underway.run_migrations(owner) == []


@pytest.mark.timeout(60)
def test_owner_of_a_schema_made_for_it_migrates_without_create_on_the_database(roles):
    """An owner given only its schema (made for it by an administrator, as the script's
    first run does) and no CREATE privilege on the database runs the first migration."""
    roles.run_script()
    roles.allow_login()
    query(
        roles.admin_dsn,
        pgsql.SQL("REVOKE CREATE ON DATABASE {} FROM {}").format(
            pgsql.Identifier(dbname_of(roles.admin_dsn)), pgsql.Identifier(roles.owner)
        ),
    )
    assert underway.run_migrations(roles.dsn(roles.owner)) == list(range(1, SCHEMA_VERSION + 1))
