"""Enqueueing from SQL: ``underway.enqueue(job, input, ...)``, from a plain statement and from a
trigger on an application's table, run by real supervisors over a real PostgreSQL.

Supervisors run with ``--poll-interval 30``: a task picked up within a couple of seconds was
picked up because the enqueue woke an idle worker (NOTIFY), not by polling. Arguments left out
take the defaults a supervisor stored for the job in ``underway.job`` at start, or the built-in
ones (max_attempts 5, the job's name as queue, 14 days' retention) for a job no supervisor has
registered. The steps (``tests/jobs_sql.py``) record each call in ``sql_effect``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from datetime import timedelta

import jobs_sql
import psycopg2
import psycopg2.errors
import pytest
from jobs_faults import idle_listening_workers

from underway.job import DEFAULT_KEEP_FOR, Job, registered_jobs
from underway.retry import DEFAULT_MAX_ATTEMPTS

from .helpers import Supervisor, query, scalar, wait_until


@pytest.fixture
def qdsn(dsn: str) -> str:
    """The test database, with the table the steps record their calls in."""
    jobs_sql.prepare(dsn)
    return dsn


@contextlib.contextmanager
def supervisor(dsn: str, workers: int = 1) -> Iterator[Supervisor]:
    """A supervisor for the SQL jobs, its idle workers woken only through LISTEN; started,
    and its jobs registered, before the block. A block that completes ends with a graceful
    stop, which must succeed."""
    with Supervisor(
        ["jobs_sql"],
        dsn,
        ["--workers", str(workers), "--poll-interval", "30", "--no-scheduler"],
    ) as sup:
        wait_until(
            lambda: len(idle_listening_workers(dsn)) == workers,
            timeout=15,
            message=f"idle workers: {sup!r}",
        )
        yield sup
        sup.signal(signal.SIGTERM)
        assert sup.wait(15) == 0, repr(sup)


def sql_enqueue(dsn: str, args: str, params: tuple = ()) -> int:
    """``SELECT underway.enqueue(<args>)`` on a connection of its own; returns the task id."""
    return scalar(dsn, f"SELECT underway.enqueue({args})", params)


def effects(dsn: str) -> list[tuple]:
    """(task_id, job, input, attempt, max_attempts) of every step call, in order."""
    return query(
        dsn, "SELECT task_id, job, input, attempt, max_attempts FROM sql_effect ORDER BY id"
    )


def task_row(dsn: str, task_id: int) -> dict:
    """The columns enqueue sets, of one task."""
    rows = query(
        dsn,
        "SELECT job, input, state::text, priority, max_attempts, queue, serial_queue, key,"
        " dead_letter_queue, keep_for, extract(epoch FROM run_at - created_at)::float8"
        " FROM underway.task WHERE id = %s",
        (task_id,),
    )
    keys = [
        "job",
        "input",
        "state",
        "priority",
        "max_attempts",
        "queue",
        "serial_queue",
        "key",
        "dead_letter_queue",
        "keep_for",
        "delay",
    ]
    assert len(rows) == 1, rows
    return dict(zip(keys, rows[0]))


def task_count(dsn: str) -> int:
    """How many tasks exist."""
    return scalar(dsn, "SELECT count(*) FROM underway.task")


def succeeded(dsn: str, *task_ids: int) -> bool:
    """Whether all the given tasks have succeeded."""
    return scalar(
        dsn,
        "SELECT count(*) FROM underway.task WHERE id = ANY(%s) AND state = 'succeeded'",
        (list(task_ids),),
    ) == len(task_ids)


def pickup_seconds(dsn: str, task_id: int) -> float:
    """Seconds from the task's enqueue (its created_at) to its step's first statement."""
    return scalar(
        dsn,
        "SELECT extract(epoch FROM min(e.at) - t.created_at)::float8 FROM sql_effect e"
        " JOIN underway.task t ON t.id = e.task_id WHERE t.id = %s GROUP BY t.created_at",
        (task_id,),
    )


BUILT_IN = {
    "priority": 0,
    "max_attempts": 5,
    "queue": "sql-record",
    "dead_letter_queue": None,
    "keep_for": timedelta(days=14),
}

REGISTERED = {
    "priority": 7,
    "max_attempts": 3,
    "queue": "sql-q",
    "dead_letter_queue": "sql-dlq",
    "keep_for": timedelta(hours=1),
}


# -- from SQL, from a trigger; waking workers -------------------------------------------------


@pytest.mark.timeout(60)
def test_plain_sql_enqueue_runs_the_task_and_wakes_an_idle_worker_at_once(qdsn: str) -> None:
    """``SELECT underway.enqueue('sql-record', '{"a":1}'::jsonb)`` returns the new task's id;
    an idle worker (polling only every 30 s) starts it within a couple of seconds and runs it
    with that input."""
    with supervisor(qdsn) as sup:
        started = time.monotonic()
        task_id = sql_enqueue(qdsn, "'sql-record', '{\"a\": 1}'::jsonb")
        wait_until(lambda: succeeded(qdsn, task_id), timeout=5, message=f"ran: {sup!r}")
        assert time.monotonic() - started < 2.0
    assert pickup_seconds(qdsn, task_id) < 2.0
    assert effects(qdsn) == [(task_id, "sql-record", {"a": 1}, 1, 3)]
    assert query(qdsn, "SELECT id FROM underway.task") == [(task_id,)]


@pytest.mark.timeout(60)
def test_trigger_on_an_application_table_enqueues_tasks_the_workers_run(qdsn: str) -> None:
    """An AFTER INSERT trigger calling underway.enqueue for each new row enqueues one task per
    row, in the inserting transaction: committed rows' tasks run at once (idle workers are
    woken), and a rolled-back insert leaves neither row nor task."""
    query(
        qdsn,
        """
        CREATE TABLE signup (id serial PRIMARY KEY, email text NOT NULL);
        CREATE FUNCTION enqueue_welcome() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM underway.enqueue(
                'sql-record', jsonb_build_object('signup', NEW.id, 'email', NEW.email));
            RETURN NEW;
        END $$;
        CREATE TRIGGER signup_welcome AFTER INSERT ON signup
            FOR EACH ROW EXECUTE FUNCTION enqueue_welcome();
        """,
    )
    with supervisor(qdsn, 2) as sup:
        conn = psycopg2.connect(qdsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute("INSERT INTO signup (email) VALUES ('lost@example.com')")
                assert task_count(qdsn) == 0  # not visible before the commit
                conn.rollback()
                cur.execute(
                    "INSERT INTO signup (email) VALUES ('a@example.com'), ('b@example.com')"
                )
            with conn, conn.cursor() as cur:
                cur.execute("INSERT INTO signup (email) VALUES ('c@example.com')")
        finally:
            conn.close()
        wait_until(lambda: len(effects(qdsn)) == 3, timeout=5, message=f"ran: {sup!r}")
        wait_until(lambda: scalar(qdsn, "SELECT count(*) FROM underway.task") == 3, timeout=5)
        task_ids = [i for (i,) in query(qdsn, "SELECT id FROM underway.task ORDER BY id")]
        wait_until(lambda: succeeded(qdsn, *task_ids), timeout=5, message=repr(sup))
    inputs = sorted((e[2]["signup"], e[2]["email"]) for e in effects(qdsn))
    assert inputs == [(2, "a@example.com"), (3, "b@example.com"), (4, "c@example.com")]
    for task_id in task_ids:
        assert pickup_seconds(qdsn, task_id) < 2.0
    assert query(qdsn, "SELECT id, email FROM signup ORDER BY id") == [
        (2, "a@example.com"),
        (3, "b@example.com"),
        (4, "c@example.com"),
    ]


@pytest.mark.timeout(60)
def test_delay_and_priority_arguments(qdsn: str) -> None:
    """``delay`` (seconds) sets run_at that far after the enqueue, and the task runs no
    sooner; ``priority`` orders ready tasks, higher first: tasks enqueued with priorities -1,
    none (0, built-in) and 9 before a single worker starts run as 9, 0, -1."""
    low = sql_enqueue(qdsn, "'sql-record', '{\"p\": -1}', priority => -1")
    plain = sql_enqueue(qdsn, "'sql-record', '{\"p\": 0}'")
    high = sql_enqueue(qdsn, "'sql-record', '{\"p\": 9}', priority => 9")
    later = sql_enqueue(qdsn, "'sql-record', '{\"p\": \"later\"}', 3600")
    soon = sql_enqueue(qdsn, "'sql-record', '{\"p\": \"soon\"}', delay => 1.5, priority => -5")
    assert [task_row(qdsn, i)["priority"] for i in (low, plain, high)] == [-1, 0, 9]
    assert task_row(qdsn, later)["delay"] == 3600.0
    assert task_row(qdsn, soon)["delay"] == 1.5
    with supervisor(qdsn) as sup:
        wait_until(lambda: succeeded(qdsn, low, plain, high, soon), timeout=10, message=repr(sup))
    assert [e[2]["p"] for e in effects(qdsn)] == [9, 0, -1, "soon"]
    assert pickup_seconds(qdsn, soon) >= 1.5
    assert task_row(qdsn, later)["state"] == "pending"


# -- defaults ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_defaults_are_built_in_until_a_supervisor_registers_the_job(qdsn: str) -> None:
    """Before any supervisor ran, underway.job is empty and an enqueue from SQL takes the
    built-in defaults. A supervisor stores its jobs' defaults at start (queue, priority,
    max_attempts, dead-letter queue, keep_for); from then on SQL enqueues take those, and
    arguments given still win. Each task keeps the defaults it was enqueued with: the worker
    runs the early one with 5 tries and the later one with 3, and a registered job's failing
    task lands in its dead-letter queue, kept until re-driven."""
    assert query(qdsn, "SELECT * FROM underway.job") == []
    early = sql_enqueue(qdsn, "'sql-record', '{\"n\": 1}'")
    assert task_row(qdsn, early) | {"input": None} == {
        "job": "sql-record",
        "input": None,
        "state": "pending",
        "serial_queue": None,
        "key": None,
        "delay": 0.0,
        **BUILT_IN,
    }
    with supervisor(qdsn) as sup:
        assert query(
            qdsn,
            "SELECT name, queue, priority, max_attempts, dead_letter_queue, keep_for"
            " FROM underway.job ORDER BY name",
        ) == [
            ("sql-fail", "sql-fail", 0, 1, "sql-dlq", timedelta(days=14)),
            ("sql-keyed-py", "sql-keyed-py", 0, 5, None, timedelta(days=14)),
            ("sql-keyed-sql", "sql-keyed-sql", 0, 5, None, timedelta(days=14)),
            ("sql-record", "sql-q", 7, 3, "sql-dlq", timedelta(hours=1)),
        ]
        later = sql_enqueue(qdsn, "'sql-record', '{\"n\": 2}'")
        given = sql_enqueue(
            qdsn,
            "'sql-record', '{\"n\": 3}', priority => 2, max_attempts => 1, queue => 'mine',"
            " dead_letter_queue => 'my-dlq', keep_for => interval '5 minutes'",
        )
        failing = sql_enqueue(qdsn, "'sql-fail'")
        wait_until(lambda: succeeded(qdsn, early, later, given), timeout=10, message=repr(sup))
        wait_until(lambda: task_row(qdsn, failing)["state"] == "failed", timeout=10)
    assert {k: task_row(qdsn, later)[k] for k in REGISTERED} == REGISTERED
    assert {k: task_row(qdsn, given)[k] for k in REGISTERED} == {
        "priority": 2,
        "max_attempts": 1,
        "queue": "mine",
        "dead_letter_queue": "my-dlq",
        "keep_for": timedelta(minutes=5),
    }
    assert {(e[2]["n"], e[4]) for e in effects(qdsn)} == {(1, 5), (2, 3), (3, 1)}
    assert query(
        qdsn,
        "SELECT input, dead_letter_queue, expires_at FROM underway.task WHERE id = %s",
        (failing,),
    ) == [(None, "sql-dlq", None)]
    assert scalar(
        qdsn,
        "SELECT expires_at - finished_at FROM underway.task WHERE id = %s",
        (later,),
    ) == timedelta(hours=1)


# -- bad arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "params", "says"),
    [
        pytest.param("NULL, '{}'", (), "job must be a job's name, not NULL", id="null-job"),
        pytest.param("'', '{}'", (), "job must be a job's name, not ''", id="empty-job"),
        pytest.param("'   ', '{}'", (), "job must be a job's name", id="blank-job"),
        pytest.param("'sql-record', '{}', -1", (), "delay must be finite", id="negative"),
        pytest.param("'sql-record', '{}', %s", (math.nan,), "delay must be finite", id="nan"),
        pytest.param("'sql-record', '{}', %s", (math.inf,), "delay must be finite", id="inf"),
        pytest.param("'sql-record', '{}', %s", (-math.inf,), "delay must be finite", id="-inf"),
        pytest.param("'sql-record', '{}', NULL", (), "delay must be finite", id="null-delay"),
        pytest.param(
            "'sql-record', '{}', key => 'k', key_mode => 'upsert'",
            (),
            "key_mode must be replace, preserve_run_at or keep, not 'upsert'",
            id="bad-key-mode",
        ),
        pytest.param(
            "'sql-record', '{}', key_mode => NULL",
            (),
            "key_mode must be replace, preserve_run_at or keep, not NULL",
            id="null-key-mode",
        ),
    ],
)
def test_bad_arguments_raise_a_clear_error_and_write_nothing(qdsn, args, params, says) -> None:
    """A missing or blank job, a negative, NaN, infinite or NULL delay, and an unknown or NULL
    key_mode raise invalid_parameter_value with a message naming the argument, and no task
    is written (nor any worker woken for one)."""
    conn = psycopg2.connect(qdsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("LISTEN underway")
            with pytest.raises(psycopg2.errors.InvalidParameterValue) as info:
                cur.execute(f"SELECT underway.enqueue({args})", params)
            assert str(info.value).startswith("underway.enqueue: ")
            assert says in str(info.value)
            conn.poll()
            assert conn.notifies == []
    finally:
        conn.close()
    assert task_count(qdsn) == 0


@pytest.mark.parametrize(
    ("args", "error", "says"),
    [
        pytest.param(
            "'sql-record', NULL",
            psycopg2.errors.NotNullViolation,
            '"input"',
            id="null-input",
        ),
        pytest.param(
            "'sql-record', '{}', max_attempts => 0",
            psycopg2.errors.InvalidParameterValue,
            "max_attempts",
            id="zero-max-attempts",
        ),
    ],
)
def test_values_the_task_table_refuses_write_nothing(qdsn, args, error, says) -> None:
    """A NULL input (by the task table's constraint) and max_attempts below 1 (by
    underway.enqueue) are refused with a message naming the column, and no task is written."""
    with pytest.raises(error) as info:
        sql_enqueue(qdsn, args)
    assert says in str(info.value)
    assert task_count(qdsn) == 0


@pytest.mark.parametrize(
    "args",
    [
        pytest.param("key => ''", id="empty-key"),
        pytest.param("serial_queue => ''", id="empty-serial-queue"),
        pytest.param("queue => ''", id="empty-queue"),
        pytest.param("dead_letter_queue => ''", id="empty-dead-letter-queue"),
        pytest.param("keep_for => interval '-1 day'", id="negative-keep-for"),
    ],
)
def test_arguments_python_refuses_are_refused_from_sql_too(qdsn, args) -> None:
    """What Python refuses (an empty key or queue name, a negative retention) is refused by
    underway.enqueue as well, and nothing is written."""
    with pytest.raises(psycopg2.Error):
        sql_enqueue(qdsn, f"'sql-record', '{{}}', {args}")
    assert task_count(qdsn) == 0


def test_python_refuses_those_arguments() -> None:
    """The Python side of the comparison above: each of those values is refused at once,
    by ``Job.enqueue`` or ``Job(...)``, and no job is defined."""
    with pytest.raises(TypeError):
        jobs_sql.keyed_py.enqueue({}, key="")
    with pytest.raises(TypeError):
        jobs_sql.keyed_py.enqueue({}, serial_queue="")
    for option in ({"queue": ""}, {"dead_letter_queue": ""}, {"keep_for": -86400}):
        with pytest.raises((TypeError, ValueError)):
            Job("sql-never-defined", **option)
    assert "sql-never-defined" not in registered_jobs()


# -- job keys and transactions ------------------------------------------------------------------


def key_scenario(dsn: str, job: str, enqueue) -> list[tuple]:
    """Enqueue with one key through ``enqueue(input, key_mode, delay)`` in every mode, before
    and after the holder is claimed; return what each call did, job-independently: (which task
    it returned, that task's input, whether it is due, how many tasks exist)."""
    names: dict[int, str] = {}
    trace = []

    def step(value: int, mode: str, delay: float) -> None:
        task_id = enqueue({"v": value}, mode, delay)
        names.setdefault(task_id, f"task{len(names) + 1}")
        row = query(
            dsn,
            "SELECT input, run_at <= now(), key FROM underway.task WHERE id = %s",
            (task_id,),
        )[0]
        count = scalar(dsn, "SELECT count(*) FROM underway.task WHERE job = %s", (job,))
        trace.append((names[task_id], row[0]["v"], row[1], row[2], count))

    step(1, "replace", 60)  # new, delayed
    step(2, "keep", 0)  # the pending holder, untouched
    step(3, "preserve_run_at", 0)  # new input, still delayed
    step(4, "replace", 0)  # new input, due now
    (claimed,) = query(dsn, "SELECT id FROM underway.claim_task(ARRAY[%s], 77, 30)", (job,))
    step(5, "keep", 0)  # the running holder, nothing new
    step(6, "replace", 0)  # a new holder; the running one gives the key up
    step(7, "preserve_run_at", 0)  # the new pending holder
    released = query(dsn, "SELECT key, input FROM underway.task WHERE id = %s", claimed)
    trace.append(("running task", released[0][1]["v"], None, released[0][0], None))
    return trace


def test_job_keys_from_sql_behave_as_from_python(qdsn: str) -> None:
    """The same sequence of keyed enqueues (replace, keep, preserve_run_at; before and after
    the holder is claimed) through ``Job.enqueue(key=...)`` and through
    ``underway.enqueue(key => ..., key_mode => ...)`` returns the same tasks in the same
    states: at most one pending task holds the key, keep leaves it alone, preserve_run_at
    keeps its run time, and a running holder hands the key to a new task (except in keep
    mode)."""

    def from_python(inp, mode, delay):
        return jobs_sql.keyed_py.enqueue(inp, key="k", key_mode=mode, delay=delay).id

    def from_sql(inp, mode, delay):
        return sql_enqueue(
            qdsn,
            "'sql-keyed-sql', %s::jsonb, %s, key => 'k', key_mode => %s",
            (psycopg2.extras.Json(inp), delay, mode),
        )

    expected = [
        ("task1", 1, False, "k", 1),
        ("task1", 1, False, "k", 1),
        ("task1", 3, False, "k", 1),
        ("task1", 4, True, "k", 1),
        ("task1", 4, True, "k", 1),
        ("task2", 6, True, "k", 2),
        ("task2", 7, True, "k", 2),
        ("running task", 4, None, None, None),
    ]
    assert key_scenario(qdsn, "sql-keyed-py", from_python) == expected
    assert key_scenario(qdsn, "sql-keyed-sql", from_sql) == expected


def test_rolled_back_transaction_enqueues_nothing(qdsn: str) -> None:
    """underway.enqueue writes in the caller's transaction: rolled back, it leaves no task, no
    notification, and a keyed enqueue's change to the pending holder is undone too."""
    holder = sql_enqueue(qdsn, "'sql-record', '{\"v\": 1}', 60, key => 'k'")
    listener = psycopg2.connect(qdsn)
    listener.autocommit = True
    conn = psycopg2.connect(qdsn)
    try:
        with listener.cursor() as cur:
            cur.execute("LISTEN underway")
        with conn.cursor() as cur:
            cur.execute("SELECT underway.enqueue('sql-record', '{\"v\": 2}')")
            (new_id,) = cur.fetchone()
            cur.execute("SELECT underway.enqueue('sql-record', '{\"v\": 3}', 0, key => 'k')")
            assert cur.fetchone() == (holder,)
            assert scalar(qdsn, "SELECT count(*) FROM underway.task") == 1  # not visible yet
        conn.rollback()
        listener.poll()
        assert listener.notifies == []
    finally:
        conn.close()
        listener.close()
    assert new_id != holder
    assert query(qdsn, "SELECT id, input, run_at > now() FROM underway.task") == [
        (holder, {"v": 1}, True)
    ]


def test_sql_defaults_are_the_python_defaults(qdsn: str) -> None:
    """The defaults written in SQL (the task table's columns, and underway.enqueue for a job
    no supervisor registered yet) are those of the Python API: 5 tries, kept 14 days. The
    schema cannot import Python, so this test is what keeps the two from drifting."""
    task_id = scalar(qdsn, "SELECT underway.enqueue('nobody-registered-this', '{}')")
    tries, kept = query(
        qdsn, "SELECT max_attempts, keep_for FROM underway.task WHERE id = %s", (task_id,)
    )[0]
    assert (tries, kept) == (DEFAULT_MAX_ATTEMPTS, DEFAULT_KEEP_FOR)
    columns = dict(
        query(
            qdsn,
            "SELECT column_name, column_default FROM information_schema.columns"
            " WHERE table_schema = 'underway' AND table_name = 'task'"
            " AND column_name IN ('max_attempts', 'keep_for')",
        )
    )
    assert columns == {
        "max_attempts": str(DEFAULT_MAX_ATTEMPTS),
        "keep_for": f"'{DEFAULT_KEEP_FOR.days} days'::interval",
    }
