"""The supervisor's upkeep of the database: units of work it does beside its workers.

Each unit is small and has a :meth:`~Unit.run_once` that a test can call on its own:

- :class:`DeadWorkers` ends the server session a dead worker left behind and gives back
  the task it held, at once;
- :class:`LeaseRenewal` renews the leases of the tasks this supervisor's workers hold,
  every third of a lease, so a step may run for hours and never be reclaimed;
- :class:`LapsedLeases` gives back tasks whose lease lapsed anywhere: their host is gone;
- :class:`Retention` deletes finished tasks past their ``keep_for``, once a minute.

:class:`Upkeep` runs the units that are due on the supervisor's one connection. A unit
that fails does not stop the others: an outage drops the connection until the next pass,
and any other error is logged with its traceback and retried at the unit's next turn.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions

from . import store
from .db import check_schema, close_quietly, connect, is_outage
from .job import Job
from .records import Release
from .service import application_name
from .slots import Slots

log = logging.getLogger("underway.supervisor")

PURGE_INTERVAL = 60.0
"""Seconds between retention passes."""

PURGE_BATCH = 500
"""Finished tasks deleted per retention transaction: small, so no pass holds much."""

PURGE_BATCHES = 20
"""Retention transactions per pass at most; the rest waits for the next pass."""

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
    """What a dead child left behind: its server session (by ``application_name``) and the
    claims it held."""

    session: str
    releases: tuple[Release, ...]


class DeadWorkers(Unit):
    """Cleans up after dead children: ends the server session a child left running (it may
    be mid-statement, holding locks and a connection slot), then gives back the tasks it
    held. What the database refuses now stays queued for the next pass."""

    postponed = "cannot clean up after a dead worker yet"

    def __init__(self) -> None:
        self.queue: list[Death] = []

    def run_once(self, cur: Cursor) -> None:
        while self.queue:
            death = self.queue[0]
            store.end_sessions_of(cur, death.session)
            for release in death.releases:
                for task_id, state in store.release_claim(cur, release):
                    log.warning("task %s given back (%s): %s", task_id, state, release.reason)
            self.queue.pop(0)


class LeaseRenewal(Unit):
    """Extends the leases of the tasks the workers in ``slots`` hold."""

    def __init__(self, slots: Slots, lease: float) -> None:
        self.slots = slots
        self.lease = lease
        self.interval = renewal_interval(lease)

    def run_once(self, cur: Cursor) -> None:
        store.renew_leases(cur, self.slots.tokens(), self.lease)


class LapsedLeases(Unit):
    """Gives back running tasks whose lease lapsed: the host holding them is gone. The try
    counts, as a crash does."""

    def __init__(self, lease: float) -> None:
        self.interval = renewal_interval(lease)

    def run_once(self, cur: Cursor) -> None:
        for task_id in store.reclaim_expired(cur):
            log.warning("task %s released: its lease expired", task_id)


class Retention(Unit):
    """Deletes finished tasks past their ``keep_for``, in small batches that skip locked
    rows, so workers never wait on it."""

    interval = PURGE_INTERVAL

    def __init__(self, batch: int = PURGE_BATCH, max_batches: int = PURGE_BATCHES) -> None:
        self.batch = batch
        self.max_batches = max_batches

    def run_once(self, cur: Cursor) -> None:
        deleted = 0
        for _ in range(self.max_batches):
            count = store.purge_expired(cur, self.batch)
            deleted += count
            if count < self.batch:
                break
        if deleted:
            log.info("retention: deleted %d finished tasks past their keep_for", deleted)


class Upkeep:
    """Runs the upkeep units on the supervisor's one connection, each when it is due.

    :param dsn: the database.
    :param slots: the shared memory the supervisor's workers post their claims to.
    :param lease: seconds a claim's lease lasts.
    """

    def __init__(self, dsn: str, slots: Slots, lease: float) -> None:
        self.dsn = dsn
        self.conn: psycopg2.extensions.connection | None = None
        self.dead_workers = DeadWorkers()
        self.units: list[Unit] = [
            self.dead_workers,
            LeaseRenewal(slots, lease),
            LapsedLeases(lease),
            Retention(),
        ]
        self._last_run: dict[Unit, float] = {}

    def connection(self) -> psycopg2.extensions.connection:
        """The supervisor's one connection, opened (and checked) on first use."""
        if self.conn is None or self.conn.closed:
            self.conn = connect(
                self.dsn, application_name=application_name("supervisor", os.getpid())
            )
            check_schema(self.conn)
        return self.conn

    def close(self) -> None:
        """Close the connection, so a new one replaces it rather than adds to it."""
        close_quietly(self.conn)
        self.conn = None

    def register_jobs(self, jobs: Mapping[str, Job]) -> None:
        """Store the jobs and their tasks' defaults (``underway.job``), for enqueue from SQL
        and the scheduler."""
        with self.connection().cursor() as cur:
            store.register_jobs(cur, (job.defaults() for job in jobs.values()))

    def after_death(self, session: str, releases: Iterable[Release]) -> None:
        """A child died: end its session and give back its claims, now if the database lets
        us, else at a later pass."""
        self.dead_workers.queue.append(Death(session, tuple(releases)))
        self.run(self.dead_workers)

    def seconds_until_due(self) -> float:
        """Seconds until the next unit is due."""
        now = time.monotonic()
        return max(min(self._last_run.get(u, 0.0) + u.interval - now for u in self.units), 0.0)

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
        try:
            with self.connection().cursor() as cur:
                unit.run_once(cur)
        except psycopg2.Error as exc:
            if not is_outage(exc):
                log.exception("%s failed; trying again later", type(unit).__name__)
                return True
            log.warning("%s: %s", unit.postponed, exc)
            self.close()
            return False
        return True
