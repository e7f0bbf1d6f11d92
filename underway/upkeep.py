"""The supervisor's upkeep of the database: units of work it does beside its workers.

Each unit is small and has a :meth:`~Unit.run_once` that a test can call on its own:

- :class:`DeadWorkers` ends the server session a dead worker left behind and gives back
  the task it held, at once;
- :class:`LeaseRenewal` renews the leases of the tasks this supervisor's workers hold,
  every third of a lease, so a step may run for hours and never be reclaimed;
- :class:`Aborts` finds the tasks of its workers that an operator asked to abort (it is
  also woken at once by a notification), for the supervisor to end those steps;
- :class:`Heartbeat` says in ``underway.supervisor`` that the supervisor is alive and
  what each of its workers runs;
- :class:`LapsedLeases` gives back tasks whose lease lapsed anywhere: their host is gone;
- :class:`UnhandledJobs` says, once a minute, which jobs have tasks waiting that no live
  supervisor runs;
- :class:`Retention` deletes finished tasks past their ``keep_for``, and old ticks,
  statistics and supervisors' rows, once a minute.

:class:`Upkeep` runs the units that are due on the supervisor's one connection, on which
no statement may take longer than ``db_timeout`` (a frozen server included). A unit that
fails does not stop the others: an outage drops the connection until the next pass, and
any other error is logged with its traceback and retried at the unit's next turn.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import psycopg2
import psycopg2.extensions

from . import store
from .db import BoundedConnection, check_schema, close_quietly, connect_bounded, is_outage
from .errors import ConfigurationError, StepTimeout
from .job import Job
from .records import Release
from .service import application_name
from .slots import Slots

log = logging.getLogger("underway.supervisor")

PURGE_INTERVAL = 60.0
"""Seconds between retention passes."""

PURGE_BATCH = 500
"""Finished tasks deleted per retention transaction: small, so no pass holds much."""

PRUNE_TICKS = 10_000
"""Fired schedule ticks forgotten per pass at most."""

PURGE_BUDGET = 0.5
"""Seconds one retention pass may spend deleting, so the other units never wait long."""

PURGE_CATCH_UP = 1.0
"""Seconds until the next retention pass when the last one left expired tasks behind: a
busy queue finishes more tasks a minute than one pass may delete."""

ALIVE_WITHIN = 3.0
"""A supervisor whose heartbeat is older than this many renewal intervals is gone."""

Cursor = psycopg2.extensions.cursor


def renewal_interval(lease: float) -> float:
    """Seconds between lease renewals: a third of the lease, so two can fail."""
    return min(max(lease / 3, 0.2), 10.0)


class Unit:
    """One piece of upkeep, run every :attr:`interval` seconds."""

    #: Seconds between two passes.
    interval = 1.0
    #: What the log says when the database is away.
    postponed = "maintenance skipped, database unavailable"

    def run_once(self, cur: Cursor) -> None:
        """Do one pass on the supervisor's connection."""
        raise NotImplementedError


@dataclass(frozen=True)
class Death:
    """What a dead worker left behind: its server session (backend pid and start; pid 0
    for none) and the claims it held."""

    backend_pid: int
    backend_start: float
    releases: tuple[Release, ...]


class DeadWorkers(Unit):
    """Cleans up after dead workers: ends the server session a worker left running (it may
    be mid-statement, holding locks and a connection slot), then gives back the tasks it
    held. What the database refuses now stays queued for the next pass."""

    postponed = "cannot clean up after a dead worker yet"

    def __init__(self, jobs: Mapping[str, Job]) -> None:
        self.jobs = jobs
        self.queue: list[Death] = []

    def run_once(self, cur: Cursor) -> None:
        while self.queue:
            death = self.queue[0]
            if death.backend_pid:
                store.end_session(cur, death.backend_pid, death.backend_start)
            for release in death.releases:
                release = self.by_policy(cur, release)
                for task_id, state in store.release_claim(cur, release):
                    log.warning("task %s given back (%s): %s", task_id, state, release.reason)
            self.queue.pop(0)

    def by_policy(self, cur: Cursor, release: Release) -> Release:
        """A try the supervisor ended for running past its timeout is retried as when the
        worker ends it itself: as its step's retry policy says of a :class:`StepTimeout`
        (``retry_on``), after the policy's backoff."""
        if release.outcome != "timed_out":
            return release
        held = store.held_task(cur, release.token)
        if held is None:
            return release
        name, step, attempt, max_attempts = held
        job = self.jobs.get(name)
        if job is None or not 0 <= step < len(job.steps):
            return release
        policy = job.steps[step].retry
        wait = policy.retry_after(attempt, max_attempts, StepTimeout(release.reason))
        return replace(release, retry=wait is not None, delay=wait or 0.0)


