"""The store: the one module that speaks SQL to underway's schema.

Every query lives in ``queries.sql``, named and described; this module loads them and
gives each a typed function, so the rest of the package calls ``store.claim_task(cur,
...)`` and gets a :class:`~underway.records.Claim` back, never a tuple to unpack by
position. Rows are mapped into records by column name: a query whose columns drift from
its record fails loudly at the first call. The transaction verbs (begin with a deadline,
commit, rollback, listen, notify) live here too.

Functions take a cursor, so that they run in whatever transaction the caller is in: the
worker's step, an application's own (``conn=``), or an autocommit connection.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg2.errors

from .errors import SchemaMissing
from .records import (
    Claim,
    DeadLetter,
    QueueSummary,
    Recorded,
    Release,
    StoredSchedule,
    TaskInfo,
    TaskState,
)

Cursor = Any
"""A psycopg2 cursor (``psycopg2.extensions.cursor``)."""

R = TypeVar("R")

TASK_CHANNEL = "underway"
"""The channel that wakes idle workers: a task was enqueued, became due or was released,
or a queue was resumed. The schema's triggers and ``underway.enqueue`` notify it too."""

SCHEDULE_CHANNEL = "underway_schedule"
"""The channel that tells schedulers a schedule was stored, changed or removed."""

_HEADER = re.compile(r"^-- name: (\S+)\n", re.MULTILINE)


def load_queries(text: str) -> dict[str, str]:
    """Split a queries file into ``{name: sql}``; comment lines are left out of the SQL."""
    parts = _HEADER.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        lines = [line for line in body.splitlines() if not line.startswith("--")]
        queries[name] = "\n".join(lines).strip()
    return queries


QUERIES = load_queries((Path(__file__).parent / "queries.sql").read_text(encoding="utf-8"))
"""Every query by name, as ``queries.sql`` holds them."""


# -- running statements -----------------------------------------------------------------


def _run(cur: Cursor, name: str, params: Mapping[str, Any] | None = None) -> None:
    """Run the named query; a missing schema becomes :class:`SchemaMissing`, which says
    what to do."""
    try:
        cur.execute(QUERIES[name], params)
    except (psycopg2.errors.UndefinedTable, psycopg2.errors.InvalidSchemaName) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise SchemaMissing(
            f"the database has no underway schema ({first_line}): "
            "run underway.run_migrations(dsn) first"
        ) from exc


@functools.cache
def _field_names(record: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(record))


def _as(record: type[R], cur: Cursor, row: Sequence[Any], **extra: Any) -> R:
    """A record from a row, by column name; ``extra`` supplies fields the row lacks."""
    values = dict(zip([column.name for column in cur.description], row), **extra)
    wanted = _field_names(record)
    if not wanted <= values.keys():
        raise RuntimeError(
            f"query result lacks {sorted(wanted - values.keys())} for {record.__name__}: "
            "queries.sql and records.py disagree"
        )
    return record(**{name: values[name] for name in wanted})


def _one(record: type[R], cur: Cursor, **extra: Any) -> R | None:
    row = cur.fetchone()
    return None if row is None else _as(record, cur, row, **extra)


def _all(record: type[R], cur: Cursor) -> list[R]:
    return [_as(record, cur, row) for row in cur.fetchall()]


def _scalar(cur: Cursor) -> Any:
    row = cur.fetchone()
    return None if row is None else row[0]


# -- transactions and notifications -----------------------------------------------------


def begin(cur: Cursor, statement_timeout_ms: int | None = None) -> None:
    """Begin a transaction; with a timeout, none of its statements may run longer."""
    if statement_timeout_ms is None:
        cur.execute("BEGIN")
    else:
        cur.execute(f"BEGIN; SET LOCAL statement_timeout = {int(statement_timeout_ms)}")


def commit(cur: Cursor) -> None:
    """Commit the transaction :func:`begin` opened."""
    cur.execute("COMMIT")


def rollback(cur: Cursor) -> None:
    """Roll back the transaction :func:`begin` opened."""
    cur.execute("ROLLBACK")


def listen(cur: Cursor, channel: str) -> None:
    """Subscribe the session to ``channel`` (one of the channels above)."""
    if channel not in (TASK_CHANNEL, SCHEDULE_CHANNEL):
        raise ValueError(f"unknown channel {channel!r}")
    cur.execute(f"LISTEN {channel}")


def notify(cur: Cursor, channel: str = TASK_CHANNEL) -> None:
    """Wake the sessions listening on ``channel``, when the transaction commits."""
    _run(cur, "notify", {"channel": channel})


def set_async_commit(cur: Cursor) -> None:
    """Make the session's commits return before they reach the disk."""
    cur.execute("SET synchronous_commit = off")


def schema_version(cur: Cursor) -> int | None:
    """The newest migration applied; raises ``UndefinedTable`` without a schema."""
    cur.execute(QUERIES["schema_version"])
    return _scalar(cur)


