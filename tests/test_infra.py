"""Tests of the test infrastructure itself (server control, helpers, leak detection).

These use ``pg_server`` directly, not the ``dsn`` fixture, so they need nothing from the library.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg2
import pytest

from .helpers import (
    OWNER_ENV,
    TESTS_DIR,
    Supervisor,
    dbname_of,
    leaked_processes,
    query,
    run_python,
    scalar,
    subprocess_env,
    wait_until,
)
from .pgtest import PgTestServer


@pytest.fixture
def scratch_db(pg_server: PgTestServer) -> Iterator[str]:
    """A throwaway empty database created and dropped by the server object under test."""
    pg_server.ensure_running()
    name = f"infra_{uuid.uuid4().hex[:12]}"
    dsn = pg_server.create_database(name)
    yield dsn
    pg_server.ensure_running()
    pg_server.drop_database(name)


def test_wait_until_returns_truthy_value() -> None:
    calls = []

    def predicate() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    assert wait_until(predicate, timeout=5) == 3


def test_wait_until_times_out_with_message_and_last_value() -> None:
    with pytest.raises(AssertionError) as excinfo:
        wait_until(lambda: [], timeout=0.05, message="the moon to turn blue")
    text = str(excinfo.value)
    assert "the moon to turn blue" in text
    assert "last value: []" in text


def test_create_query_and_drop_database(pg_server: PgTestServer) -> None:
    name = f"infra_{uuid.uuid4().hex[:12]}"
    dsn = pg_server.create_database(name)
    try:
        assert dbname_of(dsn) == name
        assert pg_server.database_exists(name)
        query(dsn, "CREATE TABLE t (x int)")
        query(dsn, "INSERT INTO t VALUES (%s), (%s)", (1, 2))
        assert query(dsn, "SELECT x FROM t ORDER BY x") == [(1,), (2,)]
        assert scalar(dsn, "SELECT sum(x) FROM t") == 3
        assert scalar(dsn, "SELECT x FROM t WHERE x > 5") is None
        # An open connection does not prevent the drop.
        held = psycopg2.connect(dsn)
    finally:
        pg_server.drop_database(name)
    held.close()
    assert not pg_server.database_exists(name)
    pg_server.drop_database(name)  # dropping again is a no-op


def test_clone_from_template_with_connected_client(pg_server: PgTestServer) -> None:
    template = f"infra_tpl_{uuid.uuid4().hex[:8]}"
    clone = f"infra_clone_{uuid.uuid4().hex[:8]}"
    template_dsn = pg_server.create_database(template)
    try:
        query(template_dsn, "CREATE TABLE marker (v text)")
        query(template_dsn, "INSERT INTO marker VALUES ('from template')")
        # Someone still connected to the template would make a plain clone fail.
        straggler = psycopg2.connect(template_dsn)
        clone_dsn = pg_server.create_database(clone, template=template)
        assert scalar(clone_dsn, "SELECT v FROM marker") == "from template"
        straggler.close()
    finally:
        pg_server.drop_database(clone)
        pg_server.drop_database(template)


def test_terminate_backends_kills_connections(pg_server: PgTestServer, scratch_db: str) -> None:
    name = dbname_of(scratch_db)
    victim = psycopg2.connect(scratch_db, application_name="infra-victim")
    bystander = psycopg2.connect(scratch_db, application_name="infra-bystander")
    try:
        assert pg_server.backend_count(name) == 2
        assert pg_server.terminate_backends(name, application_name_like="nomatch%") == 0
        assert pg_server.terminate_backends(name, application_name_like="infra-vic%") == 1
        with pytest.raises(psycopg2.OperationalError), victim.cursor() as cur:
            cur.execute("SELECT 1")
        with bystander.cursor() as cur:
            cur.execute("SELECT 1")
        assert pg_server.terminate_backends(name) == 1
        with pytest.raises(psycopg2.OperationalError), bystander.cursor() as cur:
            cur.execute("SELECT 1")
        assert pg_server.backend_count(name) == 0
    finally:
        victim.close()
        bystander.close()


def test_stop_and_start_again_keeps_dsn(pg_server: PgTestServer, scratch_db: str) -> None:
    if not pg_server.can_restart:
        pytest.skip("DATABASE_URL server: no lifecycle control")
    query(scratch_db, "CREATE TABLE kept (v int)")
    query(scratch_db, "INSERT INTO kept VALUES (42)")
    old = psycopg2.connect(scratch_db)
    try:
        for _ in range(2):  # a second cycle must work as well as the first
            pg_server.stop()
            assert not pg_server.is_running()
            with pytest.raises(psycopg2.OperationalError):
                psycopg2.connect(scratch_db, connect_timeout=2)
            pg_server.start_again()
            assert pg_server.is_running()
            assert scalar(scratch_db, "SELECT v FROM kept") == 42
        with pytest.raises(psycopg2.OperationalError), old.cursor() as cur:
            cur.execute("SELECT 1")
        pg_server.stop()
        pg_server.stop()  # idempotent
        pg_server.restart()  # from stopped: just starts
        pg_server.start_again()  # idempotent
        assert scalar(scratch_db, "SELECT v FROM kept") == 42
    finally:
        old.close()
        pg_server.ensure_running()


def test_server_settings(pg_server: PgTestServer) -> None:
    if not pg_server.can_restart:
        pytest.skip("DATABASE_URL server: settings are not ours")
    assert scalar(pg_server.admin_dsn, "SHOW fsync") == "off"
    assert int(scalar(pg_server.admin_dsn, "SHOW max_connections")) >= 300


def test_run_python_env() -> None:
    result = run_python(
        "import os, sys; print(os.environ['PYTHONPATH']); print(os.environ['"
        + OWNER_ENV
        + "']); sys.exit(3)"
    )
    assert result.returncode == 3, result
    pythonpath, owner = result.stdout.splitlines()
    assert str(TESTS_DIR) in pythonpath.split(":")
    assert str(TESTS_DIR.parent) in pythonpath.split(":")
    assert owner == str(psutil.Process().pid)


def test_run_python_timeout_kills() -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        run_python("import time; time.sleep(60)", timeout=0.5)
    assert leaked_processes() == []


def test_leak_detection_finds_orphans() -> None:
    # The script starts a detached grandchild (own session, parent exits): an orphan that only
    # the owner tag in its environment ties to us.
    script = textwrap.dedent(
        """
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             start_new_session=True)
        print(p.pid)
        """
    )
    result = run_python(script)
    assert result.returncode == 0, result
    orphan_pid = int(result.stdout.strip())
    try:
        found = wait_until(
            lambda: [p for p in leaked_processes() if p.pid == orphan_pid],
            timeout=5,
            message="orphan to be found",
        )
        assert found[0].ppid() != psutil.Process().pid
    finally:
        orphan = psutil.Process(orphan_pid)
        orphan.kill()
        psutil.wait_procs([orphan], timeout=10)


FAKE_SUPERVISOR = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    print("args:", sys.argv[1:], flush=True)
    kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            for _ in range(2)]
    def stop(signum, frame):
        print("stopping", flush=True)
        for k in kids:
            k.terminate()
            k.wait()
        sys.exit(7)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
    """
)


