"""The store's queries for operators' views and controls: queues, pausing, dead letters,
limits, supervisors, throughput, task lists and a task whole."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from ..records import (
    Attempt,
    DeadLetter,
    DeadLetterQueue,
    Limit,
    Minute,
    QueueSummary,
    SupervisorInfo,
    TaskDetail,
    TaskState,
    TaskSummary,
    UnhandledJob,
    WorkerNow,
)
from .base import (
    TASK_CHANNEL,
    Cursor,
    _all,
    _one,
    _run,
    _scalar,
    _shown,
)


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


def dead_letters(cur: Cursor, queue: str, limit: int) -> list[DeadLetter]:
    """The tasks in a dead-letter queue, oldest first, at most ``limit``."""
    _run(cur, "dead_letters", {"queue": queue, "limit": limit})
    return [replace(letter, input=_shown(letter.input)) for letter in _all(DeadLetter, cur)]


def dead_letter_queues(cur: Cursor) -> list[DeadLetterQueue]:
    """Every dead-letter queue that holds tasks, with how many."""
    _run(cur, "dead_letter_queues", {})
    return _all(DeadLetterQueue, cur)


def redrive(cur: Cursor, queue: str, ids: Sequence[int] | None) -> list[int]:
    """Put tasks from a dead-letter queue back to work; returns their ids."""
    _run(cur, "redrive", {"queue": queue, "ids": ids, "channel": TASK_CHANNEL})
    return [row[0] for row in cur.fetchall()]


def set_rate_limit(cur: Cursor, queue: str, count: int, per: float) -> None:
    """Limit ``queue`` to ``count`` claims per ``per`` seconds across all hosts."""
    _run(cur, "set_rate_limit", {"queue": queue, "count": count, "per": per})


def clear_rate_limit(cur: Cursor, queue: str) -> bool:
    """Lift a queue's rate limit; returns whether it had one."""
    _run(cur, "clear_rate_limit", {"queue": queue})
    return bool(cur.rowcount)


def limits(cur: Cursor) -> list[Limit]:
    """Every rate and concurrency limit, with the room each has now."""
    _run(cur, "limits")
    return _all(Limit, cur)


def supervisors(cur: Cursor) -> list[SupervisorInfo]:
    """Live supervisors: those whose last heartbeat is recent enough by their own lease."""
    _run(cur, "supervisors", {})
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


def throughput(cur: Cursor, minutes: int, queue: str | None = None) -> list[Minute]:
    """Tries finished per minute over the last ``minutes`` minutes, oldest first."""
    _run(cur, "throughput", {"minutes": minutes, "queue": queue})
    return _all(Minute, cur)


def unhandled_jobs(cur: Cursor) -> list[UnhandledJob]:
    """Jobs with tasks waiting over a minute that no live supervisor runs."""
    _run(cur, "unhandled_jobs", {})
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
    detail = _one(TaskDetail, cur, history=())
    if detail is None:
        return None
    _run(cur, "task_attempts", {"id": task_id})
    return replace(
        detail,
        state=TaskState(detail.state),
        step_names=tuple(detail.step_names),
        input=_shown(detail.input),
        output=_shown(detail.output),
        history=tuple(_all(Attempt, cur)),
    )
