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

from .errors import SchemaMissing, UndecodableInput
from .records import (
    Attempt,
    Claim,
    DeadLetter,
    Limit,
    Minute,
    QueueSummary,
    Recorded,
    Release,
    StoredSchedule,
    SupervisorInfo,
    TaskDetail,
    TaskInfo,
    TaskState,
    TaskSummary,
    Undecodable,
    UnhandledJob,
    WorkerNow,
)

Cursor = Any
"""A psycopg2 cursor (``psycopg2.extensions.cursor``)."""

R = TypeVar("R")

TASK_CHANNEL = "underway"
"""The channel that wakes idle workers: a task was enqueued, became due or was released,
or a queue was resumed. The schema's triggers and ``underway.enqueue`` notify it too."""

SCHEDULE_CHANNEL = "underway_schedule"
"""The channel that tells schedulers a schedule was stored, changed or removed."""

ABORT_CHANNEL = "underway_abort"
"""The channel that tells supervisors to end a running step now (payload: the task id)."""

RESULT_CHANNEL = "underway_result"
"""The channel on which an awaited task announces its end (payload: the task id); the
schema's state trigger notifies it."""

CHANNELS = (TASK_CHANNEL, SCHEDULE_CHANNEL, ABORT_CHANNEL, RESULT_CHANNEL)

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
    what to do. On a connection with a deadline (:class:`underway.db.BoundedConnection`),
    wait for the result no longer than it allows."""
    try:
        cur.execute(QUERIES[name], params)
        settle = getattr(cur.connection, "settle", None)
        if settle is not None:
            settle()
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


def decode(text: str | None, what: str) -> Any:
    """A stored JSON value from its text; :class:`UndecodableInput` (naming ``what``) for
    JSON that PostgreSQL took but Python cannot hold: a number of thousands of digits, or
    nesting thousands deep."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UndecodableInput(f"{what} cannot be decoded: {type(exc).__name__}: {exc}") from None


def _shown(text: str | None) -> Any:
    """A stored JSON value for operators' eyes: decoded, or its start when undecodable."""
    try:
        return decode(text, "value")
    except UndecodableInput:
        assert text is not None
        return Undecodable(text[:200])


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
    """Subscribe the session to ``channel`` (one of :data:`CHANNELS`)."""
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}")
    cur.execute(f"LISTEN {channel}")
    settle = getattr(cur.connection, "settle", None)
    if settle is not None:
        settle()


def notify(cur: Cursor, channel: str = TASK_CHANNEL) -> None:
    """Wake the sessions listening on ``channel``, when the transaction commits."""
    _run(cur, "notify", {"channel": channel})


def set_async_commit(cur: Cursor) -> None:
    """Make the session's commits return before they reach the disk."""
    cur.execute("SET synchronous_commit = off")


def schema_version(cur: Cursor) -> int | None:
    """The newest migration applied; raises ``UndefinedTable`` without a schema."""
    cur.execute(QUERIES["schema_version"])
    settle = getattr(cur.connection, "settle", None)
    if settle is not None:
        settle()
    return _scalar(cur)


def session(cur: Cursor) -> tuple[int, float]:
    """This session's backend pid and start time (seconds since the epoch)."""
    _run(cur, "session")
    row = cur.fetchone()
    return row[0], row[1]


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


def seconds_until_due(cur: Cursor, jobs: Sequence[str]) -> tuple[float | None, int]:
    """Seconds until the next delayed task of ``jobs`` is due (``None`` when there is none),
    and the session's backend pid."""
    _run(cur, "seconds_until_due", {"jobs": jobs})
    due, pid = cur.fetchone()
    return due, pid


def record_success(
    cur: Cursor,
    claim: Claim,
    *,
    next_input: str | None,
    output: str | None = None,
    delay: float,
    max_attempts: int,
    jobs: Sequence[str],
    next_token: int,
    lease: float,
) -> Recorded:
    """Record the claimed task's step as succeeded, fenced on its claim token: the task is
    done (``next_input`` None) or moves on to its next step with ``next_input`` after
    ``delay``; a finished task keeps ``output`` (JSON text) as its result. With ``jobs``,
    the same statement claims the next task with ``next_token``."""
    params: dict[str, Any] = {
        "id": claim.id,
        "token": claim.token,
        "jobs": jobs,
        "next_token": next_token,
        "lease": lease,
    }
    if next_input is None:
        params["output"] = output
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


