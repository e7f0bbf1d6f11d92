"""Tasks: one run of a job, as stored in ``underway.task``, and the handle enqueue returns."""

from __future__ import annotations

from dataclasses import dataclass
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
        with caller_cursor(conn) as cur:
            execute(cur, QUERIES["task_status"], {"id": self.id})
            row = cur.fetchone()
        return None if row is None else TaskState(row[2])

    def cancel(self, *, conn: Any = None) -> bool:
        """Cancel the task: a pending one never runs; a running one finishes the step it is
        in (which can check :attr:`Context.cancelled <underway.Context.cancelled>` to stop
        early) and goes no further: no next step, no retry.

        Returns whether the task is, or is about to be, cancelled; ``False`` when it had
        finished already (succeeded, failed or cancelled before).
        """
        with caller_cursor(conn) as cur:
            execute(cur, QUERIES["cancel_task"], {"id": self.id})
            return cur.fetchone() is not None
