"""Jobs for the metrics, logging and tracing tests (``test_metrics.py``, ``test_logs.py``,
``test_tracing.py``), run by ``python -m underway.supervisor jobs_observe`` or in-process.

Every try writes one ``observe_effect`` row (its worker's pid) through the step's own
transaction, so the tests know which processes ran which tries. A task whose input says
``meet: N`` (and ``dsn``) first waits, on a connection of its own, until N such tasks run at once: N
workers then provably share the work.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from jobs_common import sql

from underway import Job, RetryPolicy, To

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS observe_effect (
    id bigserial PRIMARY KEY,
    task_id bigint NOT NULL,
    job text NOT NULL,
    step integer NOT NULL,
    attempt integer NOT NULL,
    pid integer NOT NULL
);
CREATE TABLE IF NOT EXISTS observe_meeting (pid integer NOT NULL, task_id bigint NOT NULL);
"""

#: How long a ``meet`` step waits for the others before it fails.
MEET_WITHIN = 10.0


def prepare(dsn: str) -> None:
    """Create the tables the steps write to."""
    sql(dsn, EFFECTS_DDL)


def record(cx: Any) -> None:
    """Write this try's row in the step's transaction."""
    with cx.cursor() as cur:
        cur.execute(
            "INSERT INTO observe_effect (task_id, job, step, attempt, pid)"
            " VALUES (%s, %s, %s, %s, %s)",
            (cx.task_id, cx.job, cx.step, cx.attempt, os.getpid()),
        )


def meet(cx: Any, dsn: str, count: int) -> None:
    """Say this task runs now (committed at once, on a connection of its own) and wait, with
    a deadline, until ``count`` tasks of distinct workers do."""
    sql(dsn, "INSERT INTO observe_meeting VALUES (%s, %s)", (os.getpid(), cx.task_id))
    deadline = time.monotonic() + MEET_WITHIN
    while time.monotonic() < deadline:
        if sql(dsn, "SELECT count(DISTINCT pid) FROM observe_meeting")[0][0] >= count:
            return
        time.sleep(0.01)  # polling another worker's progress, with a deadline
    raise RuntimeError(f"{count} workers never met")


def explode(message: str) -> None:
    """Raise; a distinctive name for tracebacks to mention."""
    raise RuntimeError(message)


# -- two steps that succeed -----------------------------------------------------------------

ok = Job("observe-ok", queue="observe")


@ok.step
def fetch(cx: Any, inp: dict[str, Any]) -> To:
    record(cx)
    if inp.get("meet"):
        meet(cx, inp["dsn"], inp["meet"])
    return To.next(inp)


@ok.step
def store(cx: Any, inp: dict[str, Any]) -> None:
    record(cx)


# -- fails its first try, then succeeds -----------------------------------------------------

flaky = Job("observe-flaky", queue="observe", retry=RetryPolicy(max_attempts=3, initial_interval=0))


@flaky.step
def attempt(cx: Any, inp: Any) -> None:
    record(cx)
    if cx.attempt == 1:
        explode(f"flaky on try {cx.attempt}")


# -- fails every try, two in all ------------------------------------------------------------

doomed = Job(
    "observe-doomed", queue="doomed", retry=RetryPolicy(max_attempts=2, initial_interval=0)
)


@doomed.step
def crash(cx: Any, inp: Any) -> None:
    record(cx)
    explode("doomed for good")


# -- a queue the tests pause -----------------------------------------------------------------

held = Job("observe-held", queue="observe-paused")


@held.step
def never(cx: Any, inp: Any) -> None:
    record(cx)


# -- a step that calls sys.exit(): a BaseException, which fails the try all the same ---------

quits = Job("observe-quits", queue="observe", retry=RetryPolicy(max_attempts=1))


@quits.step
def leave(cx: Any, inp: Any) -> None:
    record(cx)
    sys.exit(3)
