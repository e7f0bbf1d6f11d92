"""Jobs for ``tests/test_timeouts.py``: steps that overrun their timeout in every way a step can.

Imported by the test process (to enqueue, and to run steps in-process) and by
``python -m underway.supervisor jobs_timeouts`` (to run them in real worker processes, where
SIGALRM belongs to underway). Names start with ``timeouts-``.

Each step leaves two kinds of trace:

- ``mark(cx, note)`` writes a ``timeouts_effect`` row through the step's own transaction: it
  commits only if the try succeeds, so a timed-out try must leave none;
- ``note(inp, cx, text)`` writes a ``timeouts_note`` row on a separate autocommit connection
  (the DSN travels in the input): it survives whatever happens to the try, so the test can see
  how far a step got, which process ran it and what it caught.

A step that must be stuck where SIGALRM cannot reach it waits, inside libpq, for a shared
advisory lock that the test holds (``gate``): libpq retries its ``poll()`` on EINTR, so Python's
signal handler only runs once the query returns, and only the supervisor's SIGKILL ends it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg2
from jobs_common import sql

from underway import Job, RetryPolicy, To

DDL = """
CREATE TABLE IF NOT EXISTS timeouts_effect (
    id bigserial PRIMARY KEY,
    task_id bigint NOT NULL,
    attempt integer NOT NULL,
    pid integer NOT NULL,
    note text,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS timeouts_note (
    id bigserial PRIMARY KEY,
    task_id bigint NOT NULL,
    attempt integer NOT NULL,
    pid integer NOT NULL,
    note text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""

#: application_name of the separate connection a stuck step blocks on.
BLOCKER = "timeouts-blocker"

#: Quick retries, so that a second try follows a timed-out one at once.
QUICK = RetryPolicy(max_attempts=2, initial_interval=0.05)
ONCE = RetryPolicy(max_attempts=1)


def prepare(dsn: str) -> None:
    """Create the tables the steps write to."""
    sql(dsn, DDL)


def mark(cx: Any, note: str | None = None) -> None:
    """A ``timeouts_effect`` row in the step's transaction: it commits with the try or never."""
    with cx.cursor() as cur:
        cur.execute(
            "INSERT INTO timeouts_effect (task_id, attempt, pid, note) VALUES (%s, %s, %s, %s)",
            (cx.task_id, cx.attempt, os.getpid(), note),
        )


def note(inp: Any, cx: Any, text: str) -> None:
    """A ``timeouts_note`` row committed at once on a connection of its own."""
    conn = psycopg2.connect(inp["dsn"], connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO timeouts_note (task_id, attempt, pid, note) VALUES (%s, %s, %s, %s)",
                (cx.task_id, cx.attempt, os.getpid(), text),
            )
    finally:
        conn.close()


def hangs_now(cx: Any, inp: Any) -> bool:
    """Whether this try should hang: tries up to ``inp['hang_tries']`` (default: all) do."""
    return cx.attempt <= inp.get("hang_tries", 1_000)


# -- stuck in pure Python: SIGALRM interrupts ----------------------------------------------

spin = Job("timeouts-spin", timeout=1, retry=QUICK)


@spin.step
def spin_forever(cx: Any, inp: Any) -> None:
    """Write through cx, then spin (``while True: pass``) on the tries that hang."""
    mark(cx, "before the hang")
    note(inp, cx, "entered")
    if hangs_now(cx, inp):
        while True:
            pass
    mark(cx, "after")


nap = Job("timeouts-nap", timeout=1, retry=QUICK)


@nap.step
def nap_forever(cx: Any, inp: Any) -> None:
    """Write through cx, then sleep in a loop on the tries that hang."""
    mark(cx, "before the hang")
    note(inp, cx, "entered")
    if hangs_now(cx, inp):
        while True:
            time.sleep(0.05)
    mark(cx, "after")


swallow = Job("timeouts-swallow", timeout=1, retry=ONCE)


@swallow.step
def swallow_exceptions(cx: Any, inp: Any) -> None:
    """Hang in a loop whose ``except Exception`` swallows whatever it can."""
    mark(cx, "before the hang")
    note(inp, cx, "entered")
    while True:
        try:
            time.sleep(0.05)
        except Exception as exc:  # the step's own blanket handler; StepTimeout gets past it
            note(inp, cx, f"swallowed {type(exc).__name__}")


late = Job("timeouts-late", timeout=1, retry=ONCE)


@late.step
def catch_and_return_late(cx: Any, inp: Any) -> None:
    """Catch the interruption as BaseException, write through cx and return as if done."""
    mark(cx, "before the hang")
    try:
        while True:
            time.sleep(0.05)
    except BaseException as exc:  # swallowing it is what this step tests
        note(inp, cx, f"caught {type(exc).__name__}: {exc}")
        mark(cx, "after catching the timeout")
    return None


# -- stuck where SIGALRM cannot reach: the supervisor kills the worker ---------------------


def block_in_libpq(cx: Any, inp: Any) -> None:
    """Note the try, then (on the tries that hang) wait inside libpq for advisory lock
    ``inp['lock']``, held by the test, on a connection of the step's own."""
    note(inp, cx, "entered")
    if hangs_now(cx, inp):
        conn = psycopg2.connect(inp["dsn"], connect_timeout=10, application_name=BLOCKER)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (inp["lock"],))
        note(inp, cx, "lock granted")
    mark(cx, "done")


stuck = Job("timeouts-stuck", timeout=1, retry=QUICK)
stuck.step(block_in_libpq)

stuck_once = Job("timeouts-stuck-once", timeout=1, retry=ONCE)
stuck_once.step(block_in_libpq)

#: Retries connection errors only: a timeout is not among them, whoever ends the step.
stuck_strict = Job(
    "timeouts-stuck-strict",
    timeout=1,
    retry=RetryPolicy(max_attempts=3, initial_interval=0.05, retry_on=(ConnectionError,)),
)
stuck_strict.step(block_in_libpq)

#: Retries a timeout, an hour later.
stuck_later = Job(
    "timeouts-stuck-later",
    timeout=1,
    retry=RetryPolicy(max_attempts=3, initial_interval=3600, max_interval=3600),
)
stuck_later.step(block_in_libpq)

deaf = Job("timeouts-deaf", timeout=1, retry=ONCE)


@deaf.step
def ignore_every_interruption(cx: Any, inp: Any) -> None:
    """Catch the interruption as BaseException and keep going, forever."""
    note(inp, cx, "entered")
    while True:
        try:
            time.sleep(0.05)
        except BaseException:  # ignoring it is what this step tests
            note(inp, cx, "ignored the interruption")


# -- a statement through cx: statement_timeout cancels it -------------------------------------

statement = Job("timeouts-statement", timeout=1, retry=ONCE)


@statement.step
def sleep_in_the_database(cx: Any, inp: Any) -> None:
    """Note the statement_timeout of the step's transaction, then sleep 30 s in a statement
    through cx, noting what ends it."""
    with cx.cursor() as cur:
        cur.execute("SELECT setting FROM pg_settings WHERE name = 'statement_timeout'")
        note(inp, cx, f"statement_timeout={cur.fetchone()[0]}")
        try:
            cur.execute("SELECT pg_sleep(30)")
        except psycopg2.Error as exc:
            note(inp, cx, f"statement ended: {type(exc).__name__}")
            raise
    note(inp, cx, "slept 30 s")


# -- timeouts as configured ------------------------------------------------------------------

probe = Job("timeouts-probe")


@probe.step
def report_time_left(cx: Any, inp: Any) -> None:
    """Commit the time the step has left, as the deadline and as the statement_timeout of its
    transaction, in milliseconds."""
    left_ms = round((cx.deadline - time.monotonic()) * 1000)
    with cx.cursor() as cur:
        cur.execute("SELECT setting FROM pg_settings WHERE name = 'statement_timeout'")
        setting = cur.fetchone()[0]
    mark(cx, f"deadline_ms={left_ms} statement_timeout_ms={setting}")


overrides = Job("timeouts-overrides", timeout=60, retry=ONCE)


@overrides.step(timeout=0.2)
def shorter_than_the_job(cx: Any, inp: Any) -> To:
    """Sleep ``inp['sleep_first']`` seconds under a step timeout shorter than the job's."""
    time.sleep(inp.get("sleep_first", 0))
    mark(cx, "first")
    return To.next(inp)


@overrides.step
def as_the_job(cx: Any, inp: Any) -> None:
    """Sleep ``inp['sleep_second']`` seconds under the job's 60 s timeout."""
    time.sleep(inp.get("sleep_second", 0))
    mark(cx, "second")


tight = Job("timeouts-tight", timeout=0.2, retry=ONCE)


@tight.step(timeout=30)
def longer_than_the_job(cx: Any, inp: Any) -> None:
    """Sleep ``inp['sleep']`` seconds under a step timeout longer than the job's 0.2 s."""
    time.sleep(inp.get("sleep", 0))
    mark(cx, "done")


late_error = Job("timeouts-late-error", timeout=0.2, retry=ONCE)


@late_error.step
def fail_after_sleeping(cx: Any, inp: Any) -> None:
    """Sleep ``inp['sleep']`` seconds, then raise an error of the step's own."""
    time.sleep(inp["sleep"])
    raise ValueError("the step's own error")


slow = Job("timeouts-slow", timeout=0.3, retry=QUICK)


@slow.step
def sleep_past_the_timeout(cx: Any, inp: Any) -> None:
    """Write through cx, then sleep ``inp['sleep']`` seconds on the tries that hang."""
    mark(cx, "before the sleep")
    if hangs_now(cx, inp):
        time.sleep(inp["sleep"])
    mark(cx, "after")
