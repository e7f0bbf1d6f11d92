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

import contextlib
import logging
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import metrics, tracing
from .db import redact_dsn
from .job import Job
from .options import SupervisorOptions
from .records import Release
from .scheduler import Scheduler
from .service import Service
from .slots import Held, Slots
from .upkeep import Upkeep
from .worker import Worker

log = logging.getLogger("underway.supervisor")

HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD}

QUICK_DEATH = 5.0
"""A worker that dies sooner than this after starting is restarted with growing backoff."""

FINISH_WITHIN = 3.0
"""Seconds a stop may spend, after its workers are gone, giving back what they held."""

TIMEOUT_KILL_AFTER = 5.0
"""Seconds past a step's deadline before the supervisor kills its worker: the worker's own
SIGALRM gets the first chance to stop the step cleanly."""


@dataclass
class Child:
    """One child process the supervisor keeps running: a worker, which posts its claims to
    its slot in shared memory, or the scheduler (no slot). The record outlives each process
    that fills it, keeping what restarts need."""

    role: str
    slot: int | None = None
    pid: int = 0  # 0 while no process runs
    started: float = 0.0
    #: When to start it again, once it died; None while running or not to restart.
    restart_at: float | None = None
    #: Deaths in a row, each soon after its start: the restart backoff grows with them.
    quick_deaths: int = 0
    #: Killed by our own stop (its try is not counted), for a step past its deadline, or
    #: for a step an operator aborted.
    stopped_by_us: bool = False
    timed_out: bool = False
    aborted: bool = False


