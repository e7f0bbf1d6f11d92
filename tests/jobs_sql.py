"""Jobs for ``tests/test_sql_enqueue.py``: tasks enqueued from SQL with ``underway.enqueue``.

Imported by the test process (to enqueue from Python for comparison) and by
``python -m underway.supervisor jobs_sql``, which stores their defaults in ``underway.job``
at start. Names start with ``sql-``. Every step records its call in ``sql_effect`` through
the step's own transaction, with what the step saw in ``cx``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg2
import psycopg2.extras
from jobs_common import sql

from underway import Job, RetryPolicy

DDL = """
CREATE TABLE IF NOT EXISTS sql_effect (
    id bigserial PRIMARY KEY,
    task_id bigint NOT NULL,
    job text NOT NULL,
    input jsonb,
    attempt integer NOT NULL,
    max_attempts integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def prepare(dsn: str) -> None:
    """Create the table the steps record their calls in."""
    sql(dsn, DDL)


def record(cx: Any, inp: Any) -> None:
    """Record this call, with the input and what cx says about tries."""
    with cx.cursor() as cur:
        cur.execute(
            "INSERT INTO sql_effect (task_id, job, input, attempt, max_attempts)"
            " VALUES (%s, %s, %s, %s, %s)",
            (cx.task_id, cx.job, psycopg2.extras.Json(inp), cx.attempt, cx.max_attempts),
        )


#: A job whose defaults all differ from the built-in ones, to tell registered from built-in.
recorded = Job(
    "sql-record",
    queue="sql-q",
    priority=7,
    retry=RetryPolicy(max_attempts=3, initial_interval=30),
    dead_letter_queue="sql-dlq",
    keep_for=timedelta(hours=1),
)
recorded.step(record)

failing = Job("sql-fail", retry=RetryPolicy(max_attempts=1), dead_letter_queue="sql-dlq")


@failing.step
def fail(cx: Any, inp: Any) -> None:
    """Fail every try."""
    raise RuntimeError("sql-fail fails")


#: Two jobs with the same (built-in) defaults, for job keys enqueued from Python and from SQL.
keyed_py = Job("sql-keyed-py")
keyed_py.step(record)
keyed_sql = Job("sql-keyed-sql")
keyed_sql.step(record)
