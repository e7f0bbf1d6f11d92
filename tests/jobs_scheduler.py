"""Jobs for ``tests/test_scheduler.py``, run in-process and by ``python -m underway.supervisor``.

Every step writes one ``sched_runs`` row through the step's own transaction (``cx.cursor()``):
the task id, the job, the tick the run serves (``cx.scheduled_at``) and its input. The table has
no unique constraint on purpose, so a tick that ran twice shows up as two rows. Job names start
with ``sched-`` to stay unique across the suite.
"""

from __future__ import annotations

import json
from typing import Any

from jobs_common import sql

from underway import Job

RUNS_DDL = """
CREATE TABLE IF NOT EXISTS sched_runs (
    id bigserial PRIMARY KEY,
    task_id bigint NOT NULL,
    job text NOT NULL,
    scheduled_at timestamptz,
    input jsonb,
    pid integer NOT NULL DEFAULT pg_backend_pid(),
    ran_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def prepare(dsn: str) -> None:
    """Create the table the steps write to."""
    sql(dsn, RUNS_DDL)


def record(cx: Any, inp: Any) -> None:
    """Write this run's ``sched_runs`` row in the step's transaction; the run is then done."""
    with cx.cursor() as cur:
        cur.execute(
            "INSERT INTO sched_runs (task_id, job, scheduled_at, input)"
            " VALUES (%s, %s, %s, %s::jsonb)",
            (cx.task_id, cx.job, cx.scheduled_at, json.dumps(inp)),
        )


#: The job the tests schedule.
report = Job("sched-report")
report.step(record)

#: A plain job, enqueued (never scheduled) as a marker that a worker is alive.
marker = Job("sched-marker")
marker.step(record)

#: Every job of this module, by name, as ``Scheduler`` and ``Worker`` take them.
JOBS = {job.name: job for job in (report, marker)}