class LeaseRenewal(Unit):
    """Extends the leases of the tasks the workers in ``slots`` hold."""

    def __init__(self, slots: Slots, lease: float) -> None:
        self.slots = slots
        self.lease = lease
        self.interval = renewal_interval(lease)

    def run_once(self, cur: Cursor) -> None:
        store.renew_leases(cur, self.slots.tokens(), self.lease)


class Aborts(Unit):
    """Hands the supervisor the tasks of its workers an operator asked to abort."""

    def __init__(self, slots: Slots, lease: float, abort: Callable[[list[int]], None]) -> None:
        self.slots = slots
        self.abort = abort
        self.interval = renewal_interval(lease)

    def run_once(self, cur: Cursor) -> None:
        ids = store.abort_requested(cur, self.slots.tokens())
        if ids:
            self.abort(ids)


class Heartbeat(Unit):
    """Keeps this supervisor's row in ``underway.supervisor``: alive, and running what."""

    def __init__(self, lease: float, jobs: Iterable[str], workers: Callable[[], list[Any]]):
        self.id = str(uuid.uuid4())
        self.host = socket.gethostname()
        self.jobs = sorted(jobs)
        self.workers = workers
        self.interval = renewal_interval(lease)

    def run_once(self, cur: Cursor) -> None:
        alive_for = ALIVE_WITHIN * self.interval
        store.heartbeat(cur, self.id, self.host, os.getpid(), self.jobs, self.workers(), alive_for)


class LapsedLeases(Unit):
    """Gives back running tasks whose lease lapsed: the host holding them is gone. The try
    counts, as a crash does."""

    def __init__(self, lease: float) -> None:
        self.interval = renewal_interval(lease)

    def run_once(self, cur: Cursor) -> None:
        for task_id in store.reclaim_expired(cur):
            log.warning("task %s released: its lease expired", task_id)


class UnhandledJobs(Unit):
    """Says which jobs have tasks waiting over a minute that no live supervisor runs: a
    renamed job, a typo in an enqueue from SQL, or a job shipped to enqueuers before its
    workers (then it is only a note, until the workers are deployed)."""

    interval = 60.0

    def run_once(self, cur: Cursor) -> None:
        for found in store.unhandled_jobs(cur):
            log.warning(
                "%d tasks of job %r wait, which no running supervisor handles: deploy its "
                "workers, or cancel them",
                found.tasks,
                found.job,
                extra={"event": "job_unhandled", "job": found.job, "tasks": found.tasks},
            )


class Retention(Unit):
    """Deletes finished tasks past their ``keep_for``, in small batches that skip locked
    rows, so workers never wait on it; and forgets old ticks, statistics and supervisors.

    A pass stops after :data:`PURGE_BUDGET` seconds. If it stopped with expired tasks
    left, the next pass comes after :data:`PURGE_CATCH_UP` seconds instead of a minute, so
    retention keeps pace with any drain rate instead of falling further behind each minute.
    """

    def __init__(self, batch: int = PURGE_BATCH, budget: float = PURGE_BUDGET) -> None:
        self.batch = batch
        self.budget = budget
        self.interval = PURGE_INTERVAL

    def run_once(self, cur: Cursor) -> None:
        deleted, ends = 0, time.monotonic() + self.budget
        while True:
            count = store.purge_expired(cur, self.batch)
            deleted += count
            behind = count == self.batch
            if not behind or time.monotonic() >= ends:
                break
        self.interval = PURGE_CATCH_UP if behind else PURGE_INTERVAL
        if deleted:
            log.info("retention: deleted %d finished tasks past their keep_for", deleted)
        if not behind:
            store.prune_ticks(cur, PRUNE_TICKS)
            store.prune_statistics(cur)
            store.prune_supervisors(cur)


