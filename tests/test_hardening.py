"""Issue #14: one bad row, value or step must not break what is around it.

Each test reproduces one item of the issue against a real PostgreSQL and, where processes
matter, a real supervisor (``python -m underway.supervisor jobs_hardening``): undecodable
inputs from SQL, dead workers' sessions ended by backend and not by name, step failures of
every kind recorded, a legacy ``keep_for`` that overflows, oversized errors and payloads, a
stored schedule whose job has no steps, and passwords kept out of logs and ``ps``.

Steps (``tests/jobs_hardening.py``) write ``hardening_effect`` rows through ``cx``, so a row
proves a try committed. Nothing waits by sleeping: tests poll the database or the log.
"""

from __future__ import annotations

import logging
import os
import signal
from datetime import timedelta
from pathlib import Path

import jobs_hardening as jh
import psutil
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest
from jobs_faults import Gate, task_row

from underway import Job, RetryPolicy, admin, store
from underway.db import connect, redact_dsn
from underway.errors import UndecodableInput
from underway.job import registered_jobs
from underway.records import Undecodable
from underway.upkeep import LapsedLeases, Retention
from underway.values import MAX_ERROR_CHARS, MAX_PAYLOAD_BYTES, MAX_TRACEBACK_CHARS
from underway.worker import DEALLOCATED, SELF_COMMITTED

from .helpers import Supervisor, in_process_workers, query, scalar, wait_until

#: Stored JSON PostgreSQL takes and Python cannot decode: a number of 5,001 digits (Python
#: refuses to convert more than 4,300), and arrays nested 3,000 deep (past the recursion limit).
BIG_NUMBER = '{"n": 1e5000}'
DEEP = "[" * 3000 + "]" * 3000

#: Words in a supervisor's log that mean a child process died or was restarted.
RESTART_WORDS = ("crashed", "restarting", "killed by", "exited with status")

#: Jobs the in-process workers run.
IN_PROCESS_JOBS = (jh.echo, jh.dlq_echo, jh.awkward, jh.committer, jh.deallocator, jh.outsized)


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def hdsn(dsn):
    """The test database, with the table the hardening jobs write to."""
    jh.prepare(dsn)
    return dsn


@pytest.fixture
def make_worker(hdsn):
    """In-process workers on this test's database; their connections close afterwards."""
    with in_process_workers(hdsn, IN_PROCESS_JOBS) as make:
        yield make


def sql_enqueue(dsn, job, input_json, **named):
    """``underway.enqueue(job, input, name => value, ...)`` from SQL; returns the task id."""
    extra = "".join(f", {name} => %({name})s" for name in named)
    return scalar(
        dsn,
        f"SELECT underway.enqueue(%(job)s, %(input)s::jsonb{extra})",
        {"job": job, "input": input_json, **named},
    )


def state_of(dsn, task_id):
    """(state, attempts, error) of a task."""
    return tuple(
        query(
            dsn,
            "SELECT state::text, attempts, error FROM underway.task WHERE id = %s",
            (task_id,),
        )[0]
    )


def tries_of(dsn, task_id):
    """(attempt, outcome, error) of every recorded try of a task, oldest first."""
    return query(
        dsn,
        "SELECT attempt, outcome, error FROM underway.attempt WHERE task_id = %s ORDER BY id",
        (task_id,),
    )


def run_all(worker, limit=50):
    """Run ready tasks on an in-process worker (the fused claim included) until none is left."""
    for _ in range(limit):
        if not worker.run_once(claim_next=True):
            return
    raise AssertionError("tasks kept coming")


def unfinished(dsn):
    """How many tasks are pending or running."""
    return scalar(dsn, "SELECT count(*) FROM underway.task WHERE state IN ('pending', 'running')")


def children(sup, count):
    """Wait until the supervisor has ``count`` live child processes; their pids."""
    return wait_until(
        lambda: (pids := sup.worker_pids()) and len(pids) == count and pids,
        timeout=15,
        message=f"{count} children: {sup!r}",
    )


def assert_no_restart(sup, pids):
    """The supervisor runs the very children it started, and its log tells of no death."""
    assert sup.is_running(), sup
    assert sup.worker_pids() == pids, sup
    log = sup.output()
    assert not [word for word in RESTART_WORDS if word in log], sup


