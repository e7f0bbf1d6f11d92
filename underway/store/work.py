"""The store's queries for the life of a task: enqueueing, claiming, recording each try's
outcome, giving claims back, and the task-level operations (cancel, retry, results)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from ..records import (
    Claim,
    Recorded,
    Release,
    Retried,
    TaskInfo,
    TaskState,
)
from .base import (
    ABORT_CHANNEL,
    TASK_CHANNEL,
    Cursor,
    _all,
    _as,
    _one,
    _run,
    _scalar,
    begin,
    rollback,
)


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
            "retry": release.retry,
            "delay": release.delay,
            "channel": TASK_CHANNEL,
        },
    )
    return [(row[0], row[1]) for row in cur.fetchall()]


def held_task(cur: Cursor, token: int) -> tuple[str, int, int, int] | None:
    """(job, step, try, tries allowed) of the task running under claim ``token``, or
    ``None`` when none does."""
    _run(cur, "held_task", {"token": token})
    row = cur.fetchone()
    return None if row is None else (row[0], row[1], row[2], row[3])


def cancel_requested(cur: Cursor, task_id: int) -> bool:
    """Whether cancelling the task was asked for."""
    _run(cur, "cancel_requested", {"id": task_id})
    return bool(_scalar(cur))


def task_info(cur: Cursor, task_id: int) -> TaskInfo | None:
    """The task with this id, or ``None``."""
    _run(cur, "task_status", {"id": task_id})
    info = _one(TaskInfo, cur)
    return None if info is None else replace(info, state=TaskState(info.state))


def task_job(cur: Cursor, task_id: int) -> str | None:
    """The job of the task with this id, or ``None`` when there is no such task."""
    _run(cur, "task_job", {"id": task_id})
    return _scalar(cur)


def cancel_task(cur: Cursor, task_id: int, abort: bool = False) -> str | None:
    """Cancel a task (and with ``abort``, end its running step now); returns its state
    afterwards, or ``None`` when it had finished or does not exist."""
    _run(cur, "cancel_task", {"id": task_id, "abort": abort, "abort_channel": ABORT_CHANNEL})
    return _scalar(cur)


def await_task(cur: Cursor, task_id: int) -> tuple[str, str | None, str | None, str | None] | None:
    """Mark a task as awaited (its end then notifies :data:`RESULT_CHANNEL`) and return
    (state, output JSON, error, traceback) as it stands; ``None`` when there is no task."""
    _run(cur, "await_task", {"id": task_id})
    _run(cur, "task_outcome", {"id": task_id})
    row = cur.fetchone()
    return None if row is None else (row[0], row[1], row[2], row[3])


def retry_tasks(cur: Cursor, ids: Sequence[int]) -> list[Retried]:
    """Put these tasks back to work if all are failed and free to take their keys again;
    returns what was found of each task that exists."""
    _run(cur, "retry_tasks", {"ids": list(ids), "channel": TASK_CHANNEL})
    return _all(Retried, cur)


def failed_task_ids(cur: Cursor, job: str, since: datetime | None, limit: int) -> list[int]:
    """Ids of a job's failed tasks (since a time, if given), oldest first."""
    _run(cur, "failed_task_ids", {"job": job, "since": since, "limit": limit})
    return [row[0] for row in cur.fetchall()]


def last_failure(cur: Cursor, task_id: int) -> tuple[str | None, str | None] | None:
    """The error and traceback of a task's last failed try, if it had one."""
    _run(cur, "last_failure", {"id": task_id})
    row = cur.fetchone()
    return None if row is None else (row[0], row[1])


def run_delayed_now(cur: Cursor, jobs: Sequence[str]) -> int:
    """Make every delayed task of ``jobs`` due now; returns how many there were."""
    _run(cur, "run_delayed_now", {"jobs": jobs})
    return cur.rowcount
