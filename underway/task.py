"""Tasks: one run of a job, as stored in ``underway.task``, and the handle enqueue returns."""

from __future__ import annotations

import select
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import store
from .db import caller_cursor, close_quietly, connect, resolve_dsn
from .errors import TaskCancelled, TaskFailed, UnderwayError
from .records import CancelResult, TaskInfo, TaskState

__all__ = [
    "CancelResult",
    "Task",
    "TaskInfo",
    "TaskState",
    "cancel_task",
    "get_task",
    "retry_tasks",
    "task_info",
]

#: The longest a waiting result() goes without looking at the row itself, in case the
#: connection that carries notifications was silently cut.
_RECHECK = 30.0


@dataclass(frozen=True)
class Task:
    """A handle on an enqueued task: one run of a job, through all of its steps.

    :param id: the task's id in ``underway.task``; it stays the same from step to step.
    :param job: the name of the job the task runs.
    :param dsn: the database the task is in, when it is not the configured one: its
        methods then look there unless given a connection (``run_inline(dsn=...)`` sets it).
    """

    id: int
    job: str
    dsn: str | None = field(default=None, repr=False, compare=False)

    def status(self, *, conn: Any = None) -> TaskState | None:
        """The task's state now; ``None`` once retention has deleted it.

        ``conn`` is as for :meth:`Job.enqueue <underway.Job.enqueue>`: without it, the
        process's own connection reads the committed state.
        """
        with caller_cursor(conn, self.dsn) as cur:
            info = task_info(self.id, conn=cur)
        return None if info is None else info.state

    def result(self, timeout: float | None = None, *, dsn: str | None = None) -> Any:
        """Wait for the task to finish and return its result: what its last step returned
        (``To.done(value)`` or a plain value), decoded from JSON.

        It waits on LISTEN/NOTIFY, on a connection of its own: no polling, and a task
        that finished long ago answers at once (while retention keeps it).

        :param timeout: seconds to wait at most (default: for as long as it takes).
        :raises TaskFailed: the task failed for good; it carries the error and traceback.
        :raises TaskCancelled: the task was cancelled.
        :raises TimeoutError: the task was still unfinished after ``timeout`` seconds.
        :raises LookupError: there is no such task (or retention deleted it).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        conn = connect(resolve_dsn(dsn or self.dsn), application_name="underway result")
        try:
            with conn.cursor() as cur:
                store.listen(cur, store.RESULT_CHANNEL)
                while True:
                    found = store.await_task(cur, self.id)
                    if found is None:
                        raise LookupError(f"no task {self.id}: none was, or retention deleted it")
                    state, output, error, trace = found
                    if state == TaskState.SUCCEEDED:
                        return store.decode(output, f"the result of task {self.id}")
                    if state == TaskState.FAILED:
                        raise TaskFailed(
                            f"task {self.id} of job {self.job!r} failed: {error}\n{trace or ''}",
                            error,
                            trace,
                        )
                    if state == TaskState.CANCELLED:
                        raise TaskCancelled(f"task {self.id} of job {self.job!r} was cancelled")
                    self._wait_for_end(conn, deadline)
        finally:
            close_quietly(conn)

    def _wait_for_end(self, conn: Any, deadline: float | None) -> None:
        """Sleep until this task's end is announced, or the deadline."""
        mine = str(self.id)
        while True:
            # An end announced while a statement ran was read along with its result.
            announced = any(note.payload == mine for note in conn.notifies)
            conn.notifies.clear()
            if announced:
                return
            left = _RECHECK if deadline is None else min(deadline - time.monotonic(), _RECHECK)
            if left <= 0:
                raise TimeoutError(f"task {self.id} of job {self.job!r} is not finished yet")
            if not select.select([conn], [], [], left)[0]:
                if deadline is None or time.monotonic() < deadline:
                    return  # look at the row again, now and then
                continue
            conn.poll()

    def cancel(self, *, abort: bool = False, conn: Any = None) -> CancelResult:
        """Cancel the task, and say what that did (:class:`CancelResult`).

        A waiting task never runs (``"cancelled"``). A running one finishes the step it is
        in, which can check :attr:`Context.cancelled <underway.Context.cancelled>` to stop
        early, and goes no further: no next step, no retry (``"requested"``); if that step
        was its last, the task ends *succeeded*. With ``abort=True`` the running step is
        ended now: the supervisor holding it kills its worker process (a step stuck in C
        code included), records the try as aborted, and the task ends cancelled. A task
        that had finished is left alone (``"finished"``).

        :raises LookupError: there is no such task.
        """
        with caller_cursor(conn, self.dsn) as cur:
            return cancel_task(self.id, abort=abort, conn=cur)

    def retry(self, *, conn: Any = None) -> None:
        """Put a failed task back to work at the step that failed, with that step's tries
        renewed; the same task goes back, never a copy, and its history stays.

        :raises UnderwayError: the task is not failed (it says what it is).
        """
        with caller_cursor(conn, self.dsn) as cur:
            retry_tasks([self.id], conn=cur)


def get_task(task_id: int, *, conn: Any = None) -> Task:
    """A handle on the task with this id, enqueued anywhere (another process, SQL).

    :raises LookupError: there is no such task.
    """
    with caller_cursor(conn) as cur:
        job = store.task_job(cur, int(task_id))
    if job is None:
        raise LookupError(f"no task {task_id}: it never was, or retention deleted it")
    return Task(int(task_id), job)


def task_info(task_id: int, *, conn: Any = None) -> TaskInfo | None:
    """The task with this id, or ``None`` when there is none (or no longer)."""
    with caller_cursor(conn) as cur:
        return store.task_info(cur, task_id)


def cancel_task(task_id: int, *, abort: bool = False, conn: Any = None) -> CancelResult:
    """Cancel a task by id (see :meth:`Task.cancel`)."""
    with caller_cursor(conn) as cur:
        state = store.cancel_task(cur, task_id, abort)
        if state is None:
            if store.task_job(cur, task_id) is None:
                raise LookupError(f"no task {task_id}")
            return CancelResult.FINISHED
    return CancelResult.CANCELLED if state == TaskState.CANCELLED else CancelResult.REQUESTED


def retry_tasks(task_ids: Sequence[int], *, conn: Any = None) -> list[int]:
    """Put failed tasks back to work (see :meth:`Task.retry`): all of them, or none when
    one of them is missing or not failed. Returns their ids.

    :raises UnderwayError: naming each task that is not failed, and what it is instead, or
        whose job key another task took since it failed.
    """
    ids = [int(i) for i in task_ids]
    if not ids:
        return []
    with caller_cursor(conn) as cur:
        found = store.retry_tasks(cur, ids)
    states = {t.id: t.state for t in found}
    problems = [f"task {i} does not exist" for i in ids if i not in states]
    problems += [f"task {t.id} is {t.state}, not failed" for t in found if t.state != "failed"]
    problems += [
        f"task {t.id}'s job key is held by task {t.key_holder} now (cancel that one first)"
        for t in found
        if t.key_holder is not None
    ]
    if problems:
        raise UnderwayError("nothing retried: " + "; ".join(sorted(set(problems))))
    return [t.id for t in found if t.retried]