# -- 1. undecodable inputs ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_undecodable_input_in_the_fused_claim_is_charged_to_no_other(hdsn, make_worker):
    """A busy worker completing task A claims the undecodable task B in the same statement:
    A still succeeds with one try, B fails as undecodable, naming itself and its job, and
    C (max_attempts=2) and E (max_attempts=1) around it succeed with one try each."""
    a = sql_enqueue(hdsn, "hardening-echo", '{"task": "A"}', priority=4)
    b = sql_enqueue(hdsn, "hardening-echo", BIG_NUMBER, priority=3)
    c = sql_enqueue(hdsn, "hardening-echo", '{"task": "C"}', priority=2, max_attempts=2)
    d = sql_enqueue(hdsn, "hardening-echo", DEEP, priority=1)
    e = sql_enqueue(hdsn, "hardening-echo", '{"task": "E"}', priority=0, max_attempts=1)
    worker = make_worker()

    assert worker.run_once(claim_next=True) is True
    # A is done and B was claimed by the statement that recorded A.
    assert state_of(hdsn, a) == ("succeeded", 1, None)
    assert state_of(hdsn, b)[:2] == ("running", 1)
    run_all(worker)

    for bad, kind in ((b, "ValueError"), (d, "RecursionError")):
        state, _, error = state_of(hdsn, bad)
        assert state == "failed", (bad, error)
        assert f"task {bad} of job 'hardening-echo' cannot be decoded: {kind}" in error
        assert {outcome for _, outcome, _ in tries_of(hdsn, bad)} == {"failed"}
    for good in (a, c, e):
        assert state_of(hdsn, good) == ("succeeded", 1, None)
        assert [outcome for _, outcome, _ in tries_of(hdsn, good)] == ["succeeded"]
    assert [task for task, _, _ in jh.effects(hdsn)] == [a, c, e]


@pytest.mark.timeout(30)
def test_undecodable_input_fails_for_good_at_its_first_try(hdsn, make_worker):
    """A task whose input cannot be decoded fails for good at its first try: no retry can
    decode it (the job allows three tries; an enqueue from SQL gets five)."""
    bad = jh.echo.enqueue({"n": 1})
    query(hdsn, "UPDATE underway.task SET input = %s::jsonb WHERE id = %s", (BIG_NUMBER, bad.id))
    deep = sql_enqueue(hdsn, "hardening-echo", DEEP)
    run_all(make_worker())
    for task in (bad.id, deep):
        assert state_of(hdsn, task)[:2] == ("failed", 1)
        assert [outcome for _, outcome, _ in tries_of(hdsn, task)] == ["failed"]


@pytest.mark.timeout(30)
def test_dead_letters_show_the_start_of_an_undecodable_input(hdsn, make_worker):
    """A dead-letter queue holding an undecodable task still lists (the start of its text
    stands in for the input), and an undecodable result fails naming its task."""
    bad = sql_enqueue(hdsn, "hardening-dlq-echo", BIG_NUMBER, dead_letter_queue="hardening-dlq")
    run_all(make_worker())

    [letter] = admin.dead_letters("hardening-dlq")
    assert letter.id == bad
    assert isinstance(letter.input, Undecodable)
    assert letter.input.startswith('{"n": 1000') and len(letter.input) <= 200
    assert "cannot be decoded" in letter.error
    query(
        hdsn,
        "UPDATE underway.task SET output = %s::jsonb, state = 'succeeded' WHERE id = %s",
        (DEEP, bad),
    )
    with pytest.raises(UndecodableInput, match=f"task {bad}"):
        jh.dlq_echo.task(bad).result(timeout=5)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bad_rows_and_bad_steps_never_restart_a_supervised_worker(hdsn):
    """Under a real supervisor, undecodable inputs from SQL and steps that fail with a NUL,
    a lone surrogate, sys.exit(), KeyboardInterrupt or a 20 MB message each fail their
    own task with the real error recorded, while every other task succeeds and the very
    workers and scheduler started at first still run: no restart, no crash in the log."""
    with Supervisor(["jobs_hardening"], hdsn, ["--workers", "2"]) as sup:
        pids = children(sup, 3)
        bad = [sql_enqueue(hdsn, "hardening-echo", text) for text in (BIG_NUMBER, DEEP)] * 2
        failing = {
            how: jh.awkward.enqueue({"how": how}).id
            for how in ("nul", "surrogate", "exit", "interrupt", "huge")
        }
        good = [t.id for t in jh.echo.enqueue_many([{"n": i} for i in range(20)])]
        wait_until(lambda: unfinished(hdsn) == 0, timeout=30, message=f"all finished: {sup!r}")
        assert_no_restart(sup, pids)
        for task in bad:
            assert state_of(hdsn, task)[0] == "failed"
            assert "cannot be decoded" in state_of(hdsn, task)[2]
        expected = {
            "nul": "RuntimeError: bad\\x00byte",
            "surrogate": "RuntimeError: lone \\ud800 surrogate",
            "exit": "SystemExit: 3",
            "interrupt": "KeyboardInterrupt: ctrl-c in a step",
        }
        for how, task in failing.items():
            [(_, outcome, error)] = tries_of(hdsn, task)
            assert outcome == "failed"
            if how == "huge":
                assert error.startswith("RuntimeError: xxx") and error.endswith("cut]")
            else:
                assert error == expected[how]
        for task in good:
            assert state_of(hdsn, task) == ("succeeded", 1, None)
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup


# -- 2. a dead worker's session, found by backend and not by name ---------------------------


def _blocked_backend(dsn, key):
    """The backend pid waiting for advisory lock ``key`` in this database, if one waits."""
    return scalar(
        dsn,
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND objid = %s AND database = (SELECT oid FROM pg_database"
        " WHERE datname = current_database())",
        (key,),
    )


def _alive(dsn, backend):
    """Whether a backend of that pid still exists."""
    return bool(scalar(dsn, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend,)))


def _kill_busy_worker(dsn, sup, tmp_path, own, wait):
    """Start a step that holds lock ``own`` and waits for ``wait`` (held by the caller);
    SIGKILL its worker mid-statement. Returns (task id, the dead worker's backend pid, that
    backend's application_name)."""
    pidfile = tmp_path / f"worker-{own}.pid"
    task = jh.holder.enqueue({"pidfile": str(pidfile), "own": own, "wait": wait})
    backend = wait_until(lambda: _blocked_backend(dsn, wait), message=f"step blocked: {sup!r}")
    name = scalar(dsn, "SELECT application_name FROM pg_stat_activity WHERE pid = %s", (backend,))
    worker = int(pidfile.read_text())
    os.kill(worker, signal.SIGKILL)
    return task.id, backend, name


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(60)
def test_dead_worker_cleanup_spares_another_hosts_session_of_the_same_name(hdsn, tmp_path):
    """A session of another host named like the worker about to die ('underway worker
    <pid>') survives that worker's SIGKILL and clean-up, while the dead worker's own session,
    busy in a statement and holding a lock, is ended and its task runs again."""
    gate = Gate(hdsn)
    try:
        wait = gate.hold(1401)
        with Supervisor(["jobs_hardening"], hdsn, ["--workers", "1", "--no-scheduler"]) as sup:
            [worker] = children(sup, 1)
            other_host = psycopg2.connect(hdsn, application_name=f"underway worker {worker}")
            other_host.autocommit = True
            try:
                with other_host.cursor() as cur:
                    cur.execute("SELECT pg_backend_pid()")
                    [(stranger,)] = cur.fetchall()
                task, backend, _ = _kill_busy_worker(hdsn, sup, tmp_path, 1402, wait)
                wait_until(
                    lambda: not _alive(hdsn, backend), message=f"dead worker's session: {sup!r}"
                )
                wait_until(lambda: task_row(hdsn, task)["state"] == "succeeded", message=repr(sup))
                assert _alive(hdsn, stranger)
                with other_host.cursor() as cur:
                    cur.execute("SELECT 1")
                    assert cur.fetchall() == [(1,)]
            finally:
                other_host.close()
            sup.signal(signal.SIGTERM)
            assert sup.wait(20) == 0, sup
    finally:
        gate.close()


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(60)
def test_dead_worker_session_is_ended_when_the_dsn_names_the_application(hdsn, tmp_path):
    """With a DSN that sets application_name=myapp (so no session carries underway's
    name), a SIGKILLed worker's session, busy in a long statement and holding a lock, is
    still ended at once: the lock is free while the statement would still be waiting."""
    named = hdsn + "&application_name=myapp"
    gate = Gate(hdsn)
    try:
        wait = gate.hold(1403)
        with Supervisor(["jobs_hardening"], named, ["--workers", "1", "--no-scheduler"]) as sup:
            children(sup, 1)
            task, backend, name = _kill_busy_worker(hdsn, sup, tmp_path, 1404, wait)
            assert name == "myapp"
            wait_until(lambda: not _alive(hdsn, backend), message=f"session ended: {sup!r}")
            assert scalar(hdsn, "SELECT pg_try_advisory_lock(1404)") is True
            wait_until(lambda: task_row(hdsn, task)["state"] == "succeeded", message=repr(sup))
            sup.signal(signal.SIGTERM)
            assert sup.wait(20) == 0, sup
    finally:
        gate.close()


