"""Helpers for your own test suite: run tasks in the test's process, against your test
database, with the same transactions as a real worker.

::

    from underway.testing import drain, run_inline

    def test_signup_sends_one_welcome_email(db):
        task = run_inline(welcome_email, {"user_id": 42})   # every step, retries included
        assert task.status() == "succeeded"

    def test_signup_endpoint(client, db):
        client.post("/signup", json={"email": "ferris@example.com"})
        assert drain() == 1                                  # ran the task it enqueued

Steps run in the calling thread, one task per transaction, exactly as in a worker: their
writes through ``cx`` commit with their completion. Delays (``To.delay``, retry backoff)
are skipped, so a test never waits; step timeouts are enforced only where the test runner
leaves SIGALRM free.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import store
from .db import default_cursor, resolve_dsn
from .errors import TaskFailed
from .job import Job, registered_jobs, unregister_job
from .task import Task, TaskState, task_info
from .worker import Worker

__all__ = ["TaskFailed", "drain", "run_inline", "unregister_job"]


def drain(
    jobs: Iterable[Job] | None = None,
    *,
    dsn: str | None = None,
    run_delayed: bool = True,
    limit: int = 10_000,
) -> int:
    """Run tasks of ``jobs`` (default: every job defined) until none is left to run;
    returns how many steps ran.

    :param run_delayed: make delayed tasks (later steps, retries) due at once rather than
        stopping when only those are left.
    :param limit: give up (:class:`RuntimeError`) after this many steps: a job that keeps
        enqueueing itself would otherwise never let the test end.
    """
    chosen = registered_jobs() if jobs is None else {job.name: job for job in jobs}
    worker = Worker(resolve_dsn(dsn), chosen, burst=True)
    ran = 0
    try:
        while True:
            if ran == limit:
                if run_delayed:
                    _make_delayed_due(worker)
                if _claimable(worker):
                    raise RuntimeError(
                        f"drain ran {limit} steps and tasks keep coming: does a job enqueue "
                        "itself? Pass a higher limit= if this is expected"
                    )
                break
            if worker.run_once():
                ran += 1
            # A task that fell due since the claim found none (a retry's short backoff on a
            # slow machine) is no longer delayed, but is there to run.
            elif not (run_delayed and (_make_delayed_due(worker) or _claimable(worker))):
                break
    finally:
        worker.disconnect()
    return ran


def _make_delayed_due(worker: Worker) -> bool:
    """Make the worker's jobs' delayed tasks due now; whether there were any."""
    with worker.connect().cursor() as cur:
        return bool(store.run_delayed_now(cur, worker.job_names))


def _claimable(worker: Worker) -> bool:
    """Whether the worker could claim a task now: a claim, rolled back."""
    with worker.connect().cursor() as cur:
        return store.claimable(cur, worker.job_names)


def run_inline(
    job: Job, input: Any = None, *, dsn: str | None = None, raise_on_failure: bool = True
) -> Task:
    """Enqueue a run of ``job`` and run it to the end in this process: every step, with
    retries at once instead of after their backoff. Other ready tasks of the same job run
    too (a test database usually has none). The task returned has finished: its
    ``result()`` is there at once, from ``dsn`` when given.

    :raises TaskFailed: when the task failed for good, with its last error and traceback
        (unless ``raise_on_failure=False``; check ``task.status()`` then).
    """
    with default_cursor(dsn) as cur:
        task = Task(job.enqueue(input, conn=cur).id, job.name, dsn)
    drain([job], dsn=dsn)
    with default_cursor(dsn) as cur:
        info = task_info(task.id, conn=cur)
        if not raise_on_failure or info is None or info.state is not TaskState.FAILED:
            return task
        error, trace = store.last_failure(cur, task.id) or (info.error, None)
    raise TaskFailed(
        f"task {task.id} of job {job.name!r} failed: {error}\n{trace or ''}", error, trace
    )
