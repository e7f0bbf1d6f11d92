"""Operating underway: see what is queued, running and failed, and steer it.

- Look: :func:`queues`, :func:`list_tasks`, :func:`task_detail`, :func:`dead_letters`,
  :func:`dead_letter_queues`,
  :func:`schedules`, :func:`supervisors`, :func:`throughput`, :func:`limits`,
  :func:`unhandled_jobs`.
- Steer: :func:`pause` and :func:`resume` a queue, :func:`retry` failed tasks,
  :func:`redrive` a dead-letter queue, :func:`cancel_task` (or abort one), :func:`enqueue`
  a job by name, :func:`set_rate_limit`, :func:`purge_expired`.

Every function takes an optional ``conn`` (as :meth:`Job.enqueue <underway.Job.enqueue>`
does); without it, the process's own connection is used. The same from a shell:
``python -m underway.admin --help`` (or the ``underway`` command), and in a browser:
``python -m underway.web``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from . import store
from .cron import ZonedSchedule
from .db import caller_cursor
from .records import (
    CancelResult,
    DeadLetter,
    DeadLetterQueue,
    Limit,
    Minute,
    QueueSummary,
    ScheduleInfo,
    SupervisorInfo,
    TaskDetail,
    TaskSummary,
    UnhandledJob,
)
from .task import cancel_task, retry_tasks, task_info
from .values import INT_MAX, aware, seconds, to_json

__all__ = [
    "CancelResult",
    "DeadLetter",
    "DeadLetterQueue",
    "QueueSummary",
    "cancel_task",
    "clear_rate_limit",
    "dead_letter_queues",
    "dead_letters",
    "enqueue",
    "limits",
    "list_tasks",
    "pause",
    "purge_expired",
    "queues",
    "redrive",
    "resume",
    "retry",
    "schedules",
    "set_rate_limit",
    "supervisors",
    "task_detail",
    "task_info",
    "throughput",
    "unhandled_jobs",
]


def pause(queue: str, *, conn: Any = None) -> None:
    """Pause a queue: workers start none of its tasks until :func:`resume`. Steps already
    running finish; enqueueing goes on as usual. Takes effect at every supervisor at once."""
    with caller_cursor(conn) as cur:
        store.pause_queue(cur, _queue_name(queue))


def resume(queue: str, *, conn: Any = None) -> bool:
    """Resume a paused queue and wake idle workers; returns whether it was paused."""
    with caller_cursor(conn) as cur:
        return store.resume_queue(cur, _queue_name(queue))


def queues(*, conn: Any = None) -> list[QueueSummary]:
    """Every queue that has unfinished or failed tasks, or is paused."""
    with caller_cursor(conn) as cur:
        return store.queue_summary(cur)


def dead_letters(queue: str, *, limit: int = 10_000, conn: Any = None) -> list[DeadLetter]:
    """The tasks in dead-letter queue ``queue``, oldest first, at most ``limit``. Each keeps
    its history in ``underway.attempt``."""
    with caller_cursor(conn) as cur:
        return store.dead_letters(cur, _queue_name(queue), _limit(limit))


def dead_letter_queues(*, conn: Any = None) -> list[DeadLetterQueue]:
    """Every dead-letter queue that holds tasks, with how many, by name."""
    with caller_cursor(conn) as cur:
        return store.dead_letter_queues(cur)


def redrive(queue: str, ids: Sequence[int] | None = None, *, conn: Any = None) -> list[int]:
    """Put tasks from dead-letter queue ``queue`` back to work: all of them, or those with
    the given ids. Each resumes at the step that failed, with that step's tries renewed;
    its earlier attempts stay in its history. Returns the ids re-driven."""
    chosen = None if ids is None else [int(i) for i in ids]
    with caller_cursor(conn) as cur:
        return store.redrive(cur, _queue_name(queue), chosen)


def purge_expired(*, conn: Any = None, batch: int = 500, max_batches: int | None = None) -> int:
    """Retention now: delete finished tasks whose ``keep_for`` ran out, with their attempts,
    ``batch`` at a time, each batch its own short transaction when ``conn`` autocommits.
    Supervisors do this every minute. Returns how many were deleted."""
    deleted = 0
    batches = 0
    with caller_cursor(conn) as cur:
        while max_batches is None or batches < max_batches:
            count = store.purge_expired(cur, batch)
            deleted += count
            batches += 1
            if count < batch:
                break
    return deleted


def _limit(limit: Any) -> int:
    """A row limit of a listing: from 1 to 10,000."""
    if not 1 <= int(limit) <= 10_000:
        raise ValueError(f"limit must be from 1 to 10000, not {limit!r}")
    return int(limit)


def _queue_name(queue: Any) -> str:
    if not isinstance(queue, str) or not queue.strip():
        raise TypeError(f"a queue name is a non-empty string, not {queue!r}")
    return queue


def list_tasks(
    *,
    state: str | None = None,
    job: str | None = None,
    queue: str | None = None,
    since: datetime | timedelta | float | None = None,
    before: int | None = None,
    limit: int = 50,
    conn: Any = None,
) -> list[TaskSummary]:
    """Tasks, newest first: ``limit`` of them, with ids below ``before`` (to page on).

    :param state: only tasks in this state (``pending``, ``running``, ``succeeded``,
        ``failed``, ``cancelled``).
    :param since: only tasks enqueued since this time (an aware datetime), or within this
        long (a timedelta or seconds).
    """
    if state is not None and state not in _STATES:
        raise ValueError(f"state must be one of {', '.join(_STATES)}, not {state!r}")
    _limit(limit)
    with caller_cursor(conn) as cur:
        return store.list_tasks(
            cur,
            state=state,
            job=job,
            queue=queue,
            since=_since(since),
            before=before,
            limit=int(limit),
        )


def task_detail(task_id: int, *, conn: Any = None) -> TaskDetail | None:
    """The task with this id, whole: input, output, where it stands, its timing, and every
    try with its error and traceback. ``None`` when there is no such task."""
    with caller_cursor(conn) as cur:
        return store.task_detail(cur, int(task_id))


def retry(
    task_ids: Sequence[int] | None = None,
    *,
    job: str | None = None,
    since: datetime | timedelta | float | None = None,
    limit: int = 10_000,
    conn: Any = None,
) -> list[int]:
    """Put failed tasks back to work at the step that failed, with its tries renewed:
    those with the given ids, or a job's failed tasks (since a time, if given). With or
    without a dead-letter queue; the same task goes back, never a copy, and its history
    stays. Returns the ids put back.

    :raises UnderwayError: when a task asked for by id is not failed (nothing is retried
        then); the message says what each one is.
    """
    if (task_ids is None) == (job is None):
        raise ValueError("retry takes task ids, or job= (with since=), not both or neither")
    with caller_cursor(conn) as cur:
        if task_ids is None:
            assert job is not None
            task_ids = store.failed_task_ids(cur, job, _since(since), limit)
            if not task_ids:
                return []
        return retry_tasks(task_ids, conn=cur)


def enqueue(
    job: str,
    input: Any = None,
    *,
    delay: timedelta | float | None = None,
    run_at: datetime | None = None,
    priority: int | None = None,
    key: str | None = None,
    conn: Any = None,
) -> int:
    """Enqueue a task of a job known only by its name (as from a shell), with the defaults
    its supervisors registered; returns the task's id."""
    if not isinstance(job, str) or not job.strip():
        raise TypeError(f"job must be a job's name, not {job!r}")
    if run_at is not None and delay is not None:
        raise ValueError("give delay or run_at, not both")
    when = None if run_at is None else aware(run_at, "run_at")
    with caller_cursor(conn) as cur:
        return store.enqueue_named(
            cur,
            job,
            to_json(input, f"job {job!r}: input"),
            delay=seconds(delay),
            priority=priority,
            key=key,
            run_at=when,
        )