def clock(cur: Cursor) -> datetime:
    """The database's clock, which all hosts share."""
    _run(cur, "clock")
    return _scalar(cur)


# -- enqueueing -------------------------------------------------------------------------


def insert_task(cur: Cursor, params: Mapping[str, Any]) -> int:
    """Insert one task (see ``Job.enqueue``); returns its id."""
    _run(cur, "enqueue", params)
    return _scalar(cur)


def enqueue_keyed(cur: Cursor, params: Mapping[str, Any]) -> int:
    """Enqueue one task with a job key through ``underway.enqueue``; returns the id of the
    task holding the key."""
    _run(cur, "enqueue_keyed", params)
    return _scalar(cur)


def insert_tasks(cur: Cursor, params: Mapping[str, Any]) -> list[int]:
    """Insert one task per input of ``params["inputs"]`` (a JSON array) in one statement;
    returns their ids in input order."""
    _run(cur, "enqueue_many", params)
    return sorted(row[0] for row in cur.fetchall())


# -- claiming and recording outcomes ----------------------------------------------------


def claim_task(cur: Cursor, jobs: Sequence[str], token: int, lease: float) -> Claim | None:
    """Claim the next ready task of ``jobs`` with ``token``, in a statement of its own."""
    _run(cur, "claim_task", {"jobs": jobs, "token": token, "lease": lease})
    return _one(Claim, cur, token=token)


def claimable(cur: Cursor, jobs: Sequence[str]) -> bool:
    """Whether a task of ``jobs`` could be claimed now: a claim, rolled back."""
    begin(cur)
    try:
        return claim_task(cur, jobs, token=1, lease=1) is not None
    finally:
        rollback(cur)


def seconds_until_due(cur: Cursor, jobs: Sequence[str]) -> float | None:
    """Seconds until the next delayed task of ``jobs`` is due; ``None`` when there is none."""
    _run(cur, "seconds_until_due", {"jobs": jobs})
    return _scalar(cur)


def record_success(
    cur: Cursor,
    claim: Claim,
    *,
    next_input: str | None,
    delay: float,
    max_attempts: int,
    jobs: Sequence[str],
    next_token: int,
    lease: float,
) -> Recorded:
    """Record the claimed task's step as succeeded, fenced on its claim token: the task is
    done (``next_input`` None) or moves on to its next step with ``next_input`` after
    ``delay``. With ``jobs``, the same statement claims the next task with ``next_token``."""
    params: dict[str, Any] = {
        "id": claim.id,
        "token": claim.token,
        "jobs": jobs,
        "next_token": next_token,
        "lease": lease,
    }
    if next_input is None:
        _run(cur, "complete_task", params)
    else:
        params.update(input=next_input, delay=delay, max_attempts=max_attempts)
        _run(cur, "advance_task", params)
    row = cur.fetchone()
    values = dict(zip([column.name for column in cur.description], row))
    claimed = None if values["id"] is None else _as(Claim, cur, row, token=next_token)
    return Recorded(done=values["done"], state=values["state"], next=claimed)


def record_failure(
    cur: Cursor,
    claim: Claim,
    *,
    retry: bool,
    delay: float,
    error: str,
    traceback: str,
    outcome: str,
) -> str | None:
    """Record a failed (or timed-out) try of the claimed task, fenced on its claim token:
    retry it after ``delay``, or fail it for good. Returns the task's new state, or
    ``None`` when the claim no longer held."""
    _run(
        cur,
        "fail_task",
        {
            "id": claim.id,
            "token": claim.token,
            "retry": retry,
            "delay": delay,
            "error": error,
            "traceback": traceback,
            "outcome": outcome,
        },
    )
    return _scalar(cur)


def release_claim(cur: Cursor, release: Release) -> list[tuple[int, str]]:
    """Give back the task claimed with ``release.token``, if it still runs under it; returns
    (task id, new state) of what was released. What a reconnected worker and a supervisor
    cleaning up after a dead worker both do."""
    _run(
        cur,
        "release_task",
        {
            "token": release.token,
            "counts": release.counts,
            "outcome": release.outcome,
            "error": release.reason,
            "channel": TASK_CHANNEL,
        },
    )
    return [(row[0], row[1]) for row in cur.fetchall()]


def cancel_requested(cur: Cursor, task_id: int) -> bool:
    """Whether cancelling the task was asked for."""
    _run(cur, "cancel_requested", {"id": task_id})
    return bool(_scalar(cur))


# -- upkeep -----------------------------------------------------------------------------


def renew_leases(cur: Cursor, tokens: Sequence[int], lease: float) -> None:
    """Extend the leases of the tasks claimed with ``tokens``."""
    if tokens:
        _run(cur, "renew_leases", {"tokens": list(tokens), "lease": lease})


