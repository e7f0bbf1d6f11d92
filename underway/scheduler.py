"""The scheduler: turns stored cron schedules into tasks, each tick exactly once.

One scheduler process runs beside each supervisor's workers. Every turn it reads the
schedules of the jobs it knows, enqueues the latest due tick of each through
``underway.fire_tick`` — whose primary key on (job, schedule, fire time) makes any other
scheduler's attempt at the same tick a no-op — and sleeps until the next tick is due or a
schedule changes (``LISTEN underway_schedule``). Time comes from the database's clock, so
hosts with skewed clocks agree.

After an outage only the most recent missed tick is enqueued, never a burst; the ticks
passed over are logged. A schedule with ``catch_up=False`` passes over a tick that is more
than ``misfire_grace`` seconds late and waits for the next.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime

import psycopg2
import psycopg2.extensions

from . import store
from .cron import ZonedSchedule
from .db import is_outage
from .job import Job
from .records import StoredSchedule
from .service import Service

log = logging.getLogger("underway.scheduler")

SKIPPED_COUNT_LIMIT = 10_000
"""Missed ticks are counted for the log up to this many."""


class Scheduler(Service):
    """Enqueues the due ticks of the given jobs' schedules until asked to stop.

    :param dsn: the database.
    :param jobs: the jobs whose schedules this scheduler fires, by name.
    :param misfire_grace: seconds after its time within which a tick counts as on time.
    :param poll_interval: the longest wait between two looks at the schedules.
    :param wakeup_fd: a file descriptor that becomes readable when a signal arrives.
    :param db_timeout: the longest wait on one statement; a database that does not answer
        in time counts as gone (the scheduler reconnects).
    """

    role = "scheduler"
    channel = store.SCHEDULE_CHANNEL
    bounded = True
    log = log

    def __init__(
        self,
        dsn: str,
        jobs: Mapping[str, Job],
        *,
        misfire_grace: float = 60.0,
        poll_interval: float = 60.0,
        wakeup_fd: int | None = None,
        db_timeout: float = 10.0,
    ) -> None:
        super().__init__(dsn, wakeup_fd=wakeup_fd, db_timeout=db_timeout)
        self.jobs = dict(jobs)
        self.misfire_grace = misfire_grace
        self.poll_interval = poll_interval
        self._parsed: dict[str, ZonedSchedule | None] = {}
        # Schedules that failed to fire, by (job, name), with the expression they had then.
        self._broken: dict[tuple[str, str], str] = {}

    def turn(self) -> None:
        """Fire what is due, then sleep until the next tick or a schedule change."""
        self.wait_for_notification(self.run_once())

    def run_once(self, now: datetime | None = None) -> float:
        """Enqueue every schedule's due tick; returns seconds until the next tick is due
        (at most ``poll_interval``). ``now`` defaults to the database's clock."""
        with self.connect().cursor() as cur:
            if now is None:
                now = store.clock(cur)
            stored = store.load_schedules(cur, list(self.jobs))
            if not stored:
                return self.poll_interval
            wait = self.poll_interval
            for row in stored:
                schedule = self._parse(row.job, row.name, row.expression)
                if schedule is None or self._broken.get((row.job, row.name)) == row.expression:
                    continue
                try:
                    self._fire_due(cur, schedule, row, now)
                    upcoming = schedule.next_after(now)
                except psycopg2.Error as exc:
                    if is_outage(exc):
                        raise
                    self._ignore(row, exc)
                    continue
                except Exception as exc:  # one schedule must not stop the others
                    self._ignore(row, exc)
                    continue
                wait = min(wait, (upcoming - now).total_seconds())
        return max(wait, 0.01)

    def _ignore(self, row: StoredSchedule, exc: Exception) -> None:
        """Pass over a schedule that cannot fire (it can never fire again, its job has no
        steps, ...) until it is changed, saying why once; the others go on firing."""
        self._broken[(row.job, row.name)] = row.expression
        log.error(
            "schedule %s/%s is ignored until it is changed: %s: %s",
            row.job,
            row.name,
            type(exc).__name__,
            exc,
            extra={"event": "schedule_ignored", "job": row.job, "schedule": row.name},
        )

    def _fire_due(
        self,
        cur: psycopg2.extensions.cursor,
        schedule: ZonedSchedule,
        row: StoredSchedule,
        now: datetime,
    ) -> None:
        """Enqueue the latest tick due after the schedule's anchor, or pass it over if it is
        too late."""
        job, name, anchor = row.job, row.name, row.anchor
        due = schedule.previous_at_or_before(now)
        if due is None or due <= anchor:
            return
        skipped = self._count_between(schedule, anchor, due)
        if skipped:
            log.warning(
                "schedule %s/%s missed %s%s ticks between %s and %s; only the latest counts",
                job,
                name,
                skipped,
                "+" if skipped >= SKIPPED_COUNT_LIMIT else "",
                anchor.isoformat(),
                due.isoformat(),
                extra={"event": "ticks_skipped", "job": job, "schedule": name},
            )
        late = (now - due).total_seconds()
        if not row.catch_up and late > self.misfire_grace:
            store.skip_tick(cur, job, name, due)
            log.warning(
                "schedule %s/%s passed over the tick of %s (%.0fs late, catch_up=False)",
                job,
                name,
                due.isoformat(),
                late,
                extra={"event": "tick_skipped", "job": job, "schedule": name},
            )
            return
        first_step = self.jobs[job].steps[0]
        task_id = store.fire_tick(
            cur, job, name, due, self.jobs[job].priority, first_step.retry.max_attempts
        )
        if task_id is not None:
            log.info(
                "schedule %s/%s fired the tick of %s as task %s",
                job,
                name,
                due.isoformat(),
                task_id,
                extra={"event": "tick_fired", "job": job, "schedule": name, "task_id": task_id},
            )

    def _parse(self, job: str, name: str, expression: str) -> ZonedSchedule | None:
        """Parse a stored expression once; one that no longer parses is logged and ignored."""
        if expression not in self._parsed:
            try:
                self._parsed[expression] = ZonedSchedule.parse(expression)
            except ValueError as exc:
                log.error("schedule %s/%s is ignored: %s", job, name, exc)
                self._parsed[expression] = None
        return self._parsed[expression]

    @staticmethod
    def _count_between(schedule: ZonedSchedule, start: datetime, end: datetime) -> int:
        """Ticks strictly between ``start`` and ``end``, counted up to a limit."""
        count = 0
        tick = schedule.next_after(start)
        while tick < end and count < SKIPPED_COUNT_LIMIT:
            count += 1
            tick = schedule.next_after(tick)
        return count