def end_session(cur: Cursor, pid: int, started: float) -> None:
    """End the server session with this backend pid and start time (a dead worker's)."""
    _run(cur, "end_session", {"pid": pid, "started": started})


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


def cancel_task(cur: Cursor, task_id: int, abort: bool = False) -> str | None:
    """Cancel a task (and with ``abort``, end its running step now); returns its state
    afterwards, or ``None`` when it had finished or does not exist."""
    _run(cur, "cancel_task", {"id": task_id, "abort": abort, "abort_channel": ABORT_CHANNEL})
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
    return [replace(letter, input=_shown(letter.input)) for letter in _all(DeadLetter, cur)]


def redrive(cur: Cursor, queue: str, ids: Sequence[int] | None) -> list[int]:
    """Put tasks from a dead-letter queue back to work; returns their ids."""
    _run(cur, "redrive", {"queue": queue, "ids": ids, "channel": TASK_CHANNEL})
    return [row[0] for row in cur.fetchall()]


def run_delayed_now(cur: Cursor, jobs: Sequence[str]) -> int:
    """Make every delayed task of ``jobs`` due now; returns how many there were."""
    _run(cur, "run_delayed_now", {"jobs": jobs})
    return cur.rowcount


def enqueue_named(
    cur: Cursor,
    job: str,
    input: str,
    *,
    delay: float = 0.0,
    priority: int | None = None,
    key: str | None = None,
    run_at: datetime | None = None,
) -> int:
    """Enqueue a task of a job known only by name, with its registered defaults."""
    params = {
        "job": job,
        "input": input,
        "delay": delay,
        "priority": priority,
        "key": key,
        "run_at": run_at,
    }
    _run(cur, "enqueue_named", params)
    return _scalar(cur)


def task_job(cur: Cursor, task_id: int) -> str | None:
    """The job of the task with this id, or ``None`` when there is no such task."""
    _run(cur, "task_job", {"id": task_id})
    return _scalar(cur)


def await_task(cur: Cursor, task_id: int) -> tuple[str, str | None, str | None, str | None] | None:
    """Mark a task as awaited (its end then notifies :data:`RESULT_CHANNEL`) and return
    (state, output JSON, error, traceback) as it stands; ``None`` when there is no task."""
    _run(cur, "await_task", {"id": task_id})
    row = cur.fetchone()
    return None if row is None else (row[0], row[1], row[2], row[3])


def retry_tasks(cur: Cursor, ids: Sequence[int]) -> list[tuple[int, str, bool]]:
    """Put the failed ones of these tasks back to work; returns (id, state before, retried)
    for every task that exists."""
    _run(cur, "retry_tasks", {"ids": list(ids), "channel": TASK_CHANNEL})
    return [(row[0], row[1], row[2]) for row in cur.fetchall()]


def failed_task_ids(cur: Cursor, job: str, since: datetime | None, limit: int) -> list[int]:
    """Ids of a job's failed tasks (since a time, if given), oldest first."""
    _run(cur, "failed_task_ids", {"job": job, "since": since, "limit": limit})
    return [row[0] for row in cur.fetchall()]


def abort_requested(cur: Cursor, tokens: Sequence[int]) -> list[int]:
    """Which tasks claimed with ``tokens`` an operator asked to abort."""
    if not tokens:
        return []
    _run(cur, "abort_requested", {"tokens": list(tokens)})
    return [row[0] for row in cur.fetchall()]


def set_rate_limit(cur: Cursor, queue: str, count: int, per: float) -> None:
    """Limit ``queue`` to ``count`` claims per ``per`` seconds across all hosts."""
    _run(cur, "set_rate_limit", {"queue": queue, "count": count, "per": per})


def clear_rate_limit(cur: Cursor, queue: str) -> bool:
    """Lift a queue's rate limit; returns whether it had one."""
    _run(cur, "clear_rate_limit", {"queue": queue})
    return bool(cur.rowcount)


def set_concurrency_limits(cur: Cursor, limits: Mapping[str, int]) -> None:
    """Store the limits of concurrency groups, by name."""
    if limits:
        groups = [{"name": k, "max_concurrency": v} for k, v in limits.items()]
        _run(cur, "set_concurrency_limits", {"groups": json.dumps(groups)})