class Supervisor:
    """Owns N worker processes for the given jobs (see the module docstring)."""

    def __init__(self, dsn: str, jobs: Mapping[str, Job], options: SupervisorOptions) -> None:
        self.dsn = dsn
        self.jobs = dict(jobs)
        self.options = options
        self.slots = Slots(options.workers)
        self.upkeep = Upkeep(
            dsn,
            self.slots,
            self.jobs,
            lease=options.lease,
            db_timeout=options.db_timeout,
            workers=self.workers_now,
            abort=self.abort,
        )
        self.children = [Child("worker", slot) for slot in range(options.workers)]
        if options.scheduler and not options.burst:
            self.children.append(Child("scheduler"))
        self.stopping_at: float | None = None  # deadline of a graceful stop
        self.hard_stop = False
        self.interrupts = 0
        self.reload = False
        self._wake_r, self._wake_w = os.pipe()

    # -- the loop ---------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until stopped; returns the exit status."""
        # A port already taken stops the supervisor before it registers anything.
        if self.options.metrics_port is not None:
            metrics.serve(self.options.metrics_port, self.dsn)
        self.upkeep.register()
        self._install_signal_handlers()
        log.info(
            "supervisor %s starting %d workers for jobs %s on %s",
            os.getpid(),
            self.options.workers,
            ", ".join(sorted(self.jobs)),
            redact_dsn(self.dsn),
        )
        for child in self.children:
            self.spawn(child)
        while True:
            self.wait_for_event()
            self.reap()
            if self.hard_stop:
                self.kill_all()
                self.finish()
                log.warning("hard stop: workers killed, their tasks given back")
                return 1
            if self.stopping_at is not None:
                if time.monotonic() >= self.stopping_at and self.running():
                    log.warning("grace period over: killing workers still running a step")
                    self.kill_all()
                if not self.running():
                    self.finish()
                    log.info("supervisor stopped")
                    return 0
            elif self.options.burst and not self.running() and not self.restarting():
                self.finish()
                log.info("burst done: no ready task left")
                return 0
            else:
                if self.reload:
                    self.reload = False
                    log.info("restarting workers")
                    self.signal_workers(signal.SIGTERM)
                self.respawn_due()
            self.end_overdue()
            if self.stopping_at is not None:
                # Upkeep must not hold the stop past its grace period, whatever the database.
                self.upkeep.deadline = self.stopping_at + FINISH_WITHIN
            self.upkeep.run_due()

    def finish(self) -> None:
        """Give back what dead workers held, if not done yet, sign off and close the
        connection: within a few seconds, whatever the database does. What could not be
        given back is left to its lease."""
        self.upkeep.deadline = time.monotonic() + FINISH_WITHIN
        if self.upkeep.dead_workers.queue:
            self.upkeep.run(self.upkeep.dead_workers)
        if self.upkeep.dead_workers.queue:
            log.warning(
                "could not give back %d dead workers' tasks: their leases will bring them back",
                len(self.upkeep.dead_workers.queue),
            )
        self.upkeep.sign_off()
        self.upkeep.close()

    def running(self) -> list[Child]:
        """The children whose process runs now."""
        return [child for child in self.children if child.pid]

    def restarting(self) -> list[Child]:
        """The children waiting to be started again."""
        return [child for child in self.children if child.restart_at is not None]

    def wait_for_event(self) -> None:
        """Sleep until a signal or child exit arrives, or the next timer is due."""
        # At least once a second: a step that started since may be stuck past its deadline.
        timeout = min(self.upkeep.seconds_until_due(), 1.0)
        deadlines = [deadline for _, _, deadline in self.held() if deadline]
        if deadlines:
            timeout = min(timeout, min(deadlines) + TIMEOUT_KILL_AFTER - time.monotonic())
        restarts = [child.restart_at for child in self.restarting()]
        if restarts:
            timeout = min(timeout, min(restarts) - time.monotonic())  # type: ignore[type-var]
        if self.stopping_at is not None:
            timeout = min(timeout, self.stopping_at - time.monotonic())
        watched: list[Any] = [self._wake_r]
        conn = self.upkeep.conn
        if conn is not None and not conn.closed:
            watched.append(conn)
            if conn.notifies:  # read along with the result of an upkeep statement
                timeout = 0
        readable, _, _ = select.select(watched, [], [], max(timeout, 0))
        if self._wake_r in readable:
            os.read(self._wake_r, 4096)
        if conn is not None and (conn in readable or conn.notifies):
            self.upkeep.notified()

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

    # The handlers set flags for the loop to act on; a stop also passes SIGTERM on to the
    # workers at once (os.kill is safe in a handler), but nothing here logs or waits.
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
        """Send ``signum`` to every live child."""
        for child in self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    # -- children ---------------------------------------------------------------

    def spawn(self, child: Child) -> None:
        """Fork a process for ``child``.

        Signals are held back across the fork, so that the new process never runs the
        supervisor's handlers and a stop signal never misses it.
        """
        child.restart_at = None
        if child.slot is not None:
            self.slots.reset(child.slot)
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                os._exit(self._child_main(child))
            child.pid, child.started = pid, time.monotonic()
            child.stopped_by_us = child.timed_out = child.aborted = False
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def _child_main(self, child: Child) -> int:
        """Body of a forked worker or scheduler process; returns its exit status."""
        status = 0
        try:
            # The parent's connection and wake-up pipe are not ours: leave them be.
            if self.upkeep.conn is not None:
                _inherited.append(self.upkeep.conn)
            os.close(self._wake_r)
            os.close(self._wake_w)
            wake_r, wake_w = os.pipe()
            os.set_blocking(wake_r, False)
            os.set_blocking(wake_w, False)
            signal.set_wakeup_fd(wake_w)
            service = self._service(child, wake_r)
            # Ctrl-C and Ctrl-\ reach the whole process group: only the supervisor decides.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGQUIT, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, lambda *_: service.stop())
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            service.run()
        except BaseException:
            log.critical("%s crashed:\n%s", child.role, traceback.format_exc())
            status = 1
        finally:
            tracing.flush()  # the process ends with os._exit: no atexit handlers
            logging.shutdown()
        return status

    def _service(self, child: Child, wakeup_fd: int) -> Service:
        """What runs in ``child``'s process: a worker, or the scheduler."""
        if child.slot is None:
            return Scheduler(
                self.dsn, self.jobs, wakeup_fd=wakeup_fd, db_timeout=self.options.db_timeout
            )
        return Worker(
            self.dsn,
            self.jobs,
            poll_interval=self.options.poll_interval,
            lease=self.options.lease,
            burst=self.options.burst,
            async_commit=self.options.async_commit,
            max_tasks=self.options.max_tasks,
            slots=self.slots,
            slot=child.slot,
            wakeup_fd=wakeup_fd,
        )

    def reap(self, block: bool = False) -> None:
        """Collect every child that exited, give back what it held, plan its restart."""
        while self.running():
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for child in self.children:
                if child.pid == pid:
                    self.on_exit(child, status)

    def on_exit(self, child: Child, status: int) -> None:
        """A child exited: give back what it held, then decide whether to restart it."""
        pid, ours = child.pid, child.stopped_by_us
        child.pid = 0
        metrics.worker_exited(pid)
        how = describe_exit(status)
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        held = Held(0, 0, 0.0, 0, 0, 0.0, 0)
        if child.slot is not None:
            held = self.slots.read(child.slot)
            self.slots.clear(child.slot)
        if held.token or held.backend_pid or not clean:
            self.upkeep.after_death(
                (held.backend_pid, held.backend_start), self._releases(child, pid, how, held)
            )
        if clean or ours:
            log.info("%s %s", _label(child, pid), how)
        else:
            holding = f" holding task {held.task_id}" if held.task_id else ""
            log.error("%s %s%s", _label(child, pid), how, holding)
        if self.stopping_at is not None or self.hard_stop or (clean and self.options.burst):
            return
        # A crash loop is a worker that dies before finishing anything (an import error, a
        # bad DSN, a step that kills it at once): back off. One killed after doing work
        # (the OOM killer, a memory limit) is replaced at once, so the pool stays full.
        lived = time.monotonic() - child.started
        looping = not (clean or child.timed_out or child.aborted) and held.done == 0
        child.quick_deaths = child.quick_deaths + 1 if looping and lived < QUICK_DEATH else 0
        delay = min(0.1 * 2**child.quick_deaths, 30.0) if child.quick_deaths else 0.0
        if delay:
            log.warning("restarting %s in %.1fs", _label(child, pid), delay)
        child.restart_at = time.monotonic() + delay
        if not clean:
            metrics.worker_restarted()

    def _releases(self, child: Child, pid: int, how: str, held: Held) -> list[Release]:
        """The claims a dead worker held, and how each try is to be recorded."""
        reason = f"worker process {pid} {how}"
        if child.timed_out:
            reason = f"the step ran past its timeout; {reason} by the supervisor"
            outcome = "timed_out"
        elif child.aborted:
            reason, outcome = f"aborted by an operator; {reason} by the supervisor", "aborted"
        elif child.stopped_by_us or not held.deadline:
            # Our own stop, or a step not yet started: the try does not count.
            outcome = "interrupted"
        else:
            reason, outcome = f"{reason} while running the step", "crashed"
        releases = [Release(held.token, reason, outcome)] if held.token else []
        if held.next_token:
            not_started = f"worker process {pid} {how} before starting it"
            releases.append(Release(held.next_token, not_started))
        return releases

    def respawn_due(self) -> None:
        """Start the children whose restart time has come."""
        now = time.monotonic()
        for child in self.restarting():
            if child.restart_at is not None and child.restart_at <= now:
                self.spawn(child)

    def kill_all(self) -> None:
        """SIGKILL every child and reap them; their tasks go back uncounted."""
        for child in self.running():
            child.stopped_by_us = True
        self.signal_workers(signal.SIGKILL)
        self.reap(block=True)

    def held(self) -> list[tuple[Child, int, float]]:
        """(child, task id, deadline) of every live worker holding a task."""
        found = []
        for child in self.running():
            if child.slot is not None:
                held = self.slots.read(child.slot)
                if held.task_id:
                    found.append((child, held.task_id, held.deadline))
        return found

    def workers_now(self) -> list[dict[str, Any]]:
        """What each live worker runs now, for the supervisors' registry."""
        now = []
        for child in self.running():
            if child.slot is not None:
                task_id = self.slots.read(child.slot).task_id or None
                now.append({"slot": child.slot, "pid": child.pid, "task_id": task_id})
        return now

    def abort(self, task_ids: list[int]) -> None:
        """End the steps of these tasks now, as an operator asked (``cancel(abort=True)``):
        kill the workers running them. The tries are recorded as aborted and the tasks end
        cancelled; fresh workers take their places."""
        for child, task_id, _ in self.held():
            if task_id in task_ids and not child.aborted:
                log.warning("worker %s: aborting task %s, as asked", child.pid, task_id)
                child.aborted = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)

    def end_overdue(self) -> None:
        """Kill workers whose step is stuck past its deadline, beyond the reach of their own
        SIGALRM (a blocking C call); the try is recorded as timed out and counts."""
        now = time.monotonic()
        for child, task_id, deadline in self.held():
            if deadline and now > deadline + TIMEOUT_KILL_AFTER and not child.timed_out:
                log.error(
                    "worker %s: task %s is %.1fs past its step's timeout; killing the worker",
                    child.pid,
                    task_id,
                    now - deadline,
                )
                child.timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)


_inherited: list[Any] = []
"""Connections a forked child inherited: kept referenced, never closed, as closing one
would end the parent's session."""


def _label(child: Child, pid: int) -> str:
    """How logs call a child process: 'scheduler 123' or 'worker 456 (slot 0)'."""
    if child.slot is None:
        return f"{child.role} {pid}"
    return f"{child.role} {pid} (slot {child.slot})"


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


if __name__ == "__main__":
    from .run import main

    sys.exit(main())