# -- 3. step failures of every kind are recorded ----------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("nul", "RuntimeError: bad\\x00byte"),
        ("surrogate", "RuntimeError: lone \\ud800 surrogate"),
        ("exit", "SystemExit: 3"),
        ("interrupt", "KeyboardInterrupt: ctrl-c in a step"),
    ],
)
def test_step_failure_is_recorded_and_the_worker_goes_on(hdsn, make_worker, how, error):
    """A step failing with an error PostgreSQL cannot store as it is (NUL, a lone
    surrogate), or with SystemExit or KeyboardInterrupt, fails its try with that error in
    the attempt row and the task (its writes rolled back), never left running; the worker
    then runs the next task."""
    worker = make_worker()
    task = jh.awkward.enqueue({"how": how})
    after = jh.echo.enqueue({"after": how})
    assert worker.run_once() is True
    assert state_of(hdsn, task.id) == ("failed", 1, error)
    assert tries_of(hdsn, task.id) == [(1, "failed", error)]
    trace = scalar(hdsn, "SELECT traceback FROM underway.attempt WHERE task_id = %s", (task.id,))
    assert "misbehave" in trace
    assert worker.run_once() is True
    assert state_of(hdsn, after.id) == ("succeeded", 1, None)
    assert [t for t, _, _ in jh.effects(hdsn)] == [after.id]


@pytest.mark.timeout(30)
def test_exception_that_cannot_be_printed_is_recorded(hdsn, make_worker):
    """A step raising an exception whose ``__str__`` itself raises still fails its try with
    the exception's type recorded, and the worker goes on."""
    worker = make_worker()
    task = jh.awkward.enqueue({"how": "broken-str"})
    worker.run_once()
    state, attempts, error = state_of(hdsn, task.id)
    assert (state, attempts) == ("failed", 1) and "BrokenStr" in error


@pytest.mark.timeout(30)
def test_step_that_swallows_an_sql_error_fails_its_try(hdsn, make_worker):
    """A step that catches its own SQL error and returns leaves its transaction aborted:
    the try fails with an error that says so (nothing of it commits), and the worker goes
    on to the next task instead of ending."""
    worker = make_worker()
    task = jh.awkward.enqueue({"how": "swallow-sql"})
    after = jh.echo.enqueue({"after": "swallow"})
    worker.run_once()
    state, attempts, error = state_of(hdsn, task.id)
    assert (state, attempts) == ("failed", 1)
    assert "aborted" in error or "division by zero" in error
    assert worker.run_once() is True
    assert state_of(hdsn, after.id) == ("succeeded", 1, None)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["foreign-db", "read-only"])
def test_step_error_that_looks_like_an_outage_is_charged_to_the_step(hdsn, make_worker, how):
    """A step whose own database error looks like an outage (it cannot reach another
    database; it made its transaction read-only and wrote) fails its try with that error,
    counted, instead of being given back uncounted after a reconnect, again and again."""
    worker = make_worker()
    task = jh.awkward.enqueue({"how": how})
    for _ in range(3):  # as Service.run does: an outage drops the connection, then goes on
        try:
            worker.run_once()
        except psycopg2.OperationalError:
            worker.disconnect()
    state, attempts, error = state_of(hdsn, task.id)
    assert (state, attempts) == ("failed", 1), error


@pytest.mark.timeout(30)
def test_timeouts_and_retry_intervals_out_of_bounds_are_refused_at_definition():
    """Job(timeout=30 days) and a step's timeout of 30 days are refused (the bound is 7
    days), naming the job; so is a RetryPolicy whose initial_interval or max_interval is
    1e13 seconds (over 100 years). A refused job is not defined."""
    with pytest.raises(ValueError, match=r"job 'hardening-month'.*timeout.*at most 7 days"):
        Job("hardening-month", timeout=timedelta(days=30))
    assert "hardening-month" not in registered_jobs()
    job = Job("hardening-week", timeout=timedelta(days=7))
    try:
        with pytest.raises(ValueError, match=r"job 'hardening-week'.*at most 7 days"):
            job.step(timeout=timedelta(days=30))
    finally:
        from underway.job import unregister_job

        unregister_job("hardening-week")
    with pytest.raises(ValueError, match=r"job 'hardening-forever'.*keep_for.*at most 100 years"):
        Job("hardening-forever", keep_for=timedelta(days=365 * 1000))
    assert "hardening-forever" not in registered_jobs()
    with pytest.raises(ValueError, match="initial_interval"):
        RetryPolicy(initial_interval=1e13)
    with pytest.raises(ValueError, match="max_interval"):
        RetryPolicy(max_interval=1e13)


# -- 5. a legacy keep_for that overflows must not block maintenance ---------------------------

LEGACY = "1000000 years"

KEEP_FOR_CHECK = "CHECK (keep_for >= interval '0' AND keep_for <= interval '100 years')"


