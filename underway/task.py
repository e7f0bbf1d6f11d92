"""Tasks: one run of a job, as stored in ``underway.task``, and the handle enqueue returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import store
from .db import caller_cursor
from .records import TaskInfo, TaskState

__all__ = ["Task", "TaskInfo", "TaskState", "cancel_task", "task_info"]


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


def task_info(task_id: int, *, conn: Any = None) -> TaskInfo | None:
    """The task with this id, or ``None`` when there is none (or no longer)."""
    with caller_cursor(conn) as cur:
        return store.task_info(cur, task_id)


def cancel_task(task_id: int, *, conn: Any = None) -> bool:
    """Cancel a task by id (see :meth:`Task.cancel`)."""
    with caller_cursor(conn) as cur:
        return store.cancel_task(cur, task_id) is not None
