"""The worker: one process, one connection, one task at a time.

:meth:`Worker.turn` is one pass of the loop (the loop itself, with reconnecting, is
:meth:`Service.run <underway.service.Service.run>`); read it first. Each turn,
:meth:`Worker.run_once`

1. takes the task claimed while recording the previous one, or else claims the next
   ready task in a short transaction of its own; either way the claim, which counts the
   try, is committed before the step starts, so a worker that dies mid-step has used it up;
2. calls the step with a :class:`~underway.context.Context`; the step's writes through it
   go into a second transaction;
3. in that same transaction records the outcome: the next step, the end of the job (with
   its result), or a failure to retry, fenced on the claim token so a worker that lost its
   task (lease lapsed, task reclaimed) can change nothing; and, in the same statement,
   claims the next ready task;
4. commits.

A step's effects, its completion and the enqueue of its next step thus commit together or
not at all, and a busy worker spends one round trip and one commit per task. When no task
is ready, the worker waits on LISTEN/NOTIFY, and never longer than the poll interval or the
time until the next delayed task is due.

Nothing a step does can stop the worker: an exception of any kind (``sys.exit()``
included) fails that try, with its error recorded. A task whose stored input cannot be
decoded fails for good. Only the database going away interrupts a try; the worker then
reconnects and gives the task back, uncounted, as soon as the database takes writes.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Mapping
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from . import metrics, store, tracing
from .context import Context
from .db import TRANSACTION_POOLED, is_outage, refuse_transaction_pooling
from .errors import ConfigurationError, Fatal, StepTimeout
from .job import Job, Step, To
from .outcome import ABORTED, DEALLOCATED, SELF_COMMITTED, describe, interpret
from .records import Claim, Release
from .service import Service
from .slots import Slots
from .tally import Tally
from .timeouts import StepClock
from .values import MAX_ERROR_CHARS, clean_text

log = logging.getLogger("underway.worker")


#: A deadlock or serialization failure in recording an outcome: the try is given back,
#: uncounted, rather than taken for a bug.
TRANSIENT = ("40P01", "40001")

LOST = (
    "the task was taken from this worker (its lease lapsed) before the outcome was "
    "recorded; the step's writes were rolled back"
)


class Worker(Service):
    """Runs tasks of the given jobs, one per transaction, until asked to stop.

    Normally started by the supervisor (``python -m underway.supervisor``), one per
    process. Tests can drive it directly with :meth:`run_once`.

    :param dsn: the database.
    :param jobs: the jobs this worker runs, by name; tasks of other jobs are left alone.
    :param poll_interval: the longest an idle worker waits before looking again, in case a
        notification was missed.
    :param lease: seconds a claim stays valid unless the supervisor renews it.
    :param burst: stop as soon as no task is ready.
    :param async_commit: commit step transactions with ``synchronous_commit = off``: much
        faster, and still all-or-nothing, but a server *crash* (not a restart) may forget
        the last moments of committed steps, which then run again.
    :param max_tasks: stop after running this many tasks, for the supervisor to start a
        fresh process: a bound on what a leaky step can hold on to.
    :param slots: shared memory to post held tasks to the supervisor, and this
        worker's ``slot`` index in it.
    :param wakeup_fd: a file descriptor that becomes readable when a signal arrives, so an
        idle wait ends at once.
    """

    role = "worker"
    log = log
    prepares = True

    def __init__(
        self,
        dsn: str,
        jobs: Mapping[str, Job],
        *,
        poll_interval: float = 1.0,
        lease: float = 30.0,
        burst: bool = False,
        async_commit: bool = False,
        max_tasks: int | None = None,
        slots: Slots | None = None,
        slot: int = 0,
        wakeup_fd: int | None = None,
    ) -> None:
        super().__init__(dsn, wakeup_fd=wakeup_fd)
        self.jobs = dict(jobs)
        self.job_names = sorted(self.jobs)
        self.poll_interval = poll_interval
        self.lease = lease
        self.burst = burst
        self.async_commit = async_commit
        self.max_tasks = max_tasks
        self.tasks_run = 0
        self.slots = slots or Slots(1)
        self.slot = slot if slots else 0
        # Claims held when the connection broke, to give back once reconnected.
        self._orphans: list[Release] = []
        # The next task, claimed in the transaction that completed the previous one.
        self._next: Claim | None = None
        self.clock = StepClock()
        self.tally = Tally()
        #: The server session of this worker's connection, once connected.
        self.backend_pid = 0

    def turn(self) -> None:
        """Run one ready task; with none ready, wait for one (or stop, in burst mode)."""
        if self.run_once(claim_next=True):
            self.tasks_run += 1
            self.slots.count_done(self.slot, self.tasks_run)
            if self.max_tasks is not None and self.tasks_run >= self.max_tasks:
                log.info(
                    "worker %s ran %d tasks: exiting to be replaced", os.getpid(), self.tasks_run
                )
                self.stop()
            elif self.tally.due():
                self.flush_tally()
            return
        self.flush_tally()
        if self.burst:
            self.stop()
        else:
            self.wait()

    def run_once(self, claim_next: bool = False) -> bool:
        """Claim and run one ready task; False when none was ready.

        With ``claim_next`` (the worker loop), the transaction that records the task's
        outcome also claims the next one, saving a round trip and a commit per task; the
        next call runs it.
        """
        claim, self._next = self._next or self.claim(), None
        if claim is None:
            return False
        try:
            self.execute(claim, claim_next)
        finally:
            # A task still to give back stays posted, so that the supervisor keeps its
            # lease and, if this process dies before it reconnects, gives it back instead.
            if not self._orphans:
                if self._next is not None:
                    self.slots.post(self.slot, self._next.token, self._next.id)
                else:
                    self.slots.clear(self.slot)
        return True

    def on_stop(self) -> None:
        """Give back a next task claimed but not started (it was not tried), and count what
        was done."""
        if self.conn is None:
            return
        if self._next is not None:
            self._orphans.append(Release(self._next.token, "the worker stopped before starting it"))
            self._next = None
        try:
            self.give_back_orphans()
            self.flush_tally()
        except psycopg2.Error as exc:
            if not is_outage(exc):
                raise
            # Still posted in the slot: the supervisor gives it back.

    def on_connect(self) -> None:
        """Set the session up and tell the supervisor which it is; after a reconnect, give
        back the task held when the connection broke."""
        assert self.conn is not None
        with self.conn.cursor() as cur:
            self.backend_pid, started = store.session(cur)
            refuse_transaction_pooling(self.dsn, self.backend_pid)
            if self.async_commit:
                store.set_async_commit(cur)
            store.prepare_all(cur)
        self.slots.post_session(self.slot, self.backend_pid, started)
        if self._orphans:
            self.give_back_orphans()

    def disconnect(self) -> None:
        """Close the connection, and say there is no session to end any more."""
        super().disconnect()
        self.slots.post_session(self.slot, 0, 0.0)

    # -- claiming and waiting -----------------------------------------------------

    def claim(self) -> Claim | None:
        """Claim the next ready task, posting the claim token to the supervisor first."""
        token = random.getrandbits(63) or 1
        self.slots.post(self.slot, token)
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                claim = store.claim_task(cur, self.job_names, token, self.lease)
        except psycopg2.Error as exc:
            if is_outage(exc):
                # The claim may have committed: give it back, uncounted, once reconnected.
                self._orphans.append(Release(token, "connection lost while claiming"))
            raise
        if claim is None:
            self.slots.clear(self.slot)
            return None
        self.slots.post(self.slot, token, claim.id)
        return claim

    def wait(self) -> None:
        """Sleep until notified, until the next delayed task is due, or the poll interval."""
        with self.connect().cursor() as cur:
            due, pid = store.seconds_until_due(cur, self.job_names)
        if pid != self.backend_pid:
            raise ConfigurationError(
                f"the worker's statements ran in two server sessions ({self.backend_pid} and "
                f"{pid}): {TRANSACTION_POOLED}"
            )
        timeout = self.poll_interval
        if due is not None:
            timeout = min(timeout, max(due, 0.005))
        self.wait_for_notification(timeout)

    def flush_tally(self) -> None:
        """Add the tries finished since the last flush to the per-minute statistics."""
        if self.tally and self.conn is not None:
            with self.conn.cursor() as cur:
                store.count_finished(cur, self.tally.take())

    # -- running a step -----------------------------------------------------------

    def execute(self, claim: Claim, claim_next: bool = False) -> None:
        """Run the claimed task's step and commit its outcome with its effects (and, with
        ``claim_next``, the claim of the next task, kept in ``_next``)."""
        job = self.jobs[claim.job]
        conn = self.conn  # just used by the claim: no need to look at it again
        assert conn is not None
        step = job.steps[claim.step] if claim.step < len(job.steps) else None
        timeout = step.timeout if step is not None else job.timeout
        deadline = time.monotonic() + timeout
        self.slots.post(self.slot, claim.token, claim.id, deadline)
        cx = Context(
            conn,
            task_id=claim.id,
            job=claim.job,
            step=claim.step,
            attempt=claim.attempt,
            max_attempts=claim.max_attempts,
            scheduled_at=claim.scheduled_at,
            deadline=deadline,
        )
        started = time.perf_counter()
        self._log("started", claim, step)
        metrics.task_started(claim.job, claim.waited)
        try:
            outcome = self._run_step(cx, claim, job, step, timeout)
            event, details = self._record(conn, cx, claim, job, step, outcome, claim_next)
        except psycopg2.Error as exc:
            if not (is_outage(exc) or conn.closed or exc.pgcode in TRANSIENT):
                raise  # our own statement is wrong: a bug, not the task's fault
            # The step's transaction is lost: give the task back once the database takes
            # writes again; until then the slot keeps its lease renewed. A session that
            # died under the step uses the try up, as any crash does (a step that kills
            # its own session every time must not loop for ever); a database that only
            # refused our writes (read-only, in a failover) does not.
            if conn.closed:
                reason, outcome = f"connection lost during step: {exc}", "crashed"
            else:
                reason, outcome = f"the database refused the step's outcome: {exc}", "interrupted"
            reason = clean_text(reason.strip(), MAX_ERROR_CHARS)
            self._orphans.append(Release(claim.token, reason, outcome))
            raise psycopg2.OperationalError(reason) from exc
        duration = time.perf_counter() - started
        self.tally.count(claim.queue, claim.job, event)
        metrics.task_finished(claim.job, step.name if step else "?", event, duration)
        self._log(event, claim, step, duration=duration, **details)

    def _run_step(
        self, cx: Context, claim: Claim, job: Job, step: Step | None, timeout: float
    ) -> To | BaseException:
        """Call the step; what it returned, as a :class:`To`, or what it raised. Only the
        database going away escapes (then no outcome of the try can be written)."""
        failure: BaseException | None = None
        try:
            if step is None:
                raise Fatal(
                    f"job {claim.job!r} has no step {claim.step} (it has {len(job.steps)}): "
                    "were steps removed while tasks were queued?"
                )
            what = f"the input of task {claim.id} of job {claim.job!r}"
            inp = store.decode(claim.input, what)
            with tracing.step_span(
                claim.trace_context, claim.job, step.name, claim.id, claim.attempt
            ):
                result = self.clock.run(step.function, cx, inp, timeout)
        except psycopg2.Error as exc:
            if cx.lost(exc):
                raise
            failure = exc
        except BaseException as exc:  # whatever a step raises fails its try
            failure = exc
        if cx.ended_its_transaction():
            return Fatal(SELF_COMMITTED + (f"; then it failed: {failure}" if failure else ""))
        if failure is None and cx.aborted():
            failure = RuntimeError(ABORTED)
        if failure is not None:
            return failure
        assert step is not None
        return interpret(job, step, result)

    def _record(
        self,
        conn: psycopg2.extensions.connection,
        cx: Context,
        claim: Claim,
        job: Job,
        step: Step | None,
        outcome: To | BaseException,
        claim_next: bool,
    ) -> tuple[str, dict[str, Any]]:
        """Record the try's outcome in the step's transaction and commit."""
        if isinstance(outcome, BaseException):
            return self._fail(conn, cx, claim, step, outcome)
        try:
            return self._finish(conn, cx, claim, job, outcome, claim_next)
        except psycopg2.errors.InvalidSqlStatementName:
            # The step's transaction is lost with the statement: the try fails for good.
            return self._fail(conn, cx, claim, step, Fatal(DEALLOCATED))

    def _last_task_due(self) -> bool:
        """Whether the task now ending is the last this worker may run (``max_tasks``)."""
        return self.max_tasks is not None and self.tasks_run + 1 >= self.max_tasks

    def _finish(
        self,
        conn: psycopg2.extensions.connection,
        cx: Context,
        claim: Claim,
        job: Job,
        outcome: To,
        claim_next: bool = False,
    ) -> tuple[str, dict[str, Any]]:
        """Record the outcome in the step's transaction (if it opened one), claim the next
        task unless told not to or stopping, and commit; returns the event to log."""
        next_token = 0
        if claim_next and not self.stopping and not self._last_task_due():
            next_token = random.getrandbits(63) or 1
            # Posted first: if this process dies now, the supervisor gives both back.
            self.slots.post(self.slot, claim.token, claim.id, cx.deadline or 0.0, next_token)
        done = outcome.kind == "done"
        following = None if done else job.steps[claim.step + 1]
        with conn.cursor() as cur:
            try:
                recorded = store.record_success(
                    cur,
                    claim,
                    next_input=None if done else outcome.value,
                    output=outcome.value if done else None,
                    delay=outcome.wait,
                    max_attempts=following.retry.max_attempts if following else 0,
                    jobs=self.job_names if next_token else [],
                    next_token=next_token,
                    lease=self.lease,
                )
                lost = not recorded.done
                if cx.in_transaction:
                    (store.rollback if lost else store.commit)(cur)
            except psycopg2.Error as exc:
                if next_token and (conn.closed or is_outage(exc)):
                    self._orphans.append(Release(next_token, "connection lost while claiming"))
                raise
            if recorded.next is not None and not (lost and cx.in_transaction):
                self._next = recorded.next
            if not lost and (outcome.wait or claim.serial_queue):
                # Wake idle workers: for the next step later, or the serial queue's next task.
                store.notify(cur)
        if lost:
            return "lost", {"error": LOST}
        if recorded.state == "cancelled":
            return "cancelled", {}
        return ("succeeded" if done else "advanced"), {}

    def _fail(
        self,
        conn: psycopg2.extensions.connection,
        cx: Context,
        claim: Claim,
        step: Step | None,
        exc: BaseException,
    ) -> tuple[str, dict[str, Any]]:
        """Roll back the step's writes, then record the failed (or timed-out) try: retry
        later or give up, as the step's policy says of this error. The task row's
        ``max_attempts`` decides how many tries, as it does for crashes and lost leases."""
        wait = (
            None
            if isinstance(exc, Fatal) or step is None
            else step.retry.retry_after(claim.attempt, claim.max_attempts, exc)
        )
        retry, delay = wait is not None, wait or 0.0
        error, trace = describe(exc)
        with conn.cursor() as cur:
            # Roll back whatever transaction is open: the step's (its writes must not
            # commit), or one it began itself after ending ours.
            if conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                store.rollback(cur)
            state = store.record_failure(
                cur,
                claim,
                retry=retry,
                delay=delay,
                error=error,
                traceback=trace,
                outcome="timed_out" if isinstance(exc, StepTimeout) else "failed",
            )
            if state is None:
                return "lost", {"error": f"{LOST} (the step failed: {error})"}
            if state == "pending" or claim.serial_queue:
                store.notify(cur)
        if state == "pending":
            return "retrying", {"error": error, "delay": delay, "trace": trace}
        if state == "cancelled":
            return "cancelled", {"error": error, "trace": trace}
        return "failed", {"error": error, "trace": trace}

    def give_back_orphans(self) -> None:
        """After a reconnect (or at a stop), release the tasks held when the connection
        broke."""
        assert self.conn is not None
        while self._orphans:
            release = self._orphans[0]
            with self.conn.cursor() as cur:
                released = store.release_claim(cur, release)
            self._orphans.pop(0)
            for task_id, state in released:
                log.warning("gave back task %s (now %s): %s", task_id, state, release.reason)
        self.slots.clear(self.slot)

    def _log(
        self,
        event: str,
        claim: Claim,
        step: Step | None,
        *,
        duration: float | None = None,
        error: str | None = None,
        delay: float | None = None,
        trace: str | None = None,
    ) -> None:
        level = logging.INFO if event in ("started", "succeeded", "advanced") else logging.WARNING
        if not log.isEnabledFor(level):
            return  # two lines per task: skip building them when nobody reads them
        step_name = step.name if step else "?"
        message = "task %s: job=%s task_id=%s step=%s(%s) attempt=%s/%s"
        args: list[Any] = [
            event,
            claim.job,
            claim.id,
            claim.step,
            step_name,
            claim.attempt,
            claim.max_attempts,
        ]
        if duration is not None:
            message += " duration=%.1fms"
            args.append(duration * 1000)
        if delay is not None:
            message += " retry_in=%.2fs"
            args.append(delay)
        if error is not None:
            message += " error=%s"
            args.append(error)
        log.log(
            level,
            message,
            *args,
            extra={
                "event": f"task_{event}",
                "task_id": claim.id,
                "job": claim.job,
                "step": claim.step,
                "step_name": step_name,
                "attempt": claim.attempt,
                "duration_ms": None if duration is None else round(duration * 1000, 3),
                "error": error,
                "error_traceback": trace,
            },
        )