def insert_legacy_rows(dsn, rows):
    """Insert task rows as a version before 0003 could have left them: the keep_for check is
    dropped for the insert and added back NOT VALID, as the migration added it."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("ALTER TABLE underway.task DROP CONSTRAINT task_keep_for_range")
            ids = []
            for row in rows:
                columns = ", ".join(row)
                values = ", ".join(f"%({name})s" for name in row)
                cur.execute(
                    f"INSERT INTO underway.task ({columns}) VALUES ({values}) RETURNING id", row
                )
                ids.append(cur.fetchone()[0])
            cur.execute(
                "ALTER TABLE underway.task ADD CONSTRAINT task_keep_for_range "
                f"{KEEP_FOR_CHECK} NOT VALID"
            )
        return ids
    finally:
        conn.close()


def lapsed(job, keep_for, attempts, max_attempts):
    """A running task whose lease lapsed a minute ago."""
    return {
        "job": job,
        "input": "{}",
        "state": "running",
        "attempts": attempts,
        "max_attempts": max_attempts,
        "claim_token": 77,
        "lease_expires_at": "-infinity",
        "started_at": "2000-01-01",
        "keep_for": keep_for,
    }


def expired(job, keep_for):
    """A task that finished long ago and whose retention ran out."""
    return {
        "job": job,
        "input": "{}",
        "state": "succeeded",
        "finished_at": "2000-01-01",
        "expires_at": "2000-01-02",
        "keep_for": keep_for,
    }


@pytest.mark.timeout(30)
def test_enqueue_from_sql_refuses_keep_for_beyond_100_years(hdsn):
    """``underway.enqueue(..., keep_for => '1000000 years')`` is refused, naming keep_for,
    and writes nothing; 100 years is taken."""
    with pytest.raises(psycopg2.errors.InvalidParameterValue, match="keep_for"):
        sql_enqueue(hdsn, "hardening-echo", "{}", keep_for=LEGACY)
    assert scalar(hdsn, "SELECT count(*) FROM underway.task") == 0
    assert sql_enqueue(hdsn, "hardening-echo", "{}", keep_for="100 years")


def _run_unit(dsn, unit):
    """One pass of an upkeep unit on an autocommit connection, as the supervisor runs it."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            unit.run_once(cur)
    finally:
        conn.close()


@pytest.mark.timeout(30)
def test_retention_purges_past_a_legacy_keep_for(hdsn):
    """Retention deletes expired finished tasks, a legacy one with a keep_for of a million
    years among them, and leaves the unexpired ones."""
    _, _, kept = insert_legacy_rows(
        hdsn,
        [
            expired("hardening-echo", LEGACY),
            expired("hardening-echo", "1 day"),
            {**expired("hardening-echo", LEGACY), "expires_at": "infinity"},
        ],
    )
    _run_unit(hdsn, Retention())
    assert query(hdsn, "SELECT id FROM underway.task ORDER BY id") == [(kept,)]


@pytest.mark.timeout(30)
def test_lapsed_leases_are_reclaimed_past_a_legacy_keep_for(hdsn):
    """A legacy running task with a keep_for of a million years, on its last try, whose
    lease lapsed: LapsedLeases fails it (kept at most 100 years) and releases the other
    lapsed task beside it."""
    legacy, other = insert_legacy_rows(
        hdsn,
        [lapsed("hardening-echo", LEGACY, 1, 1), lapsed("hardening-echo", "1 day", 1, 3)],
    )
    _run_unit(hdsn, LapsedLeases(30.0))
    assert state_of(hdsn, other)[:2] == ("pending", 1)
    assert state_of(hdsn, legacy)[:2] == ("failed", 1)
    assert scalar(
        hdsn,
        "SELECT expires_at <= finished_at + interval '100 years' FROM underway.task WHERE id = %s",
        (legacy,),
    )


@pytest.mark.timeout(30)
def test_worker_runs_a_legacy_task_with_huge_keep_for_and_those_behind(hdsn, make_worker):
    """A legacy pending task with a keep_for of a million years is claimed, run and
    completed (kept at most 100 years), and the task queued behind it runs too."""
    [legacy] = insert_legacy_rows(
        hdsn, [{"job": "hardening-echo", "input": '{"legacy": 1}', "keep_for": LEGACY}]
    )
    behind = jh.echo.enqueue({"behind": 1})
    worker = make_worker()
    try:
        run_all(worker)
    finally:
        worker.disconnect()
    assert state_of(hdsn, behind.id) == ("succeeded", 1, None)
    assert state_of(hdsn, legacy) == ("succeeded", 1, None)
    assert scalar(
        hdsn,
        "SELECT expires_at <= finished_at + interval '100 years' FROM underway.task WHERE id = %s",
        (legacy,),
    )


