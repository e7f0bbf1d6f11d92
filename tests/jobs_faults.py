"""Jobs for the supervisor and fault-injection tests (``test_supervisor.py``, ``test_faults.py``).

Imported by the test process (to enqueue) and by ``python -m underway.supervisor jobs_faults``
(to run). Every step that does something writes one row into ``faults_effect`` through the
step's own transaction (``cx.cursor()``), so counting rows there tells which tries committed.

A step that must "hang" first writes its effect row, then waits for a shared advisory lock that
the test holds (``pg_advisory_xact_lock_shared``): the test decides when it may finish, sees it
waiting in ``pg_locks``, and a step cut off while waiting never commits its effect row.

The SQL helpers at the bottom are shared by both test files; they use plain psycopg2 so that the
supervisor's processes import nothing but the library.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import psycopg2
from jobs_common import sql

from underway import Job, RetryPolicy, To

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS faults_effect (
    id bigserial PRIMARY KEY,
    task_id bigint NOT NULL,
    step integer NOT NULL,
    attempt integer NOT NULL,
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

#: A job that no module defines: its tasks must be left alone by every worker here.
UNDEFINED_JOB = "faults-undefined"


def record(cx: Any) -> None:
    """Write this try's effect row in the step's transaction."""
    with cx.cursor() as cur:
        cur.execute(
            "INSERT INTO faults_effect (task_id, step, attempt, pid) VALUES (%s, %s, %s, %s)",
            (cx.task_id, cx.step, cx.attempt, os.getpid()),
        )


# -- jobs ------------------------------------------------------------------------------------

two_step = Job("faults-two-step")


@two_step.step
def first(cx: Any, inp: Any) -> To:
    """Step 0: record, hand the input on."""
    record(cx)
    return To.next(inp)


@two_step.step
def second(cx: Any, inp: Any) -> None:
    """Step 1: record, done."""
    record(cx)


one_step = Job("faults-one-step")


@one_step.step
def only(cx: Any, inp: Any) -> None:
    """Record, done."""
    record(cx)


noop = Job("faults-noop")


@noop.step
def nothing(cx: Any, inp: Any) -> None:
    """Do nothing at all (for throughput)."""


blocking = Job("faults-block", retry=RetryPolicy(max_attempts=5, initial_interval=0.05))


@blocking.step
def hold(cx: Any, inp: Any) -> None:
    """Record, then wait until the test releases advisory lock ``inp['lock']``.

    Only tries up to ``inp['block_attempts']`` (default 1) wait; later tries go straight on.
    """
    record(cx)
    if cx.attempt <= inp.get("block_attempts", 1):
        with cx.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (inp["lock"],))


poison = Job("faults-poison", retry=RetryPolicy(max_attempts=3, initial_interval=0.05))


@poison.step
def kill_own_worker(cx: Any, inp: Any) -> None:
    """SIGKILL the worker running this step, every time, before anything commits."""
    record(cx)
    os.kill(os.getpid(), signal.SIGKILL)


# -- SQL helpers for the tests -----------------------------------------------------------------


def enqueue_fresh(dsn: str, job: Job, inputs: list[Any]) -> list[int]:
    """Enqueue on a new connection of our own, committed on return; returns the task ids.

    Used right after a fault, so that what is tested is the workers' recovery, not that of
    this process's own enqueue connection (``test_enqueue.py`` covers that).
    """
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn:
            tasks = job.enqueue_many(inputs, conn=conn)
        return [t.id for t in tasks]
    finally:
        conn.close()


def prepare(dsn: str) -> None:
    """Create the effects table in the test database."""
    sql(dsn, EFFECTS_DDL)


def effects(dsn: str, task_id: int | None = None) -> list[tuple[int, int, int]]:
    """Committed effect rows as (task_id, step, attempt), optionally for one task."""
    rows = sql(
        dsn,
        "SELECT task_id, step, attempt FROM faults_effect"
        " WHERE %(id)s::bigint IS NULL OR task_id = %(id)s ORDER BY id",
        {"id": task_id},
    )
    return [tuple(r) for r in rows]  # type: ignore[misc]


def lock_waiters(dsn: str, key: int) -> list[int]:
    """Pids of the workers whose step is waiting for advisory lock ``key`` in this database."""
    rows = sql(
        dsn,
        """
        SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND NOT l.granted AND l.classid = 0 AND l.objid = %s
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        """,
        (key,),
    )
    return sorted(int(name.rsplit(" ", 1)[1]) for (name,) in rows if name.startswith("underway w"))


def underway_backends(dsn: str) -> list[tuple[str, str, str]]:
    """(application_name, state, query) of the supervisor's, workers' and scheduler's backends."""
    rows = sql(
        dsn,
        """
        SELECT application_name, coalesce(state, ''), coalesce(query, '') FROM pg_stat_activity
        WHERE datname = current_database()
          AND application_name ~ '^underway (worker|supervisor|scheduler) '
        ORDER BY application_name
        """,
    )
    return [tuple(r) for r in rows]  # type: ignore[misc]


