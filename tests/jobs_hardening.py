"""Jobs for the hardening tests of issue #14 (``tests/test_hardening.py``, ``test_roles.py``,
``test_pgbouncer.py``).

Imported by the test process (to enqueue, and to drive in-process workers) and by
``python -m underway.supervisor jobs_hardening``. Steps that do something write a row into
``hardening_effect`` through ``cx`` (the step's own transaction), so a row proves which
tries committed. Names start with ``hardening-``.

Only the library and psycopg2 are imported here: no pytest, no psutil.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

import psycopg2
from jobs_common import sql

from underway import Job, RetryPolicy

DDL = """
CREATE TABLE IF NOT EXISTS hardening_effect (
    id bigserial PRIMARY KEY,
    task_id bigint NOT NULL,
    job text NOT NULL,
    attempt integer NOT NULL,
    pid integer NOT NULL,
    input jsonb
)
"""

#: Tries for the echo jobs; the tests rely on 3 (a wrongly charged task would not fail at once).
ECHO_TRIES = 3


def prepare(dsn: str) -> None:
    """Create the effects table in the test database."""
    sql(dsn, DDL)


def record(cx: Any, inp: Any = None) -> None:
    """Write this try's effect row in the step's transaction."""
    with cx.cursor() as cur:
        cur.execute(
            "INSERT INTO hardening_effect (task_id, job, attempt, pid, input)"
            " VALUES (%s, %s, %s, %s, %s::jsonb)",
            (cx.task_id, cx.job, cx.attempt, os.getpid(), json.dumps(inp)),
        )


def effects(dsn: str, task_id: int | None = None) -> list[tuple[int, str, int]]:
    """Committed effect rows as (task_id, job, attempt), oldest first."""
    rows = sql(
        dsn,
        "SELECT task_id, job, attempt FROM hardening_effect"
        " WHERE %(id)s::bigint IS NULL OR task_id = %(id)s ORDER BY id",
        {"id": task_id},
    )
    return [tuple(r) for r in rows]  # type: ignore[misc]


# -- plain jobs -------------------------------------------------------------------------------

echo = Job("hardening-echo", retry=RetryPolicy(max_attempts=ECHO_TRIES, initial_interval=0))


@echo.step
def echo_step(cx: Any, inp: Any) -> Any:
    """Record the input; done."""
    record(cx, inp)


dlq_echo = Job(
    "hardening-dlq-echo",
    retry=RetryPolicy(max_attempts=ECHO_TRIES, initial_interval=0),
    dead_letter_queue="hardening-dlq",
)


@dlq_echo.step
def dlq_echo_step(cx: Any, inp: Any) -> Any:
    """Record the input; done. Failed tasks go to the ``hardening-dlq`` dead-letter queue."""
    record(cx, inp)


# -- steps that fail in awkward ways ----------------------------------------------------------

HUGE_MESSAGE_CHARS = 20 * 1024 * 1024


class BrokenStr(Exception):
    """An exception that cannot even say what it is."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ of BrokenStr failed")


def _chain(depth: int) -> None:
    """Raise an exception with ``depth`` causes chained behind it, each with its own text."""
    if depth == 0:
        raise ValueError("the root cause")
    try:
        _chain(depth - 1)
    except Exception as exc:
        raise RuntimeError(f"wrapped at depth {depth}: " + "t" * 200) from exc


awkward = Job("hardening-awkward", retry=RetryPolicy(max_attempts=1))