# -- 6. oversized errors and payloads ---------------------------------------------------------


@pytest.mark.timeout(30)
def test_huge_error_message_is_stored_and_logged_cut(hdsn, make_worker, caplog):
    """A step raising a 20 MB message: the attempt row, the task's error and the log line
    hold the first MAX_ERROR_CHARS characters and say how much was cut."""
    worker = make_worker()
    task = jh.awkward.enqueue({"how": "huge"})
    with caplog.at_level(logging.WARNING, logger="underway.worker"):
        assert worker.run_once() is True
    [(_, outcome, error)] = tries_of(hdsn, task.id)
    cut = len("RuntimeError: ") + jh.HUGE_MESSAGE_CHARS - MAX_ERROR_CHARS
    assert outcome == "failed"
    kept = "RuntimeError: " + "x" * (MAX_ERROR_CHARS - len("RuntimeError: "))
    assert error == f"{kept}... [{cut:,} more characters cut]"
    assert state_of(hdsn, task.id)[2] == error
    [record] = [r for r in caplog.records if getattr(r, "task_id", None) == task.id]
    assert record.error == error
    assert len(record.getMessage()) < MAX_ERROR_CHARS + 500
    assert len(record.error_traceback) < MAX_TRACEBACK_CHARS + 100


@pytest.mark.timeout(30)
def test_huge_traceback_is_stored_cut(hdsn, make_worker):
    """A step failing with a chain of 400 exceptions: its traceback is stored cut to
    MAX_TRACEBACK_CHARS, saying so, with its start (the root cause) kept."""
    worker = make_worker()
    task = jh.awkward.enqueue({"how": "long-traceback"})
    assert worker.run_once() is True
    error, trace = query(
        hdsn, "SELECT error, traceback FROM underway.attempt WHERE task_id = %s", (task.id,)
    )[0]
    assert error.startswith("RuntimeError: wrapped at depth 400")
    assert trace.endswith("more characters cut]")
    assert MAX_TRACEBACK_CHARS < len(trace) < MAX_TRACEBACK_CHARS + 100
    assert "ValueError: the root cause" in trace


@pytest.mark.timeout(30)
def test_input_over_16_mib_is_refused_before_anything_is_sent(hdsn):
    """An input whose JSON is over 16 MiB is refused in Python with a ValueError naming the
    job, its size and the limit; nothing reaches the server (the caller's connection never
    began a transaction) and no task exists."""
    conn = psycopg2.connect(hdsn)
    try:
        with pytest.raises(ValueError) as refused:
            jh.echo.enqueue("x" * MAX_PAYLOAD_BYTES, conn=conn)
        assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    finally:
        conn.close()
    message = str(refused.value)
    assert "'hardening-echo'" in message
    assert f"{MAX_PAYLOAD_BYTES + 2:,} bytes" in message and f"{MAX_PAYLOAD_BYTES:,}" in message
    assert scalar(hdsn, "SELECT count(*) FROM underway.task") == 0


@pytest.mark.timeout(30)
def test_result_over_16_mib_fails_the_task_at_once(hdsn, make_worker):
    """A step returning a result over 16 MiB fails its task for good at the first try (no
    retry can shrink it), naming the step, the size and the limit; its writes roll back."""
    task = jh.outsized.enqueue({"n": 1})
    run_all(make_worker())
    state, attempts, error = state_of(hdsn, task.id)
    assert (state, attempts) == ("failed", 1)
    assert "result of step 'return_too_much' of 'hardening-outsized'" in error
    assert f"the limit is {MAX_PAYLOAD_BYTES:,}" in error
    assert jh.effects(hdsn, task.id) == []


@pytest.mark.timeout(30)
def test_enqueue_many_names_the_index_of_the_bad_input(hdsn):
    """enqueue_many refuses a batch with an input over 16 MiB, or one that is not JSON, by
    its index in the batch; none of the batch is written."""
    with pytest.raises(ValueError, match="input 2 of the batch is"):
        jh.echo.enqueue_many([{"ok": 1}, {"ok": 2}, "x" * MAX_PAYLOAD_BYTES])
    with pytest.raises(TypeError, match="input 1 of the batch is not JSON-serialisable"):
        jh.echo.enqueue_many([{"ok": 1}, {"a", "set"}])
    assert scalar(hdsn, "SELECT count(*) FROM underway.task") == 0


