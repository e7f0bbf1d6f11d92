"""The supervisor: forks worker processes, keeps them running, and stops them cleanly.

Run it from a shell::

    python -m underway.supervisor myapp.jobs --workers 4

It imports the modules named (which define jobs), forks the workers and one scheduler
process (which enqueues the ticks of cron schedules, see :mod:`underway.scheduler`), and
then only watches: it replaces a worker that died, gives back the task a dead worker held (it reads
it from shared memory, see :mod:`underway.slots`), ends a worker whose step is stuck past its
timeout where the worker cannot interrupt it, renews the leases of the tasks its workers hold,
releases tasks whose lease lapsed on any host, and deletes finished tasks whose retention ran
out.

Signals:

=========  ===================================================================
SIGTERM    graceful stop: no new tasks; running steps get ``--grace`` seconds to
           finish; exit status 0. Sending it again changes nothing.
SIGINT     the first is a graceful stop, as SIGTERM; a second is a hard stop.
SIGQUIT    hard stop: workers are killed at once; exit status 1.
SIGHUP     restart the workers gracefully, e.g. after a deploy.
=========  ===================================================================

A step cut off by a stop (graceful after the grace period, or hard) goes back to the
queue at once and its try is not counted. A worker that dies on its own (a crash,
SIGKILL, the OOM killer) has used up its try; its task is released for another at once.

The supervisor holds one connection of its own, and so does each worker and the
scheduler: N workers use N + 2 connections in all.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import psycopg2
import psycopg2.extensions

from .admin import purge_expired
from .db import check_schema, close_quietly, connect, redact_dsn, resolve_dsn
from .errors import ConfigurationError, UnderwayError
from .job import Job, registered_jobs
from .queries import QUERIES
from .scheduler import Scheduler
from .service import DATABASE_ERRORS, Service, application_name
from .slots import Slots
from .worker import Worker, release_claim

log = logging.getLogger("underway.supervisor")

HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD}

QUICK_DEATH = 5.0
"""A worker that dies sooner than this after starting is restarted with growing backoff."""

MIN_LEASE, MAX_LEASE = 1.0, 86_400.0
"""The range of ``--lease``: renewals (every third of it, at most every 0.2 s) must keep up,
and a lapsed lease must come back within a day."""

TIMEOUT_KILL_AFTER = 5.0
"""Seconds past a step's deadline before the supervisor kills its worker: the worker's own
SIGALRM gets the first chance to stop the step cleanly."""

PURGE_INTERVAL = 60.0
"""Seconds between retention passes."""

PURGE_BATCH = 500
"""Finished tasks deleted per retention transaction: small, so no pass holds much."""

PURGE_BATCHES = 20
"""Retention transactions per pass at most; the rest waits for the next pass."""


SCHEDULER = -1
"""The slot of the scheduler process; workers have slots 0 to N - 1."""


@dataclass
class Process:
    """A child process the supervisor started: a worker (slot >= 0) or the scheduler."""

    slot: int
    pid: int
    started: float = field(default_factory=time.monotonic)

    @property
    def application_name(self) -> str:
        """The ``application_name`` of its database session (see :class:`Service`)."""
        return application_name("scheduler" if self.slot == SCHEDULER else "worker", self.pid)

    @property
    def name(self) -> str:
        """How logs call it: 'scheduler 123' or 'worker 456 (slot 0)'."""
        if self.slot == SCHEDULER:
            return f"scheduler {self.pid}"
        return f"worker {self.pid} (slot {self.slot})"


@dataclass(frozen=True)
class DeadChild:
    """A child that exited uncleanly or holding a task, still to be cleaned up after."""

    process: Process
    token: int
    counts: bool
    reason: str
    outcome: str


@dataclass
class SupervisorOptions:
    """How the supervisor runs; each field is a command-line option."""

    workers: int = os.cpu_count() or 1
    grace: float = 30.0
    burst: bool = False
    poll_interval: float = 1.0
    lease: float = 30.0
    scheduler: bool = True
    async_commit: bool = False
    max_tasks: int | None = None

    def problem(self) -> str | None:
        """What is wrong with these options, named as the command line names them; or
        None."""
        if self.workers < 1:
            return "workers must be at least 1"
        if self.max_tasks is not None and self.max_tasks < 1:
            return "max-tasks must be at least 1"
        if not MIN_LEASE <= self.lease <= MAX_LEASE:
            return (
                f"lease must be between {MIN_LEASE:g} and {MAX_LEASE:g} seconds, not {self.lease}"
            )
        if not 0 < self.poll_interval < float("inf"):
            return (
                f"poll-interval must be a number of seconds more than 0, not {self.poll_interval}"
            )
        if not 0 <= self.grace < float("inf"):
            return f"grace must be a number of seconds, 0 or more, not {self.grace}"
        return None


class Supervisor:
    """Owns N worker processes for the given jobs (see the module docstring)."""

    def __init__(self, dsn: str, jobs: Mapping[str, Job], options: SupervisorOptions) -> None:
        self.dsn = dsn
        self.jobs = dict(jobs)
        self.options = options
        self.slots = Slots(options.workers)
        self.processes: dict[int, Process] = {}  # by pid
        self.restart_at: dict[int, float] = {}  # slot -> when to start it again
        self.crashes: dict[int, int] = {}  # slot -> quick deaths in a row
        self.killed_by_us: set[int] = set()  # pids cut off by our own shutdown
        self.timed_out: set[int] = set()  # pids killed for a step stuck past its deadline
        self.unreleased: list[DeadChild] = []  # to clean up after, oldest first
        self.conn: psycopg2.extensions.connection | None = None
        self.stopping_at: float | None = None  # deadline of a graceful stop
        self.hard_stop = False
        self.interrupts = 0
        self.reload = False
        self._wake_r, self._wake_w = os.pipe()
        self._last_maintenance = 0.0
        self._last_purge = 0.0

    # -- the loop ---------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until stopped; returns the exit status."""
        self.register_jobs()
        self._install_signal_handlers()
        log.info(
            "supervisor %s starting %d workers for jobs %s on %s",
            os.getpid(),
            self.options.workers,
            ", ".join(sorted(self.jobs)),
            redact_dsn(self.dsn),
        )
        for slot in range(self.options.workers):
            self.spawn(slot)
        if self.options.scheduler and not self.options.burst:
            self.spawn(SCHEDULER)
        while True:
            self.wait_for_event()
            self.reap()
            if self.hard_stop:
                self.kill_all()
                log.warning("hard stop: workers killed, their tasks given back")
                return 1
            if self.stopping_at is not None:
                if time.monotonic() >= self.stopping_at and self.processes:
                    log.warning("grace period over: killing workers still running a step")
                    self.kill_all()
                if not self.processes:
                    self.release_unreleased()
                    log.info("supervisor stopped")
                    return 0
            elif self.options.burst and not self.processes and not self.restart_at:
                self.release_unreleased()
                log.info("burst done: no ready task left")
                return 0
            else:
                if self.reload:
                    self.reload = False
                    log.info("restarting workers")
                    self.signal_workers(signal.SIGTERM)
                self.respawn_due()
            self.maintain()

    def wait_for_event(self) -> None:
        """Sleep until a signal or child exit arrives, or the next timer is due."""
        # At least once a second: a step that started since may be stuck past its deadline.
        timeout = min(self.maintenance_interval(), 1.0)
        deadlines = [deadline for _, _, deadline in self.held() if deadline]
        if deadlines:
            wake = min(deadlines) + TIMEOUT_KILL_AFTER - time.monotonic()
            timeout = min(timeout, max(wake, 0))
        if self.restart_at:
            timeout = min(timeout, max(min(self.restart_at.values()) - time.monotonic(), 0))
        if self.stopping_at is not None:
            timeout = min(timeout, max(self.stopping_at - time.monotonic(), 0))
        readable, _, _ = select.select([self._wake_r], [], [], timeout)
        if readable:
            os.read(self._wake_r, 4096)

    # -- signals ----------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_int)
        signal.signal(signal.SIGQUIT, self._on_quit)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop

    # Handlers only set flags; the loop acts on them (logging here would be unsafe).
    def _on_term(self, *_: object) -> None:
        self.begin_stop()

    def _on_int(self, *_: object) -> None:
        self.interrupts += 1
        if self.interrupts > 1:
            self.hard_stop = True
        self.begin_stop()

    def _on_quit(self, *_: object) -> None:
        self.hard_stop = True

    def _on_hup(self, *_: object) -> None:
        self.reload = True

    def begin_stop(self) -> None:
        """Start a graceful stop; a repeated request keeps the first deadline."""
        if self.stopping_at is None:
            self.stopping_at = time.monotonic() + self.options.grace
            self.signal_workers(signal.SIGTERM)

    def signal_workers(self, signum: int) -> None:
        """Send ``signum`` to every live worker."""
        for pid in list(self.processes):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # -- workers ----------------------------------------------------------------

    def spawn(self, slot: int) -> None:
        """Fork the worker process for ``slot``, or the scheduler.

        Signals are held back across the fork, so that the child never runs the
        supervisor's handlers and a stop signal never misses the newborn worker.
        """
        self.restart_at.pop(slot, None)
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                os._exit(self._child_main(slot))
            self.processes[pid] = Process(slot, pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def _child_main(self, slot: int) -> int:
        """Body of a forked worker or scheduler process; returns its exit status."""
        status = 0
        try:
            # The parent's connection and wake-up pipe are not ours: leave them be.
            if self.conn is not None:
                _inherited.append(self.conn)
            os.close(self._wake_r)
            os.close(self._wake_w)
            wake_r, wake_w = os.pipe()
            os.set_blocking(wake_r, False)
            os.set_blocking(wake_w, False)
            signal.set_wakeup_fd(wake_w)
            service = self._service(slot, wake_r)
            # Ctrl-C and Ctrl-\ reach the whole process group: only the supervisor decides.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGQUIT, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, lambda *_: service.stop())
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            service.run()
        except BaseException:
            log.critical(
                "%s crashed:\n%s",
                "scheduler" if slot == SCHEDULER else "worker",
                traceback.format_exc(),
            )
            status = 1
        finally:
            logging.shutdown()
        return status

    def _service(self, slot: int, wakeup_fd: int) -> Service:
        """The worker for ``slot``, or the scheduler."""
        if slot == SCHEDULER:
            return Scheduler(self.dsn, self.jobs, wakeup_fd=wakeup_fd)
        return Worker(
            self.dsn,
            self.jobs,
            poll_interval=self.options.poll_interval,
            lease=self.options.lease,
            burst=self.options.burst,
            async_commit=self.options.async_commit,
            max_tasks=self.options.max_tasks,
            slots=self.slots,
            slot=slot,
            wakeup_fd=wakeup_fd,
        )

    def reap(self) -> None:
        """Collect every worker that exited, give back its task, and plan its restart."""
        while self.processes:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            process = self.processes.pop(pid, None)
            if process is not None:
                self.on_exit(process, status)

    def on_exit(self, process: Process, status: int) -> None:
        """A worker exited: release what it held, then decide whether to restart it."""
        slot = process.slot
        ours = process.pid in self.killed_by_us
        self.killed_by_us.discard(process.pid)
        timed_out = process.pid in self.timed_out
        self.timed_out.discard(process.pid)
        how = describe_exit(status)
        token, task_id, deadline, next_token = (
            (0, 0, 0.0, 0) if slot == SCHEDULER else self.slots.read(slot)
        )
        if slot != SCHEDULER:
            self.slots.clear(slot)
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if token or not clean:
            reason = f"worker process {process.pid} {how}"
            if timed_out:
                reason = f"the step ran past its timeout; {reason} by the supervisor"
            elif not ours:
                reason += " while running the step"
            # A try counts when its step had started (it has a deadline) and we did not stop it.
            counts = not ours and deadline > 0
            outcome = "timed_out" if timed_out else "crashed" if counts else "interrupted"
            self.unreleased.append(DeadChild(process, token, counts, reason, outcome))
            if next_token:
                not_started = f"worker process {process.pid} {how} before starting it"
                self.unreleased.append(
                    DeadChild(process, next_token, False, not_started, "interrupted")
                )
            self.release_unreleased()
        if clean or ours:
            log.info("%s %s", process.name, how)
        else:
            log.error(
                "%s %s%s",
                process.name,
                how,
                f" holding task {task_id}" if task_id else "",
            )
        if self.stopping_at is not None or self.hard_stop:
            return
        if clean and self.options.burst:
            return
        lived = time.monotonic() - process.started
        self.crashes[slot] = self.crashes.get(slot, 0) + 1 if lived < QUICK_DEATH else 0
        if clean:
            self.crashes[slot] = 0
        delay = 0.0 if not self.crashes[slot] else min(0.1 * 2 ** self.crashes[slot], 30.0)
        if delay:
            log.warning("restarting %s in %.1fs", process.name, delay)
        self.restart_at[slot] = time.monotonic() + delay

    def respawn_due(self) -> None:
        """Start the workers whose restart time has come."""
        now = time.monotonic()
        for slot, when in list(self.restart_at.items()):
            if when <= now:
                self.spawn(slot)

    def kill_all(self) -> None:
        """SIGKILL every worker and reap them; their tasks go back uncounted."""
        for pid in list(self.processes):
            self.killed_by_us.add(pid)
        self.signal_workers(signal.SIGKILL)
        while self.processes:
            pid, status = os.waitpid(-1, 0)
            process = self.processes.pop(pid, None)
            if process is not None:
                self.on_exit(process, status)
        self.release_unreleased()

    # -- database ---------------------------------------------------------------

    def connection(self) -> psycopg2.extensions.connection:
        """The supervisor's one connection, opened (and checked) on first use."""
        if self.conn is None or self.conn.closed:
            self.conn = connect(
                self.dsn, application_name=application_name("supervisor", os.getpid())
            )
            check_schema(self.conn)
        return self.conn

    def drop_connection(self) -> None:
        """Close a connection that failed, so a new one replaces it rather than adds to it."""
        close_quietly(self.conn)
        self.conn = None

    def release_unreleased(self) -> None:
        """Clean up after dead children: end the server session a child left running (it
        may be mid-statement, holding locks and a connection slot), then give back the
        task it held. Kept for later while the database is away."""
        while self.unreleased:
            dead = self.unreleased[0]
            try:
                with self.connection().cursor() as cur:
                    cur.execute(
                        QUERIES["end_sessions_of"],
                        {"application_name": dead.process.application_name},
                    )
                    released = []
                    if dead.token:
                        released = release_claim(
                            cur, dead.token, dead.counts, dead.reason, dead.outcome
                        )
            except DATABASE_ERRORS as exc:
                log.warning("cannot clean up after a dead worker yet: %s", exc)
                self.drop_connection()
                return
            self.unreleased.pop(0)
            for task_id, state in released:
                log.warning("task %s given back (%s): %s", task_id, state, dead.reason)

    def maintenance_interval(self) -> float:
        """Seconds between lease renewals; a third of the lease, so two can fail."""
        return min(max(self.options.lease / 3, 0.2), 10.0)

    def held(self) -> list[tuple[int, int, float]]:
        """(pid, task id, deadline) of every live worker holding a task."""
        found = []
        for process in self.processes.values():
            if process.slot != SCHEDULER:
                _, task_id, deadline, _ = self.slots.read(process.slot)
                if task_id:
                    found.append((process.pid, task_id, deadline))
        return found

    def end_overdue(self) -> None:
        """Kill workers whose step is stuck past its deadline, beyond the reach of their own
        SIGALRM (a blocking C call); the try is recorded as timed out and counts."""
        now = time.monotonic()
        for pid, task_id, deadline in self.held():
            if deadline and now > deadline + TIMEOUT_KILL_AFTER and pid not in self.timed_out:
                log.error(
                    "worker %s: task %s is %.1fs past its step's timeout; killing the worker",
                    pid,
                    task_id,
                    now - deadline,
                )
                self.timed_out.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def register_jobs(self) -> None:
        """Store our jobs and their tasks' defaults (``underway.job``), for enqueue from SQL
        and the scheduler."""
        jobs = [job.defaults() for job in self.jobs.values()]
        with self.connection().cursor() as cur:
            cur.execute(QUERIES["register_jobs"], {"jobs": json.dumps(jobs)})

    def purge_expired(self) -> None:
        """Retention, once a minute: delete finished tasks past their ``keep_for`` in small
        batches that skip locked rows, so workers never wait on it."""
        now = time.monotonic()
        if now - self._last_purge < PURGE_INTERVAL:
            return
        self._last_purge = now
        deleted = purge_expired(
            conn=self.connection(), batch=PURGE_BATCH, max_batches=PURGE_BATCHES
        )
        if deleted:
            log.info("retention: deleted %d finished tasks past their keep_for", deleted)

    def maintain(self) -> None:
        """End overdue steps, renew our workers' leases, release tasks whose lease lapsed
        anywhere, and apply retention."""
        self.end_overdue()
        now = time.monotonic()
        if now - self._last_maintenance < self.maintenance_interval():
            return
        self._last_maintenance = now
        try:
            self.release_unreleased()
            with self.connection().cursor() as cur:
                tokens = self.slots.tokens()
                if tokens:
                    cur.execute(
                        QUERIES["renew_leases"], {"tokens": tokens, "lease": self.options.lease}
                    )
                cur.execute(QUERIES["reclaim_expired"])
                for task_id, _ in cur.fetchall():
                    log.warning("task %s released: its lease expired", task_id)
            self.purge_expired()
        except DATABASE_ERRORS as exc:
            log.warning("maintenance skipped, database unavailable: %s", exc)
            self.drop_connection()


_inherited: list[psycopg2.extensions.connection] = []


def describe_exit(status: int) -> str:
    """How a child ended, in words: 'exited with status 1', 'killed by SIGKILL'."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"killed by {name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def import_jobs(modules: Sequence[str]) -> dict[str, Job]:
    """Import the modules that define jobs and return every job defined."""
    for name in modules:
        importlib.import_module(name)
    return registered_jobs()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line of ``python -m underway.supervisor``."""
    defaults = SupervisorOptions()
    parser = argparse.ArgumentParser(
        prog="python -m underway.supervisor",
        description="Run underway workers for the jobs defined in MODULEs.",
    )
    parser.add_argument("modules", nargs="+", metavar="MODULE", help="module defining jobs")
    parser.add_argument(
        "--workers", type=int, default=defaults.workers, help="worker processes (default: CPUs)"
    )
    parser.add_argument("--dsn", help="database (default: $DATABASE_URL)")
    parser.add_argument(
        "--grace",
        type=float,
        default=defaults.grace,
        help="seconds running steps get to finish on a graceful stop (default: 30)",
    )
    parser.add_argument(
        "--burst", action="store_true", help="exit once no task of these jobs is ready to run"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=defaults.poll_interval,
        help="longest idle wait between looks at the queue, in seconds (default: 1)",
    )
    parser.add_argument(
        "--lease",
        type=float,
        default=defaults.lease,
        help="seconds before a task whose supervisor stopped renewing it is reclaimed "
        "(default: 30)",
    )
    parser.add_argument(
        "--no-scheduler",
        dest="scheduler",
        action="store_false",
        help="do not run the scheduler process that enqueues cron schedules' ticks",
    )
    parser.add_argument(
        "--async-commit",
        action="store_true",
        help="commit steps with synchronous_commit=off: faster; a database crash may make "
        "the last steps run again (see the README)",
    )
    parser.add_argument(
        "--max-tasks",
        type=int,
        metavar="N",
        help="replace each worker process after it ran N tasks (default: never)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    args = parser.parse_args(argv)
    problem = SupervisorOptions(
        workers=args.workers,
        grace=args.grace,
        poll_interval=args.poll_interval,
        lease=args.lease,
        max_tasks=args.max_tasks,
    ).problem()
    if problem:
        parser.error(f"--{problem}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m underway.supervisor``; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    sys.path.insert(0, os.getcwd())
    try:
        jobs = import_jobs(args.modules)
    except ModuleNotFoundError as exc:
        wanted = [m for m in args.modules if exc.name and (m + ".").startswith(exc.name + ".")]
        if wanted:
            missing = "no such module" if exc.name == wanted[0] else f"no module {exc.name!r}"
            print(f"underway: cannot import module {wanted[0]!r}: {missing}", file=sys.stderr)
            return 2
        raise
    if not jobs:
        print(
            f"underway: no jobs defined in {', '.join(args.modules)}: define one with Job(...)",
            file=sys.stderr,
        )
        return 2
    try:
        return run_workers(
            jobs,
            dsn=args.dsn,
            workers=args.workers,
            grace=args.grace,
            burst=args.burst,
            poll_interval=args.poll_interval,
            lease=args.lease,
            scheduler=args.scheduler,
            async_commit=args.async_commit,
            max_tasks=args.max_tasks,
        )
    except (UnderwayError, psycopg2.OperationalError) as exc:
        print(f"underway: {exc}".strip(), file=sys.stderr)
        return 1


def run_workers(
    jobs: Mapping[str, Job] | None = None,
    *,
    dsn: str | None = None,
    workers: int = 1,
    grace: float = 30.0,
    burst: bool = False,
    poll_interval: float = 1.0,
    lease: float = 30.0,
    scheduler: bool = True,
    async_commit: bool = False,
    max_tasks: int | None = None,
) -> int:
    """Supervise worker processes from this process, as ``python -m underway.supervisor``
    does; blocks until stopped and returns the exit status.

    Handy in scripts that define their jobs in ``__main__``::

        underway.run_workers(workers=2, burst=True)   # work until nothing is ready

    :param jobs: the jobs to run, by name (default: every job defined so far).
    :param scheduler: also run the scheduler process for the jobs' cron schedules
        (never in burst mode).
    :param async_commit: commit steps with ``synchronous_commit = off`` (see
        :class:`~underway.worker.Worker`).
    :param max_tasks: replace each worker process after it ran this many tasks.
    :raises ConfigurationError: for options out of range (a lease under a second, say),
        before anything starts.
    :param dsn: the database (default: :func:`underway.configure`'s, else ``$DATABASE_URL``).
    """
    options = SupervisorOptions(
        workers=workers,
        grace=grace,
        burst=burst,
        poll_interval=poll_interval,
        lease=lease,
        scheduler=scheduler,
        async_commit=async_commit,
        max_tasks=max_tasks,
    )
    problem = options.problem()
    if problem:
        option, _, what = problem.partition(" ")
        raise ConfigurationError(f"run_workers: {option.replace('-', '_')} {what}")
    chosen = registered_jobs() if jobs is None else dict(jobs)
    return Supervisor(resolve_dsn(dsn), chosen, options).run()


if __name__ == "__main__":
    sys.exit(main())