class Upkeep:
    """Runs the upkeep units on the supervisor's one connection, each when it is due.

    :param dsn: the database.
    :param slots: the shared memory the supervisor's workers post their claims to.
    :param jobs: the jobs the supervisor runs.
    :param lease: seconds a claim's lease lasts.
    :param db_timeout: the longest wait on one statement.
    :param workers: what each worker runs now, for the heartbeat.
    :param abort: ends the steps of these tasks (an operator asked to abort them).
    """

    def __init__(
        self,
        dsn: str,
        slots: Slots,
        jobs: Mapping[str, Job],
        *,
        lease: float,
        db_timeout: float,
        workers: Callable[[], list[Any]],
        abort: Callable[[list[int]], None],
    ) -> None:
        self.dsn = dsn
        self.jobs = dict(jobs)
        self.db_timeout = db_timeout
        self.conn: BoundedConnection | None = None
        #: A ``time.monotonic()`` instant no statement may wait past (a stop's end).
        self.deadline: float | None = None
        self.dead_workers = DeadWorkers(self.jobs)
        self.aborts = Aborts(slots, lease, abort)
        self.heartbeat = Heartbeat(lease, self.jobs, workers)
        self.units: list[Unit] = [
            self.dead_workers,
            LeaseRenewal(slots, lease),
            self.aborts,
            self.heartbeat,
            LapsedLeases(lease),
            UnhandledJobs(),
            Retention(),
        ]
        self._last_run: dict[Unit, float] = {}

    def connection(self) -> BoundedConnection:
        """The supervisor's one connection, opened (and checked) on first use; it listens
        for abort requests."""
        if self.conn is None or self.conn.closed:
            self.conn = connect_bounded(
                self.dsn,
                application_name=application_name("supervisor", os.getpid()),
                timeout=self.db_timeout,
            )
            check_schema(self.conn)
            with self.conn.cursor() as cur:
                store.listen(cur, store.ABORT_CHANNEL)
        self.conn.deadline = self.deadline
        return self.conn

    def close(self) -> None:
        """Close the connection, so a new one replaces it rather than adds to it."""
        close_quietly(self.conn)
        self.conn = None

    def register(self) -> None:
        """Store the jobs, their tasks' defaults and step names (``underway.job``), and
        the limits they declare; then say this supervisor is alive."""
        rates: dict[str, tuple[int, float]] = {}
        groups: dict[str, int] = {}
        for job in self.jobs.values():
            if job.rate_limit is not None:
                _agree(rates, job.queue, job.rate_limit, f"queue {job.queue!r}: rate_limit")
            if job.max_concurrency is not None and job.concurrency_group is not None:
                what = f"concurrency group {job.concurrency_group!r}: max_concurrency"
                _agree(groups, job.concurrency_group, job.max_concurrency, what)
        with self.connection().cursor() as cur:
            store.register_jobs(cur, (job.defaults() for job in self.jobs.values()))
            store.set_concurrency_limits(cur, groups)
            for queue, (count, per) in rates.items():
                store.set_rate_limit(cur, queue, count, per)
            self.heartbeat.run_once(cur)

    def sign_off(self) -> None:
        """Remove this supervisor's row, as it stops; a frozen database leaves it to age."""
        self.run_now(lambda cur: store.sign_off(cur, self.heartbeat.id), "signing off")

    def after_death(self, backend: tuple[int, float], releases: Iterable[Release]) -> None:
        """A worker died: end its session and give back its claims, now if the database
        lets us, else at a later pass."""
        self.dead_workers.queue.append(Death(*backend, tuple(releases)))
        self.run(self.dead_workers)

    def seconds_until_due(self) -> float:
        """Seconds until the next unit is due."""
        now = time.monotonic()
        return max(min(self._last_run.get(u, 0.0) + u.interval - now for u in self.units), 0.0)

    def notified(self) -> None:
        """The connection has something to read: an abort request, most likely. Act on it
        at once rather than at the next renewal."""
        if self.conn is None:
            return
        try:
            self.conn.poll()
        except psycopg2.Error as exc:
            log.warning("%s: %s", Unit.postponed, exc)
            self.close()
            return
        if self.conn.notifies:
            self.conn.notifies.clear()
            self.run(self.aborts)

    def run_due(self) -> None:
        """Run every unit whose interval has passed since its last pass. When the database
        is away, the units still due wait for their next turn with the one that failed: they
        go together, so a reconnection is used at once, the leases renewed first."""
        now = time.monotonic()
        due = [u for u in self.units if now - self._last_run.get(u, 0.0) >= u.interval]
        for unit in due:
            self._last_run[unit] = now
        for unit in due:
            if not self.run(unit):
                return

    def run(self, unit: Unit) -> bool:
        """One pass of ``unit``; False when the database is away."""
        return self.run_now(unit.run_once, unit.postponed, type(unit).__name__)

    def run_now(
        self, work: Callable[[Cursor], None], postponed: str, name: str | None = None
    ) -> bool:
        """Do ``work`` on the connection; False when the database is away (then the log
        says ``postponed``)."""
        try:
            with self.connection().cursor() as cur:
                work(cur)
        except psycopg2.Error as exc:
            if not is_outage(exc):
                log.exception("%s failed; trying again later", name or postponed)
                return True
            log.warning("%s: %s", postponed, exc)
            self.close()
            return False
        return True


def _agree(found: dict[str, Any], name: str, value: Any, what: str) -> None:
    """Record ``value`` for ``name``, refusing two jobs that set it differently."""
    if found.setdefault(name, value) != value:
        raise ConfigurationError(
            f"{what} is set differently by two jobs: {found[name]} and {value}"
        )