@pytest.mark.timeout(30)
def test_enqueue_from_sql_refuses_an_input_over_16_mib(hdsn):
    """``underway.enqueue`` refuses an input over 16 MiB with program_limit_exceeded and
    writes nothing."""
    with pytest.raises(psycopg2.errors.ProgramLimitExceeded, match="limit is 16 MiB"):
        scalar(hdsn, "SELECT underway.enqueue('hardening-echo', to_jsonb(repeat('x', 16777216)))")
    assert scalar(hdsn, "SELECT count(*) FROM underway.task") == 0


@pytest.mark.timeout(30)
def test_enqueue_from_sql_refuses_an_input_over_16_mib_read_from_a_table(hdsn):
    """An input over 16 MiB read from a table (stored compressed) is refused like any other:
    the bound is on the JSON, not on how PostgreSQL happens to store it."""
    query(hdsn, "CREATE TABLE big AS SELECT to_jsonb(repeat('x', 17000000)) AS j")
    with pytest.raises(psycopg2.errors.ProgramLimitExceeded):
        scalar(hdsn, "SELECT underway.enqueue('hardening-echo', j) FROM big")


# -- 7. a stored schedule for a job without steps ----------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_schedule_of_a_job_without_steps_is_ignored_and_later_schedules_fire(hdsn):
    """A schedule stored from SQL for a job the supervisor defines with no steps does not
    crash the scheduler: it is ignored with one error in the log, the scheduler process is
    never restarted, and the per-second schedule sorted after it fires tick after tick."""
    query(
        hdsn,
        "INSERT INTO underway.schedule (job, name, expression, input)"
        " VALUES ('hardening-a-stepless', 'default', '* * * * * *', 'null')",
    )
    jh.ticker.schedule("* * * * * *")
    with Supervisor(["jobs_hardening"], hdsn, ["--workers", "1"]) as sup:
        pids = children(sup, 2)
        wait_until(
            lambda: (
                len({task for task, job, _ in jh.effects(hdsn) if job == "hardening-tick"}) >= 3
            ),
            timeout=15,
            message=f"three ticks run: {sup!r}",
        )
        assert_no_restart(sup, pids)
        log = sup.output()
        assert log.count("schedule hardening-a-stepless/default is ignored") == 1, sup
        assert (
            scalar(hdsn, "SELECT count(*) FROM underway.task WHERE job = 'hardening-a-stepless'")
            == 0
        )
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup


# -- 8. passwords ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "secret"),
    [
        ("postgresql://user:pa/ss@host/db", "pa/ss"),
        ("postgresql://user:p@ss@host/db", "p@ss"),
        ("postgresql://user:p?ss@host/db?sslmode=require", "p?ss"),
        ("postgresql://user:pa%2Fss@host:5432/db", "pa%2Fss"),
        ("postgresql:///db?host=/tmp&password=se/cr@t", "se/cr@t"),
        ("host=db user=app password='a b' dbname=x", "a b"),
        ("host=db password = 'it\\'s a \\\\ b' dbname=x", "s a"),
        ("host=db password=ab\\ cd dbname=x", "cd"),
        ("host=db password=plain dbname=x", "plain"),
    ],
)
def test_redact_dsn_hides_every_password(dsn, secret):
    """redact_dsn hides a password whatever it holds: an unencoded '/', '@' or '?' in a
    URI, a password in the query string, a quoted one with spaces in key=value form."""
    shown = redact_dsn(dsn)
    assert secret not in shown and "***" in shown, shown
    assert "db" in shown  # the rest is still shown


def test_redact_dsn_hides_a_password_holding_equals_and_question_mark():
    """A URI password holding both '=' and '?' (libpq reads up to the '@') is hidden too."""
    shown = redact_dsn("postgresql://user:a=b?c@host/db")
    assert "a=b" not in shown and "?c" not in shown, shown


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_no_process_shows_the_password_of_dsn_in_ps(hdsn):
    """A supervisor started with --dsn holding a password: the command lines of the
    supervisor, every worker and the scheduler (what ps shows any user) hold neither the
    password nor --dsn, and the log never prints it."""
    secret = "s3cret-pw-14"
    with_password = hdsn.replace("postgresql://postgres@", f"postgresql://postgres:{secret}@")
    assert secret in with_password
    with Supervisor(["jobs_hardening"], with_password, ["--workers", "2"]) as sup:
        pids = children(sup, 3)
        for pid in [sup.pid, *pids]:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert secret not in cmdline and "--dsn" not in cmdline, (pid, cmdline)
            assert "jobs_hardening" in psutil.Process(pid).cmdline()
        task = jh.echo.enqueue({"ps": 1})
        wait_until(lambda: task_row(hdsn, task.id)["state"] == "succeeded", message=repr(sup))
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0, sup
    assert secret not in sup.output()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_an_abbreviated_dsn_option_is_hidden_from_ps_too(hdsn):
    """``--ds DSN``, which the command line accepts for ``--dsn``, is kept out of ``ps``
    as well."""
    secret = "s3cret-pw-abbrev"
    with_password = hdsn.replace("postgresql://postgres@", f"postgresql://postgres:{secret}@")
    with Supervisor(["jobs_hardening"], hdsn, ["--workers", "1", "--ds", with_password]) as sup:
        children(sup, 2)
        cmdline = Path(f"/proc/{sup.pid}/cmdline").read_bytes().decode()
        assert secret not in cmdline, cmdline