def reclaim_expired(cur: Cursor) -> list[int]:
    """Release running tasks whose lease lapsed (a batch of them); returns their ids."""
    _run(cur, "reclaim_expired", {"channel": TASK_CHANNEL})
    return [row[0] for row in cur.fetchall()]


def end_sessions_of(cur: Cursor, application_name: str) -> None:
    """End the server sessions named ``application_name`` (a dead child's)."""
    _run(cur, "end_sessions_of", {"application_name": application_name})


def register_jobs(cur: Cursor, jobs: Iterable[Mapping[str, Any]]) -> None:
    """Store jobs' defaults in ``underway.job``, for enqueue from SQL and the scheduler."""
    _run(cur, "register_jobs", {"jobs": json.dumps(list(jobs))})


def purge_expired(cur: Cursor, batch: int) -> int:
    """Delete up to ``batch`` finished tasks past their retention; returns how many."""
    _run(cur, "purge_expired", {"batch": batch})
    return cur.rowcount


# -- schedules --------------------------------------------------------------------------


def store_schedule(cur: Cursor, params: Mapping[str, Any]) -> None:
    """Store a job's schedule, or replace the one of the same name."""
    _run(cur, "store_schedule", params)


def remove_schedule(cur: Cursor, job: str, name: str) -> bool:
    """Remove a job's schedule; returns whether there was one."""
    _run(cur, "remove_schedule", {"job": job, "name": name})
    return bool(cur.rowcount)


def load_schedules(cur: Cursor, jobs: Sequence[str]) -> list[StoredSchedule]:
    """The schedules of ``jobs``, ordered by job and name."""
    _run(cur, "load_schedules", {"jobs": sorted(jobs)})
    return _all(StoredSchedule, cur)


def fire_tick(
    cur: Cursor, job: str, name: str, fire_at: datetime, priority: int, max_attempts: int
) -> int | None:
    """Enqueue one tick of a schedule, exactly once; returns the task's id, or ``None`` when
    the tick was fired before (by anyone) or the schedule changed meanwhile."""
    _run(
        cur,
        "fire_tick",
        {
            "job": job,
            "name": name,
            "fire_at": fire_at,
            "priority": priority,
            "max_attempts": max_attempts,
        },
    )
    return _scalar(cur)


def skip_tick(cur: Cursor, job: str, name: str, fire_at: datetime) -> None:
    """Record a missed tick as passed over, so it is neither fired nor reported again."""
    _run(cur, "skip_tick", {"job": job, "name": name, "fire_at": fire_at})


# -- operating --------------------------------------------------------------------------


def task_info(cur: Cursor, task_id: int) -> TaskInfo | None:
    """The task with this id, or ``None``."""
    _run(cur, "task_status", {"id": task_id})
    info = _one(TaskInfo, cur)
    return None if info is None else replace(info, state=TaskState(info.state))


def cancel_task(cur: Cursor, task_id: int) -> str | None:
    """Cancel a task; returns its state afterwards, or ``None`` when it had finished."""
    _run(cur, "cancel_task", {"id": task_id})
    return _scalar(cur)


def last_failure(cur: Cursor, task_id: int) -> tuple[str | None, str | None] | None:
    """The error and traceback of a task's last failed try, if it had one."""
    _run(cur, "last_failure", {"id": task_id})
    row = cur.fetchone()
    return None if row is None else (row[0], row[1])


def pause_queue(cur: Cursor, queue: str) -> None:
    """Pause a queue at every supervisor."""
    _run(cur, "pause_queue", {"queue": queue})


def resume_queue(cur: Cursor, queue: str) -> bool:
    """Resume a queue and wake idle workers; returns whether it was paused."""
    _run(cur, "resume_queue", {"queue": queue, "channel": TASK_CHANNEL})
    return bool(_scalar(cur))


def queue_summary(cur: Cursor) -> list[QueueSummary]:
    """Every queue with unfinished or failed tasks, or paused."""
    _run(cur, "queue_summary")
    return _all(QueueSummary, cur)


def dead_letters(cur: Cursor, queue: str) -> list[DeadLetter]:
    """The tasks in a dead-letter queue, oldest first."""
    _run(cur, "dead_letters", {"queue": queue})
    return _all(DeadLetter, cur)


def redrive(cur: Cursor, queue: str, ids: Sequence[int] | None) -> list[int]:
    """Put tasks from a dead-letter queue back to work; returns their ids."""
    _run(cur, "redrive", {"queue": queue, "ids": ids, "channel": TASK_CHANNEL})
    return [row[0] for row in cur.fetchall()]


def run_delayed_now(cur: Cursor, jobs: Sequence[str]) -> int:
    """Make every delayed task of ``jobs`` due now; returns how many there were."""
    _run(cur, "run_delayed_now", {"jobs": jobs})
    return cur.rowcount