def schedules(*, conn: Any = None) -> list[ScheduleInfo]:
    """Every stored schedule, with its last fire and its next one."""
    now = datetime.now(timezone.utc)
    found = []
    with caller_cursor(conn) as cur:
        rows = store.schedules(cur)
    for row in rows:
        try:
            parsed = ZonedSchedule.parse(row["expression"])
            zone = parsed.zone_name
            upcoming = parsed.next_after(max(now, row["last_fire"] or now))
        except ValueError:
            zone, upcoming = "?", None
        found.append(ScheduleInfo(**row, zone=zone, next_fire=upcoming))
    return found


def supervisors(*, conn: Any = None) -> list[SupervisorInfo]:
    """Live supervisors (heard from within three of their heartbeats), each with its host,
    pid, jobs, and what each of its workers runs now."""
    with caller_cursor(conn) as cur:
        return store.supervisors(cur)


def throughput(*, minutes: int = 60, queue: str | None = None, conn: Any = None) -> list[Minute]:
    """Tasks finished per minute (succeeded, failed for good, and tries retried) over the
    last ``minutes`` minutes, oldest first, of one queue or all."""
    if not 1 <= int(minutes) <= 1440:
        raise ValueError(f"minutes must be from 1 to 1440, not {minutes!r}")
    with caller_cursor(conn) as cur:
        return store.throughput(cur, int(minutes), queue)


def set_rate_limit(queue: str, count: int, per: str | float, *, conn: Any = None) -> None:
    """Let at most ``count`` tasks of ``queue`` start per ``per`` (seconds, or ``"s"``,
    ``"m"``, ``"h"``), across all supervisors and hosts: a token bucket kept in the
    database. A queue at its limit is passed over, never waited on."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= INT_MAX:
        raise ValueError(f"count must be an integer from 1, not {count!r}")
    period = _PERIODS.get(per) if isinstance(per, str) else per
    if period is None or not 0 < seconds(period) <= 86_400:
        raise ValueError(f"per must be 's', 'm', 'h' or seconds up to a day, not {per!r}")
    with caller_cursor(conn) as cur:
        store.set_rate_limit(cur, _queue_name(queue), count, seconds(period))


def clear_rate_limit(queue: str, *, conn: Any = None) -> bool:
    """Lift a queue's rate limit; returns whether it had one."""
    with caller_cursor(conn) as cur:
        return store.clear_rate_limit(cur, _queue_name(queue))


def limits(*, conn: Any = None) -> list[Limit]:
    """Every rate limit and concurrency limit, with the room each has now."""
    with caller_cursor(conn) as cur:
        return store.limits(cur)


def unhandled_jobs(*, conn: Any = None) -> list[UnhandledJob]:
    """Jobs with tasks waiting over a minute that no live supervisor runs."""
    with caller_cursor(conn) as cur:
        return store.unhandled_jobs(cur)


_STATES = ("pending", "running", "succeeded", "failed", "cancelled")
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _since(since: datetime | timedelta | float | None) -> datetime | None:
    """A ``since`` filter as an instant: an aware datetime, or that long ago."""
    if since is None or isinstance(since, datetime):
        return None if since is None else aware(since, "since")
    return datetime.now(timezone.utc) - timedelta(seconds=seconds(since))


if __name__ == "__main__":  # python -m underway.admin
    import sys

    from .cli import main

    sys.exit(main())
