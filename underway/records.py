"""What the store returns: tasks, claims, queues and schedules as plain frozen records.

These are the shapes of rows, named field by field; :mod:`underway.store` fills them by
column name, so a query and its record can never disagree silently about the order of
columns. Nothing here touches the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any


class TaskState(str, Enum):
    """Where a task stands; the values are the labels of the SQL enum ``underway.task_state``."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Claim:
    """A task a worker has claimed: the row as the claim left it, and the claim's token."""

    id: int
    job: str
    step: int
    input: Any
    attempt: int
    max_attempts: int
    scheduled_at: datetime | None
    serial_queue: str | None
    token: int


@dataclass(frozen=True)
class Recorded:
    """What recording a step's success did: whether the claim still held (``done``), the
    task's new state, and the next task claimed in the same statement, if any."""

    done: bool
    state: str | None
    next: Claim | None


@dataclass(frozen=True)
class Release:
    """A claim to give back: the task a worker held when it died, lost its connection, or
    stopped before starting it. ``outcome`` is how the try is recorded; ``crashed`` and
    ``timed_out`` count against the task's tries, ``interrupted`` does not."""

    token: int
    reason: str
    outcome: str = "interrupted"

    @property
    def counts(self) -> bool:
        """Whether the try this claim began is used up."""
        return self.outcome != "interrupted"


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


@dataclass(frozen=True)
class QueueSummary:
    """A queue's unfinished work: tasks waiting, running, and failed for good."""

    queue: str
    pending: int
    running: int
    failed: int
    paused: bool
    #: Seconds its oldest ready task has waited (``None`` when none is ready): the number to
    #: alert on, as it grows when workers fall behind or stop.
    lag: float | None


@dataclass(frozen=True)
class DeadLetter:
    """A task in a dead-letter queue: it failed for good at ``step``, with ``error``."""

    id: int
    job: str
    step: int
    input: Any
    attempts: int
    error: str | None
    finished_at: datetime


@dataclass(frozen=True)
class StoredSchedule:
    """A schedule as the scheduler reads it: ``anchor`` is the instant after which its next
    tick counts (the later of its last change and its last fired tick)."""

    job: str
    name: str
    expression: str
    catch_up: bool
    anchor: datetime