def test_supervisor_helper_with_stand_in(tmp_path: Path) -> None:
    (tmp_path / "fake_supervisor.py").write_text(FAKE_SUPERVISOR)
    with Supervisor(
        ["jobs_a", "jobs_b"],
        "postgresql:///x",
        ["--workers", "2"],
        cwd=tmp_path,
        module="fake_supervisor",
    ) as sup:
        sup.wait_for_output("ready")
        assert "['jobs_a', 'jobs_b', '--dsn', 'postgresql:///x', '--workers', '2']" in (
            sup.output()
        )
        workers = wait_until(lambda: len(sup.worker_pids()) == 2 and sup.worker_pids())
        assert len(workers) == 2
        sup.signal(signal.SIGTERM)
        assert sup.wait(timeout=10) == 7, sup
        assert "stopping" in sup.output()
        assert sup.worker_pids() == []
    assert "stopping" in repr(sup)


def test_supervisor_exit_kills_group(tmp_path: Path) -> None:
    (tmp_path / "fake_supervisor.py").write_text(FAKE_SUPERVISOR)
    sup = Supervisor([], "postgresql:///x", cwd=tmp_path, module="fake_supervisor")
    with sup:
        sup.wait_for_output("ready")
        workers = wait_until(lambda: len(sup.worker_pids()) == 2 and sup.worker_pids())
        sup.kill_group()
        assert sup.wait(timeout=10) == -signal.SIGKILL
    assert not any(psutil.pid_exists(pid) and _alive(pid) for pid in workers)
    assert leaked_processes() == []


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_subprocess_env_imports_by_plain_name(tmp_path: Path) -> None:
    # Modules in tests/ import by plain name in subprocesses, just as in this process.
    env = subprocess_env()
    out = subprocess.run(
        [sys.executable, "-c", "import helpers; print(helpers.TESTS_DIR)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(TESTS_DIR)