@awkward.step
def misbehave(cx: Any, inp: dict[str, Any]) -> Any:
    """Fail as ``inp["how"]`` says, after writing an effect row (which must roll back)."""
    record(cx, inp)
    how = inp["how"]
    if how == "nul":
        raise RuntimeError("bad\x00byte")
    if how == "surrogate":
        raise RuntimeError("lone \ud800 surrogate")
    if how == "exit":
        sys.exit(3)
    if how == "interrupt":
        raise KeyboardInterrupt("ctrl-c in a step")
    if how == "huge":
        raise RuntimeError("x" * HUGE_MESSAGE_CHARS)
    if how == "long-traceback":
        _chain(400)
    if how == "broken-str":
        raise BrokenStr()
    if how == "swallow-sql":
        with cx.cursor() as cur, contextlib.suppress(Exception):
            # Careless: the transaction is now aborted, and the step returns.
            cur.execute("SELECT 1 / 0")
        return None
    if how == "foreign-db":
        # Another database the step talks to is down: its error is the step's, not an
        # outage of the worker's own database.
        psycopg2.connect("host=/nonexistent-underway-test dbname=elsewhere connect_timeout=1")
    if how == "read-only":
        with cx.cursor() as cur:
            cur.execute("SET TRANSACTION READ ONLY")
            cur.execute("CREATE TEMPORARY TABLE refused (x int)")
    if how == "ok":
        return None
    raise AssertionError(f"unknown how {how!r}")


outsized = Job("hardening-outsized", retry=RetryPolicy(max_attempts=ECHO_TRIES, initial_interval=0))


@outsized.step
def return_too_much(cx: Any, inp: Any) -> Any:
    """Write an effect row (which must roll back), then return a result over 16 MiB."""
    record(cx, inp)
    return {"blob": "x" * (16 * 1024 * 1024)}


# -- steps that commit the worker's transaction themselves ------------------------------------

committer = Job("hardening-commit", retry=RetryPolicy(max_attempts=ECHO_TRIES, initial_interval=0))


@committer.step
def commit_then(cx: Any, inp: dict[str, Any]) -> Any:
    """Write an effect row, COMMIT it through cx, then fail or return as ``inp["then"]``
    says. ``"begin"`` opens a new transaction after the COMMIT, hiding it."""
    record(cx, inp)
    with cx.cursor() as cur:
        cur.execute("COMMIT")
        if inp["then"] == "begin":
            cur.execute("BEGIN")
    if inp["then"] in ("raise", "begin"):
        raise RuntimeError("failed after committing")
    return None


deallocator = Job(
    "hardening-deallocate", retry=RetryPolicy(max_attempts=ECHO_TRIES, initial_interval=0)
)


@deallocator.step
def deallocate_then(cx: Any, inp: dict[str, Any]) -> Any:
    """Write an effect row, DEALLOCATE ALL the session's prepared statements (the
    worker's among them), then fail or return as ``inp["then"]`` says."""
    record(cx, inp)
    with cx.cursor() as cur:
        cur.execute("DEALLOCATE ALL")
    if inp["then"] == "raise":
        raise RuntimeError("failed after deallocating")
    return None


# -- a step that holds a lock while it waits --------------------------------------------------

holder = Job("hardening-hold", retry=RetryPolicy(max_attempts=ECHO_TRIES, initial_interval=0))


@holder.step
def hold(cx: Any, inp: dict[str, Any]) -> None:
    """Write this process's pid to ``inp["pidfile"]``, take advisory lock ``inp["own"]``
    (exclusively, for the transaction), then wait for lock ``inp["wait"]``, which the test
    holds: a long statement holding a lock. Tries after the first go straight on."""
    with open(inp["pidfile"], "w", encoding="utf-8") as out:
        out.write(str(os.getpid()))
    if cx.attempt > 1:
        return
    with cx.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (inp["own"],))
        cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (inp["wait"],))


# -- schedules --------------------------------------------------------------------------------

stepless = Job("hardening-a-stepless")
"""A job without steps, defined where a supervisor runs it: a schedule stored for it from
SQL cannot fire. Its name sorts before ``hardening-tick``."""

ticker = Job("hardening-tick")


@ticker.step
def tick(cx: Any, inp: Any) -> None:
    """Record the tick."""
    record(cx, {"scheduled_at": str(cx.scheduled_at)})
