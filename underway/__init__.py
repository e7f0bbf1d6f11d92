"""underway: durable multi-step background jobs on PostgreSQL, for synchronous Python.

A :class:`Job` is a named sequence of steps; each step's output is the next step's input.
Enqueue runs of it with a plain call (in your own transaction if you like), and run
``python -m underway.supervisor yourmodule`` to work through them.
"""

from .context import Context
from .cron import ZonedSchedule
from .db import configure
from .errors import ConfigurationError, Fatal, SchemaMissing, UnderwayError
from .job import Job, To
from .migrations import run_migrations
from .retry import RetryPolicy
from .supervisor import run_workers
from .task import Task, TaskState

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "Context",
    "Fatal",
    "Job",
    "RetryPolicy",
    "SchemaMissing",
    "Task",
    "TaskState",
    "To",
    "UnderwayError",
    "ZonedSchedule",
    "__version__",
    "configure",
    "run_migrations",
    "run_workers",
]
