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

    def __str__(self) -> str:
        return self.value


class CancelResult(str, Enum):
    """What :meth:`Task.cancel <underway.Task.cancel>` did.

    - ``CANCELLED``: the task was waiting, and now never runs;
    - ``REQUESTED``: the task is running; it stops at its next step boundary (or when it
      checks ``cx.cancelled``), or at once when aborted. If the step it is in was its last,
      it ends *succeeded*: there was nothing left to stop;
    - ``FINISHED``: too late, the task had already finished.
    """

    CANCELLED = "cancelled"
    REQUESTED = "requested"
    FINISHED = "finished"

    def __str__(self) -> str:
        return self.value


class Undecodable(str):
    """Stands in, in operators' views, for a stored JSON value Python cannot decode (a
    number of thousands of digits, nesting thousands deep): the start of its text."""

    def __repr__(self) -> str:
        return f"<undecodable JSON: {str.__repr__(self)}>"


@dataclass(frozen=True)
class Claim:
    """A task a worker has claimed: the row as the claim left it, and the claim's token."""

    id: int
    job: str
    queue: str
    step: int
    #: The step's input as stored: JSON text, decoded by the worker.
    input: str
    attempt: int
    max_attempts: int
    scheduled_at: datetime | None
    serial_queue: str | None
    #: The enqueuer's W3C trace context, if it was traced.
    trace_context: str | None
    #: Seconds from when the task was due until this claim: its pickup latency.
    waited: float
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
    #: Whether a counted try may be retried, tries left permitting: the step's policy says
    #: so of a timed-out try (``retry_on``), as it does when the worker ends the step.
    retry: bool = True
    #: Seconds before the retry: the policy's backoff for a timed-out try, else none.
    delay: float = 0.0

    @property
    def counts(self) -> bool:
        """Whether the try this claim began is used up."""
        return self.outcome != "interrupted"


@dataclass(frozen=True)
class Retried:
    """What a retry found of one task asked for: its state then, the task holding its job
    key now if another took it meanwhile, and whether it went back to work."""

    id: int
    state: str
    key_holder: int | None
    retried: bool


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
class DeadLetterQueue:
    """A dead-letter queue and how many tasks it holds."""

    queue: str
    tasks: int


@dataclass(frozen=True)
class StoredSchedule:
    """A schedule as the scheduler reads it: ``anchor`` is the instant after which its next
    tick counts (the later of its last change and its last fired tick)."""

    job: str
    name: str
    expression: str
    catch_up: bool
    anchor: datetime


@dataclass(frozen=True)
class TaskSummary:
    """One task in a list: where it stands, in a line."""

    id: int
    job: str
    step: int
    #: The current step's name, when a supervisor registered the job; else None.
    step_name: str | None
    state: TaskState
    attempts: int
    max_attempts: int
    queue: str
    #: The last failed try's error, if any.
    error: str | None
    created_at: datetime
    run_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Attempt:
    """One try of one step of a task, and how it ended."""

    step: int
    step_name: str | None
    attempt: int
    #: succeeded, failed, timed_out, crashed, interrupted, lost, cancelled or aborted.
    outcome: str
    error: str | None
    traceback: str | None
    started_at: datetime | None
    finished_at: datetime


@dataclass(frozen=True)
class TaskDetail:
    """A task, whole: input, output, where it stands, its timing, and every try."""

    id: int
    job: str
    step: int
    step_name: str | None
    #: How many steps the job has (0 when no supervisor registered it).
    step_count: int
    #: The names of the job's steps, in order, as its supervisors registered them.
    step_names: tuple[str, ...]
    state: TaskState
    attempts: int
    max_attempts: int
    queue: str
    serial_queue: str | None
    concurrency_group: str | None
    key: str | None
    priority: int
    dead_letter_queue: str | None
    input: Any
    #: What the last step returned, once the task succeeded.
    output: Any
    error: str | None
    cancel_requested_at: datetime | None
    abort_requested_at: datetime | None
    scheduled_at: datetime | None
    created_at: datetime
    run_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    history: tuple[Attempt, ...] = ()


@dataclass(frozen=True)
class ScheduleInfo:
    """A stored schedule, with its last and next fire."""

    job: str
    name: str
    expression: str
    #: The IANA time zone its times are read in.
    zone: str
    input: Any
    catch_up: bool
    updated_at: datetime
    last_fire: datetime | None
    #: The next tick, in UTC; None when it can never fire again.
    next_fire: datetime | None


@dataclass(frozen=True)
class WorkerNow:
    """What one worker of a supervisor runs now."""

    slot: int
    pid: int
    task_id: int | None
    job: str | None
    step: int | None
    step_name: str | None
    #: When the running try started.
    started_at: datetime | None


@dataclass(frozen=True)
class SupervisorInfo:
    """A live supervisor: where it runs, what jobs, and what its workers do now."""

    id: str
    host: str
    pid: int
    jobs: tuple[str, ...]
    started_at: datetime
    heartbeat_at: datetime
    workers: tuple[WorkerNow, ...]


@dataclass(frozen=True)
class Minute:
    """Tries finished in one minute: succeeded, failed for good, and failed to be retried."""

    minute: datetime
    succeeded: int
    failed: int
    retried: int


@dataclass(frozen=True)
class Limit:
    """A rate limit (per queue) or a concurrency limit (per group), and its room now."""

    kind: str
    name: str
    limit_count: int
    #: For a rate limit: the period of ``limit_count`` claims, in seconds.
    per_seconds: float | None
    #: Claims the bucket allows now, or places free in the group.
    available: int


@dataclass(frozen=True)
class UnhandledJob:
    """A job with tasks waiting that no live supervisor runs."""

    job: str
    tasks: int