# -- a step that commits through cx ------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("then", ["raise", "return"])
def test_step_that_commits_through_cx_fails_at_once_and_writes_once(hdsn, make_worker, then):
    """A step that COMMITs the worker's transaction through cx, then fails (or returns):
    the try fails for good at once with the explanation, its write happened exactly once,
    and no retry repeats it, though the job allows three tries."""
    worker = make_worker()
    task = jh.committer.enqueue({"then": then})
    run_all(worker)
    state, attempts, error = state_of(hdsn, task.id)
    assert (state, attempts) == ("failed", 1)
    assert SELF_COMMITTED in error
    if then == "raise":
        assert "then it failed: failed after committing" in error
    assert jh.effects(hdsn, task.id) == [(task.id, "hardening-commit", 1)]
    assert [outcome for _, outcome, _ in tries_of(hdsn, task.id)] == ["failed"]


@pytest.mark.timeout(30)
def test_step_that_commits_and_begins_again_is_caught_too(hdsn, make_worker):
    """A step that COMMITs through cx and opens a new transaction before failing is caught
    as well: its write happens once, not once per try."""
    worker = make_worker()
    task = jh.committer.enqueue({"then": "begin"})
    run_all(worker)
    assert state_of(hdsn, task.id)[:2] == ("failed", 1)
    assert jh.effects(hdsn, task.id) == [(task.id, "hardening-commit", 1)]


# -- a step that deallocates the worker's prepared statements ---------------------------------


@pytest.mark.timeout(30)
def test_step_that_deallocates_the_workers_statements_fails_and_the_worker_goes_on(
    hdsn, make_worker
):
    """A step that runs DEALLOCATE ALL through cx and returns: its try fails for good with
    the explanation and its write is rolled back; the worker prepares its statements again
    and runs the next task."""
    worker = make_worker()
    before = jh.echo.enqueue({"n": 0})
    task = jh.deallocator.enqueue({"then": "return"})
    after = jh.echo.enqueue({"n": 1})
    run_all(worker)
    state, attempts, error = state_of(hdsn, task.id)
    assert (state, attempts) == ("failed", 1)
    assert DEALLOCATED in error
    assert jh.effects(hdsn, task.id) == []
    assert state_of(hdsn, before.id)[0] == state_of(hdsn, after.id)[0] == "succeeded"


@pytest.mark.timeout(30)
def test_step_that_deallocates_then_raises_is_retried_as_any_failure(hdsn, make_worker):
    """A step that runs DEALLOCATE ALL and then raises: the failure is recorded as any
    other (the worker prepares its statement again), retried up to its tries, and no write
    of a failed try is kept."""
    worker = make_worker()
    jh.echo.enqueue({"n": 0})
    task = jh.deallocator.enqueue({"then": "raise"})
    run_all(worker)
    state, attempts, error = state_of(hdsn, task.id)
    assert (state, attempts) == ("failed", jh.ECHO_TRIES)
    assert "failed after deallocating" in error
    assert jh.effects(hdsn, task.id) == []


@pytest.mark.timeout(30)
def test_a_session_handed_over_with_a_stale_statement_of_ours_is_prepared_afresh(hdsn):
    """A pooler in session mode that does not reset sessions may hand a worker one holding
    a statement named like ours, from an older underway: preparing replaces it, so the
    claim runs our query, not the stale one."""
    conn = connect(hdsn, prepare=True)
    try:
        with conn.cursor() as cur:
            cur.execute("PREPARE underway_claim_task AS SELECT 42")
            store.prepare_all(cur)
            assert conn.prepared == store.base.PREPARED
            assert store.claim_task(cur, ["hardening-echo"], 7, 30.0) is None
            jh.echo.enqueue({"n": 1})
            claim = store.claim_task(cur, ["hardening-echo"], 7, 30.0)
            assert claim is not None and claim.job == "hardening-echo"
    finally:
        conn.close()