def idle_listening_workers(dsn: str) -> list[str]:
    """Workers whose last statement was the idle wait's due-time query and that are idle now:
    they are in (or about to enter) their LISTEN wait."""
    return [
        name
        for name, state, query in underway_backends(dsn)
        if name.startswith("underway worker ")
        and state == "idle"
        and query.startswith("EXECUTE underway_seconds_until_due")
    ]


def attempts_of(dsn: str, task_id: int) -> list[tuple[int, int, str]]:
    """The attempt history of a task as (step, attempt, outcome), oldest first."""
    rows = sql(
        dsn,
        "SELECT step, attempt, outcome FROM underway.attempt WHERE task_id = %s ORDER BY id",
        (task_id,),
    )
    return [tuple(r) for r in rows]  # type: ignore[misc]


def task_row(dsn: str, task_id: int) -> dict[str, Any]:
    """The task row as a dict."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT * FROM underway.task WHERE id = %s", (task_id,))
            row = cur.fetchone()
            assert row is not None, f"no task {task_id}"
            return {d.name: v for d, v in zip(cur.description, row)}
    finally:
        conn.close()


def states(dsn: str, job: str | None = None) -> dict[str, int]:
    """How many tasks are in each state (optionally of one job)."""
    rows = sql(
        dsn,
        "SELECT state::text, count(*) FROM underway.task"
        " WHERE %(job)s::text IS NULL OR job = %(job)s GROUP BY 1",
        {"job": job},
    )
    return dict(rows)  # type: ignore[arg-type]


class Gate:
    """Advisory locks the test holds on a connection of its own. A ``faults-block`` step waits
    for its key (as a shared lock) until the test releases it; a new key per use keeps
    released steps from ever waiting again."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg2.connect(dsn, connect_timeout=10)
        self.conn.autocommit = True
        self.held: set[int] = set()

    def hold(self, key: int) -> int:
        """Take lock ``key`` (exclusively); steps waiting on it block until :meth:`release`."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (key,))
        self.held.add(key)
        return key

    def release(self, key: int) -> None:
        """Let the steps waiting on ``key`` go on."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
            assert cur.fetchone() == (True,), f"lock {key} was not held"
        self.held.discard(key)

    def close(self) -> None:
        """Drop the connection (and with it every lock still held)."""
        self.conn.close()


def worker_backends(dsn: str, pid: int) -> int:
    """How many backends of this database belong to worker process ``pid`` (dead or alive)."""
    rows = sql(
        dsn,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = %s",
        (f"underway worker {pid}",),
    )
    return int(rows[0][0])


def holds_for(seconds: float, predicate: Callable[[], Any], message: str = "") -> None:
    """Assert that ``predicate()`` stays truthy for ``seconds``, checking it continuously.

    Used to show that something does *not* happen (an exit, a kill, a new start) in a window;
    the window ends early only by failing.
    """
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        assert value, f"stopped holding: {message or predicate!r}; last value: {value!r}"
        if time.monotonic() >= deadline:
            return
        time.sleep(0.01)