def limits(cur: Cursor) -> list[Limit]:
    """Every rate and concurrency limit, with the room each has now."""
    _run(cur, "limits")
    return _all(Limit, cur)


def heartbeat(
    cur: Cursor, supervisor_id: str, host: str, pid: int, jobs: Sequence[str], workers: list
) -> None:
    """Record that a supervisor is alive, and what its workers run now."""
    _run(
        cur,
        "heartbeat",
        {
            "id": supervisor_id,
            "host": host,
            "pid": pid,
            "jobs": list(jobs),
            "workers": json.dumps(workers),
        },
    )


def sign_off(cur: Cursor, supervisor_id: str) -> None:
    """Remove a stopping supervisor's row."""
    _run(cur, "sign_off", {"id": supervisor_id})


def supervisors(cur: Cursor, within: float) -> list[SupervisorInfo]:
    """Supervisors whose last heartbeat is under ``within`` seconds old."""
    _run(cur, "supervisors", {"within": within})
    found = []
    for row in cur.fetchall():
        values = dict(zip([column.name for column in cur.description], row))
        workers = tuple(
            WorkerNow(
                slot=w["slot"],
                pid=w["pid"],
                task_id=w.get("task_id") if w.get("job") else None,
                job=w.get("job"),
                step=w.get("step"),
                step_name=w.get("step_name"),
                started_at=_timestamp(w.get("started_at")),
            )
            for w in json.loads(values.pop("workers"))
        )
        found.append(SupervisorInfo(**{**values, "jobs": tuple(values["jobs"])}, workers=workers))
    return found


def _timestamp(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def prune_supervisors(cur: Cursor) -> None:
    """Forget supervisors silent for a day."""
    _run(cur, "prune_supervisors")


def count_finished(cur: Cursor, tally: Sequence[Mapping[str, Any]]) -> None:
    """Add finished tries to the per-minute statistics."""
    if tally:
        _run(cur, "count_finished", {"tally": json.dumps(list(tally), default=str)})


def throughput(cur: Cursor, minutes: int, queue: str | None = None) -> list[Minute]:
    """Tries finished per minute over the last ``minutes`` minutes, oldest first."""
    _run(cur, "throughput", {"minutes": minutes, "queue": queue})
    return _all(Minute, cur)


def prune_statistics(cur: Cursor) -> None:
    """Forget per-minute statistics older than a day."""
    _run(cur, "prune_statistics")


def prune_ticks(cur: Cursor, batch: int) -> int:
    """Forget up to ``batch`` fired ticks no scheduler needs; returns how many."""
    _run(cur, "prune_ticks", {"batch": batch})
    return cur.rowcount


def schedules(cur: Cursor) -> list[dict[str, Any]]:
    """Every stored schedule as a row: job, name, expression, input, catch_up,
    updated_at, last_fire."""
    _run(cur, "schedules")
    names = [column.name for column in cur.description]
    rows = [dict(zip(names, row)) for row in cur.fetchall()]
    for row in rows:
        row["input"] = _shown(row["input"])
    return rows


def unhandled_jobs(cur: Cursor, within: float) -> list[UnhandledJob]:
    """Jobs with tasks waiting over a minute that no live supervisor runs."""
    _run(cur, "unhandled_jobs", {"within": within})
    return _all(UnhandledJob, cur)


def list_tasks(
    cur: Cursor,
    *,
    state: str | None = None,
    job: str | None = None,
    queue: str | None = None,
    since: datetime | None = None,
    before: int | None = None,
    limit: int = 50,
) -> list[TaskSummary]:
    """Tasks, newest first, filtered by what is given."""
    params = {
        "state": state,
        "job": job,
        "queue": queue,
        "since": since,
        "before": before,
        "limit": limit,
    }
    _run(cur, "list_tasks", params)
    return [replace(t, state=TaskState(t.state)) for t in _all(TaskSummary, cur)]


def task_detail(cur: Cursor, task_id: int) -> TaskDetail | None:
    """The task with this id, whole, with every try; ``None`` when there is none."""
    _run(cur, "task_detail", {"id": task_id})
    detail = _one(TaskDetail, cur)
    if detail is None:
        return None
    _run(cur, "task_attempts", {"id": task_id})
    return replace(
        detail,
        state=TaskState(detail.state),
        input=_shown(detail.input),
        output=_shown(detail.output),
        history=tuple(_all(Attempt, cur)),
    )
