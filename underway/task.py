"""Tasks: one run of a job, as stored in ``underway.task``."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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
