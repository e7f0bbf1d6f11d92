"""underway: durable multi-step background jobs on PostgreSQL, for synchronous Python.

A :class:`Job` is a named sequence of steps; each step's output is the next step's input.
Enqueue runs of it with a plain call (in your own transaction if you like), and run
``python -m underway.supervisor yourmodule`` to work through them.
"""

from typing import Any

from .context import Context
from .cron import ZonedSchedule
from .db import configure
from .errors import (
    ConfigurationError,
    Fatal,
    SchemaMissing,
    TaskCancelled,
    TaskFailed,
    UnderwayError,
)
from .job import Job, To
from .migrations import run_migrations
from .retry import RetryPolicy
from .task import CancelResult, Task, TaskState
from .task import get_task as task  # underway.task(id): a handle on any task, by id

__version__ = "0.1.0"

__all__ = [
    "CancelResult",
    "ConfigurationError",
    "Context",
    "Fatal",
    "Job",
    "RetryPolicy",
    "SchemaMissing",
    "Task",
    "TaskCancelled",
    "TaskFailed",
    "TaskState",
    "To",
    "UnderwayError",
    "ZonedSchedule",
    "__version__",
    "configure",
    "run_migrations",
    "run_workers",
    "schedules",
    "task",
]


def __getattr__(name: str) -> Any:
    # run_workers lives in underway.run, which imports underway.supervisor: the module that
    # `python -m underway.supervisor` runs as __main__. Importing it here, eagerly, would
    # load it twice.
    if name == "run_workers":
        from .run import run_workers

        return run_workers
    # underway.admin runs as __main__ for `python -m underway.admin`: loaded on demand.
    if name == "schedules":
        from .admin import schedules

        return schedules
    raise AttributeError(f"module 'underway' has no attribute {name!r}")
