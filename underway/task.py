"""Tasks: one run of a job, as stored in ``underway.task``, and the handle enqueue returns."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from .db import caller_cursor, execute
from .queries import QUERIES


class TaskState(str, Enum):
    """Where a task stands; the values are the labels of the SQL enum ``underway.task_state``."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Task:
    """A handle on an enqueued task: one run of a job, through all of its steps.

    :param id: the task's id in ``underway.task``; it stays the same from step to step.
    :param job: the name of the job the task runs.
    """

    id: int
    job: str

    def status(self, *, conn: Any = None) -> TaskState | None:
        """The task's state now; ``None`` once retention has deleted it.

        ``conn`` is as for :meth:`Job.enqueue <underway.Job.enqueue>`: without it, the
        process's own connection reads the committed state.
        """
        info = task_info(self.id, conn=conn)
        return None if info is None else info.state

    def cancel(self, *, conn: Any = None) -> bool:
        """Cancel the task: a pending one never runs; a running one finishes the step it is
        in (which can check :attr:`Context.cancelled <underway.Context.cancelled>` to stop
        early) and goes no further: no next step, no retry.

        Returns whether the task is, or is about to be, cancelled; ``False`` when it had
        finished already (succeeded, failed or cancelled before).
        """
        return cancel_task(self.id, conn=conn)


@dataclass(frozen=True)
class TaskInfo:
    """A task as stored: what ``python -m underway.admin status`` shows."""

    id: int
    job: str
    state: TaskState
    #: The step it is at (from 0), and the tries of that step so far.
    step: int
    attempts: int
    max_attempts: int
    queue: str
    #: The last failed try's error, if any.
    error: str | None
    cancel_requested: bool
    dead_letter_queue: str | None
    created_at: datetime
    run_at: datetime
    finished_at: datetime | None


def task_info(task_id: int, *, conn: Any = None) -> TaskInfo | None:
    """The task with this id, or ``None`` when there is none (or no longer)."""
    with caller_cursor(conn) as cur:
        execute(cur, QUERIES["task_status"], {"id": task_id})
        row = cur.fetchone()
    if row is None:
        return None
    return TaskInfo(*row[:2], TaskState(row[2]), *row[3:])


def cancel_task(task_id: int, *, conn: Any = None) -> bool:
    """Cancel a task by id (see :meth:`Task.cancel`)."""
    with caller_cursor(conn) as cur:
        execute(cur, QUERIES["cancel_task"], {"id": task_id})
        return cur.fetchone() is not None
