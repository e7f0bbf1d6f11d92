"""The context a step receives: which task it serves, and the worker's transaction."""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg2.extensions

from . import store
from .db import is_our_outage

if TYPE_CHECKING:
    from .job import Job
    from .task import Task


_IN_ERROR = psycopg2.extensions.TRANSACTION_STATUS_INERROR


class Context:
    """What a step knows about its run, and its way into the worker's transaction.

    Writes made through :meth:`cursor` (or :attr:`connection`) commit together with the
    step's completion and the enqueue of the next step, or not at all. Do not call
    ``commit()`` or ``rollback()`` on the connection: the worker does.
    """

    def __init__(
        self,
        conn: psycopg2.extensions.connection,
        *,
        task_id: int,
        job: str,
        step: int,
        attempt: int,
        max_attempts: int,
        scheduled_at: datetime | None = None,
        deadline: float | None = None,
    ) -> None:
        self._conn = conn
        self.in_transaction = False
        self._ended: bool | None = None
        #: The id of the task, the same for every step of this job run.
        self.task_id = task_id
        #: The name of the job.
        self.job = job
        #: The index of the running step, from 0.
        self.step = step
        #: Which try of this step this is, from 1.
        self.attempt = attempt
        #: Tries this step gets in all.
        self.max_attempts = max_attempts
        #: The tick this run serves, for a task enqueued by a schedule; else None.
        self.scheduled_at = scheduled_at
        #: When the step's timeout runs out, on the ``time.monotonic()`` clock; or None.
        self.deadline = deadline

    @property
    def connection(self) -> psycopg2.extensions.connection:
        """The worker's connection, inside the step's transaction.

        Its statements cannot outlive the step's timeout: ``statement_timeout`` is set to
        the time the step has left.
        """
        if not self.in_transaction:
            left_ms = None
            if self.deadline is not None:
                # Rounded up: the server cancels a statement at the deadline, not before.
                left_ms = max(math.ceil((self.deadline - time.monotonic()) * 1000), 1)
            with self._conn.cursor() as cur:
                store.begin_step(cur, left_ms)
            self.in_transaction = True
        return self._conn

    def ended_its_transaction(self) -> bool:
        """Whether the step began the transaction (through :attr:`connection`) and then
        ended it itself, with a COMMIT or ROLLBACK of its own (and maybe began another):
        the worker must not commit what is left. Asked once, after the step."""
        if self._ended is None:
            status = self._conn.info.transaction_status
            if not self.in_transaction or status == _IN_ERROR:
                self._ended = False
            elif status == psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                self._ended = True
            else:
                with self._conn.cursor() as cur:
                    self._ended = not store.in_step_transaction(cur)
        return self._ended

    def aborted(self) -> bool:
        """Whether the step's transaction is aborted: an SQL error the step caught and went
        on from. Nothing it wrote can commit."""
        status = self._conn.info.transaction_status
        return self.in_transaction and status == _IN_ERROR

    def closed(self) -> bool:
        """Whether the worker's connection is gone."""
        return bool(self._conn.closed)

    def lost(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised in the step, is the loss of the worker's own connection
        or database (an outage the worker must recover from), not the step's failure."""
        return self.closed() or is_our_outage(exc, self._conn)

    @property
    def cancelled(self) -> bool:
        """Whether this task's cancellation was asked for while it ran. The worker stops
        it after this step anyway; a long step may check this to stop sooner (return, or
        raise). Each check asks the database."""
        with self._conn.cursor() as cur:
            return store.cancel_requested(cur, self.task_id)

    def cursor(self, *args: Any, **kwargs: Any) -> psycopg2.extensions.cursor:
        """A new cursor on the step's transaction; arguments go to ``connection.cursor()``."""
        return self.connection.cursor(*args, **kwargs)

    def enqueue(
        self,
        job: Job,
        input: Any = None,
        *,
        delay: Any = None,
        run_at: datetime | None = None,
        priority: int | None = None,
    ) -> Task:
        """Enqueue ``job`` inside this step's transaction: it exists only if the step commits.
        ``delay``, ``run_at`` and ``priority`` are as for :meth:`Job.enqueue`."""
        return job.enqueue(
            input, conn=self.connection, delay=delay, run_at=run_at, priority=priority
        )

    def __repr__(self) -> str:
        return (
            f"<Context job={self.job!r} task_id={self.task_id} step={self.step} "
            f"attempt={self.attempt}/{self.max_attempts}>"
        )
