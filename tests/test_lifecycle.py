"""Task lifecycle against real PostgreSQL: cancellation, dead-letter queues, job keys,
retention, and pausing queues.

Steps (``tests/jobs_lifecycle.py``) write ``lifecycle_effect`` rows through ``cx``, so a row
proves a try committed. Most tests drive a :class:`~underway.worker.Worker` in this process
with ``run_once``; where processes matter (a step running while it is cancelled or its
queue paused, a crash, the supervisor's own retention and lease reclaim, waking idle
workers) a real supervisor runs ``jobs_lifecycle``. Nothing waits by sleeping: steps block
on advisory locks the test holds, and the test polls the database.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from datetime import timedelta

import jobs_lifecycle as jl
import psutil
import psycopg2
import psycopg2.errors
import pytest
from jobs_faults import Gate, holds_for, task_row
from jobs_lifecycle import attempts, effects

from underway import CancelResult, TaskState, admin
from underway.task import cancel_task, task_info

from .faults_common import wait_blocked, wait_idle
from .helpers import Supervisor, in_process_workers, query, scalar, wait_until

#: Jobs an in-process worker may run (never ``lifecycle-crash``: it SIGKILLs its worker, nor
#: ``lifecycle-poll``, which waits for a cancellation).
IN_PROCESS_JOBS = (
    jl.two,
    jl.one,
    jl.dlq,
    jl.no_dlq,
    jl.keyed,
    jl.shared_a,
    jl.shared_b,
    jl.kept,
    jl.single_try,
)

FOURTEEN_DAYS = timedelta(days=14)


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def ldsn(dsn):
    """The test database, with the tables the lifecycle jobs write to."""
    query(dsn, jl.DDL)
    return dsn


@pytest.fixture
def lgate(ldsn):
    """Advisory locks held by the test; a step given ``{"lock": key}`` waits for its key."""
    g = Gate(ldsn)
    yield g
    g.close()


@pytest.fixture
def make_worker(ldsn):
    """In-process workers on this test's database; their connections close afterwards."""
    with in_process_workers(ldsn, IN_PROCESS_JOBS) as make:
        yield make


def supervisor(dsn, *args, workers=1):
    """A supervisor for the lifecycle jobs (no scheduler; idle workers poll every 30 s, so
    anything that happens quickly was woken by a notification)."""
    return Supervisor(
        ["jobs_lifecycle"],
        dsn,
        ["--workers", str(workers), "--poll-interval", "30", "--no-scheduler", *args],
    )


def run_all(worker, dsn, *, due=True):
    """Run tasks until none is ready; with ``due``, make retries and delayed steps due at
    once (instead of waiting for them) and go on. Returns the number of steps run."""
    ran = 0
    while True:
        while worker.run_once():
            ran += 1
        if not due:
            return ran
        # Moved well into the past, so a task moved once is not moved again.
        moved = query(
            dsn,
            "UPDATE underway.task SET run_at = now() - interval '1 hour'"
            " WHERE state = 'pending' AND job = ANY(%s) AND run_at > now() - interval '1 hour'"
            " AND coalesce(queue, job) NOT IN (SELECT queue FROM underway.paused_queue)"
            " RETURNING id",
            (worker.job_names,),
        )
        if not moved:
            return ran


def state(dsn, task_id):
    return scalar(dsn, "SELECT state::text FROM underway.task WHERE id = %s", (task_id,))


def flag(dsn, name="deliver", on=True):
    """Raise (or lower) a flag that makes ``lifecycle-dlq``'s second step fail."""
    if on:
        query(dsn, "INSERT INTO lifecycle_flag VALUES (%s) ON CONFLICT DO NOTHING", (name,))
    else:
        query(dsn, "DELETE FROM lifecycle_flag WHERE name = %s", (name,))


def wait_state(dsn, task_id, wanted, timeout=10.0, sup=None):
    wait_until(
        lambda: state(dsn, task_id) == wanted,
        timeout=timeout,
        message=f"task {task_id} {wanted}: {sup!r}",
    )


def keyed_rows(dsn, key):
    """(id, state, key) of the lifecycle-keyed tasks that hold ``key``, or held it."""
    return query(
        dsn,
        "SELECT id, state::text, input FROM underway.task"
        " WHERE job = 'lifecycle-keyed' AND key = %s ORDER BY id",
        (key,),
    )


# == cancellation ===========================================================================


@pytest.mark.timeout(30)
def test_cancel_pending_and_delayed_tasks_they_never_run(ldsn, make_worker):
    """Cancelling a pending task and a delayed one: cancel() says "cancelled", then
    "finished"; both are 'cancelled' with finished_at (and retention) set, and no worker
    ever runs them, not even once they are due."""
    w = make_worker()
    ready = jl.one.enqueue({"n": 1})
    later = jl.one.enqueue({"n": 2}, delay=timedelta(hours=1))

    assert ready.cancel() is CancelResult.CANCELLED
    assert later.cancel() == "cancelled"
    assert ready.cancel() is CancelResult.FINISHED
    assert later.cancel() == "finished"

    for task in (ready, later):
        assert task.status() is TaskState.CANCELLED
        row = task_row(ldsn, task.id)
        assert row["finished_at"] is not None
        assert row["cancel_requested_at"] is not None
        assert row["expires_at"] == row["finished_at"] + FOURTEEN_DAYS
    query(ldsn, "UPDATE underway.task SET run_at = now() - interval '1 minute'")
    assert w.run_once() is False
    assert effects(ldsn, ready.id) == effects(ldsn, later.id) == []
    assert attempts(ldsn, ready.id) == attempts(ldsn, later.id) == []


@pytest.mark.timeout(30)
def test_cancel_in_a_rolled_back_transaction_changes_nothing(ldsn, make_worker):
    """cancel(conn=...) joins the caller's transaction: rolled back, the task is still
    pending and runs."""
    task = jl.one.enqueue({"n": 1})
    conn = psycopg2.connect(ldsn)
    try:
        assert task.cancel(conn=conn) is CancelResult.CANCELLED
        assert task.status(conn=conn) is TaskState.CANCELLED  # seen inside the transaction
        conn.rollback()
    finally:
        conn.close()
    assert task.status() is TaskState.PENDING
    assert make_worker().run_once() is True
    assert task.status() is TaskState.SUCCEEDED


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_cancel_running_task_finishes_its_step_and_goes_no_further(ldsn, lgate):
    """A real worker is inside step 0 (blocked on the gate) when the task is cancelled:
    cancel() says "requested" (also when repeated); the step finishes and its write commits,
    but step 1 never runs and the task ends 'cancelled' with finished_at set."""
    key = lgate.hold(9101)
    task = jl.two.enqueue({"lock": key})
    with supervisor(ldsn) as sup:
        wait_blocked(ldsn, key)
        assert task.status() is TaskState.RUNNING
        assert task.cancel() is CancelResult.REQUESTED
        first_request = task_row(ldsn, task.id)["cancel_requested_at"]
        assert task.cancel() is CancelResult.REQUESTED
        assert task_row(ldsn, task.id)["cancel_requested_at"] == first_request
        info = task_info(task.id)
        assert info.state is TaskState.RUNNING and info.cancel_requested
        lgate.release(key)
        wait_state(ldsn, task.id, "cancelled", sup=sup)
        assert f"task cancelled: job=lifecycle-two task_id={task.id}" in sup.wait_for_output(
            "task cancelled"
        )
    assert effects(ldsn, task.id) == [(0, 1, "first")]
    assert attempts(ldsn, task.id) == [(0, 1, "succeeded")]
    row = task_row(ldsn, task.id)
    assert row["finished_at"] is not None
    assert row["expires_at"] == row["finished_at"] + FOURTEEN_DAYS
    assert task.cancel() is CancelResult.FINISHED


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_step_polling_cx_cancelled_stops_early(ldsn):
    """A long step polling cx.cancelled (inside its open transaction) sees the cancellation
    and returns at once; what it wrote commits; its next step never runs."""
    task = jl.poll.enqueue({"n": 1})
    with supervisor(ldsn) as sup:
        wait_state(ldsn, task.id, "running", sup=sup)
        assert task.cancel() is CancelResult.REQUESTED
        wait_state(ldsn, task.id, "cancelled", sup=sup)
    assert effects(ldsn, task.id) == [(0, 1, "polling"), (0, 1, "stopped early")]
    assert attempts(ldsn, task.id) == [(0, 1, "succeeded")]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_cancel_during_a_failing_step_is_not_retried(ldsn, lgate):
    """A step that will fail (retries left, backoff 10 ms) is cancelled while it runs: the
    failed try is recorded, and the task is 'cancelled' instead of retried."""
    key = lgate.hold(9102)
    task = jl.fail_block.enqueue({"lock": key})
    with supervisor(ldsn) as sup:
        wait_blocked(ldsn, key)
        assert task.cancel() is CancelResult.REQUESTED
        lgate.release(key)
        wait_state(ldsn, task.id, "cancelled", sup=sup)
        # A retry would be due 10 ms later and start at once; the worker is idle instead.
        wait_idle(ldsn, 1)
    assert attempts(ldsn, task.id) == [(0, 1, "failed")]
    row = task_row(ldsn, task.id)
    assert row["attempts"] == 1
    assert row["error"] == "RuntimeError: failing try 1"
    assert row["finished_at"] is not None


@pytest.mark.timeout(30)
def test_cancel_of_a_finished_task_is_false_and_changes_nothing(ldsn, make_worker):
    """Succeeded, failed (no dead-letter queue) and already-cancelled tasks: cancel() says
    "finished" and the row is unchanged (no cancel_requested_at either); cancelling an id
    that does not exist raises LookupError."""
    w = make_worker()
    done = jl.one.enqueue({"n": 1})
    failed = jl.no_dlq.enqueue({"n": 2})
    cancelled = jl.one.enqueue({"n": 3})
    assert cancelled.cancel() is CancelResult.CANCELLED
    run_all(w, ldsn)
    assert [t.status() for t in (done, failed, cancelled)] == ["succeeded", "failed", "cancelled"]

    before = {t.id: task_row(ldsn, t.id) for t in (done, failed, cancelled)}
    for task in (done, failed, cancelled):
        assert task.cancel() is CancelResult.FINISHED
        assert cancel_task(task.id) is CancelResult.FINISHED
        assert task_row(ldsn, task.id) == before[task.id]
    assert before[done.id]["cancel_requested_at"] is None
    with pytest.raises(LookupError):
        cancel_task(10**12)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_cancel_racing_claims_never_half_runs_a_task(ldsn):
    """1000 one-step tasks are cancelled, in random order, while two workers drain them.
    Every task ends either 'succeeded' (its step committed exactly once, one try) or
    'cancelled' (its step never ran, no try). cancel() told the truth each time: a
    "cancelled" task never ran; one cancelled while its only step ran ("requested") or
    after it ("finished") ended succeeded."""
    with supervisor(ldsn, workers=2) as sup:
        wait_idle(ldsn, 2)
        tasks = jl.one.enqueue_many([{"n": n} for n in range(1000)])
        order = list(tasks)
        random.Random(7).shuffle(order)
        said = {t.id: t.cancel() for t in order}
        wait_until(
            lambda: (
                scalar(
                    ldsn, "SELECT count(*) FROM underway.task WHERE state IN ('pending', 'running')"
                )
                == 0
            ),
            timeout=30,
            message=f"all tasks finished: {sup!r}",
        )
    rows = query(
        ldsn,
        """
        SELECT t.id, t.state::text,
               (SELECT count(*) FROM lifecycle_effect e WHERE e.task_id = t.id),
               (SELECT count(*) FROM underway.attempt a WHERE a.task_id = t.id)
        FROM underway.task t ORDER BY t.id
        """,
    )
    assert len(rows) == 1000
    outcome = {"succeeded": 0, "cancelled": 0}
    for task_id, st, ran, tries in rows:
        assert st in outcome, (task_id, st)
        outcome[st] += 1
        if st == "succeeded":
            assert (ran, tries) == (1, 1), (task_id, ran, tries)
        else:
            assert (ran, tries) == (0, 0), (task_id, ran, tries)
        assert (said[task_id] is CancelResult.CANCELLED) == (st == "cancelled"), task_id
    print(f"\ncancel race: {outcome}, cancel() said {Counter(said.values())}")


@pytest.mark.timeout(30)
def test_status_is_none_once_the_row_is_deleted(ldsn, make_worker):
    """Task.status() and task_info() return None once retention has deleted the task."""
    task = jl.one.enqueue({"n": 1})
    assert make_worker().run_once() is True
    assert task.status() is TaskState.SUCCEEDED
    query(ldsn, "UPDATE underway.task SET expires_at = now() - interval '1 s'")
    assert admin.purge_expired() == 1
    assert task.status() is None
    assert task_info(task.id) is None


# == dead-letter queues =====================================================================


@pytest.mark.timeout(30)
def test_failing_task_lands_in_its_dead_letter_queue_with_its_history(ldsn, make_worker):
    """Step 1 of a job with a dead-letter queue fails all of its 3 tries: the task is 'failed'
    at step 1 in the queue (never expiring), listed by admin.dead_letters with its input,
    tries and last error; every try is in underway.attempt."""
    flag(ldsn)
    task = jl.dlq.enqueue({"n": 1})
    run_all(make_worker(), ldsn)

    row = task_row(ldsn, task.id)
    assert (row["state"], row["step"], row["attempts"]) == ("failed", 1, 3)
    assert row["dead_letter_queue"] == jl.DEAD
    assert row["finished_at"] is not None and row["expires_at"] is None
    assert attempts(ldsn, task.id) == [
        (0, 1, "succeeded"),
        (1, 1, "failed"),
        (1, 2, "failed"),
        (1, 3, "failed"),
    ]
    [letter] = admin.dead_letters(jl.DEAD)
    assert (letter.id, letter.job, letter.step, letter.input, letter.attempts) == (
        task.id,
        "lifecycle-dlq",
        1,
        {"n": 1},
        3,
    )
    assert letter.error == "RuntimeError: cannot deliver yet (try 3)"
    assert letter.finished_at == row["finished_at"]
    assert admin.dead_letters("lifecycle-dlq") == []  # the job's queue is not its DLQ


@pytest.mark.timeout(30)
def test_fatal_goes_to_the_dead_letter_queue_at_once(ldsn, make_worker):
    """Fatal skips the remaining tries: one failed try, then the dead-letter queue."""
    flag(ldsn)
    task = jl.dlq.enqueue({"n": 1, "fatal": True})
    run_all(make_worker(), ldsn)
    assert attempts(ldsn, task.id) == [(0, 1, "succeeded"), (1, 1, "failed")]
    assert [d.id for d in admin.dead_letters(jl.DEAD)] == [task.id]
    assert admin.dead_letters(jl.DEAD)[0].error == "Fatal: cannot deliver, ever"


@pytest.mark.timeout(30)
def test_job_without_dead_letter_queue_just_fails_and_expires(ldsn, make_worker):
    """Without a dead-letter queue, a task failing for good is 'failed', in no dead-letter
    queue, and expires on the default retention (14 days after it finished)."""
    task = jl.no_dlq.enqueue({"n": 1})
    run_all(make_worker(), ldsn)
    row = task_row(ldsn, task.id)
    assert (row["state"], row["attempts"], row["dead_letter_queue"]) == ("failed", 3, None)
    assert row["expires_at"] == row["finished_at"] + FOURTEEN_DAYS
    assert admin.dead_letters(jl.DEAD) == []
    assert admin.redrive(jl.DEAD) == []
    assert task.status() is TaskState.FAILED


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(60)
def test_worker_killed_on_the_last_try_dead_letters_the_task(ldsn):
    """A task enqueued from SQL (underway.enqueue, taking the defaults the supervisor
    registered: 2 tries, dead-letter queue) fails its first try and SIGKILLs its worker on
    the last: the supervisor gives it back as crashed and it lands in the dead-letter queue,
    never expiring."""
    with supervisor(ldsn) as sup:
        wait_until(
            lambda: scalar(ldsn, "SELECT 1 FROM underway.job WHERE name = 'lifecycle-crash'"),
            message=f"jobs registered: {sup!r}",
        )
        task_id = scalar(ldsn, "SELECT underway.enqueue('lifecycle-crash', '{}')")
        wait_state(ldsn, task_id, "failed", timeout=20, sup=sup)
    row = task_row(ldsn, task_id)
    assert (row["dead_letter_queue"], row["max_attempts"], row["attempts"]) == (jl.DEAD, 2, 2)
    assert row["expires_at"] is None
    assert attempts(ldsn, task_id) == [(0, 1, "failed"), (0, 2, "crashed")]
    assert [d.id for d in admin.dead_letters(jl.DEAD)] == [task_id]


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(60)
def test_lease_lapsing_on_the_last_try_dead_letters_the_task(ldsn, make_worker):
    """A worker claims the only try of a task and stops renewing it (its lease is moved into
    the past): a supervisor reclaims it as 'lost' and, with no try left, it lands in the
    dead-letter queue; the stale worker's step can then commit nothing."""
    w = make_worker(jl.single_try)
    task = jl.single_try.enqueue({"n": 1})
    claim = w.claim()
    assert claim is not None and claim.id == task.id
    query(ldsn, "UPDATE underway.task SET lease_expires_at = now() - interval '1 s'")
    with supervisor(ldsn, "--lease", "3") as sup:  # maintenance every second
        wait_state(ldsn, task.id, "failed", sup=sup)
    row = task_row(ldsn, task.id)
    assert (row["dead_letter_queue"], row["expires_at"]) == (jl.DEAD, None)
    assert attempts(ldsn, task.id) == [(0, 1, "lost")]
    assert [d.id for d in admin.dead_letters(jl.DEAD)] == [task.id]
    w.execute(claim)  # fenced out
    assert effects(ldsn, task.id) == []
    assert task_row(ldsn, task.id)["state"] == "failed"


@pytest.mark.timeout(30)
def test_dead_letters_are_never_purged(ldsn, make_worker):
    """Retention deletes an expired failed task without a dead-letter queue, but not a dead
    letter, however long ago it failed."""
    flag(ldsn)
    letter = jl.dlq.enqueue({"n": 1, "fatal": True})
    plain = jl.no_dlq.enqueue({"n": 2})
    run_all(make_worker(), ldsn)
    query(
        ldsn,
        "UPDATE underway.task SET finished_at = now() - interval '400 days',"
        " expires_at = CASE WHEN expires_at IS NULL THEN NULL ELSE now() - interval '1 s' END",
    )
    assert admin.purge_expired() == 1
    assert state(ldsn, plain.id) is None
    assert state(ldsn, letter.id) == "failed"
    assert [d.id for d in admin.dead_letters(jl.DEAD)] == [letter.id]


@pytest.mark.timeout(30)
def test_redrive_by_id_and_all_resumes_at_the_failed_step_with_tries_renewed(ldsn, make_worker):
    """Three tasks fail into the dead-letter queue at step 1. redrive(q, ids=[b]) puts back
    only b: pending at step 1, tries at 0, error cleared, history kept; with the failure
    still there it gets all 3 tries again and returns to the queue. Once the cause is gone,
    redrive(q) puts back the rest; each succeeds without running step 0 again, and its
    history shows every try."""
    w = make_worker()
    flag(ldsn)
    a, b, c = (jl.dlq.enqueue({"n": n}) for n in range(3))
    run_all(w, ldsn)
    assert [d.id for d in admin.dead_letters(jl.DEAD)] == [a.id, b.id, c.id]
    failed_3 = [(0, 1, "succeeded"), (1, 1, "failed"), (1, 2, "failed"), (1, 3, "failed")]

    assert admin.redrive(jl.DEAD, ids=[b.id]) == [b.id]
    row = task_row(ldsn, b.id)
    assert (row["state"], row["step"], row["attempts"], row["error"]) == ("pending", 1, 0, None)
    assert row["finished_at"] is None and row["expires_at"] is None
    assert attempts(ldsn, b.id) == failed_3
    assert [d.id for d in admin.dead_letters(jl.DEAD)] == [a.id, c.id]

    run_all(w, ldsn)  # the step still fails: three new tries, back in the queue
    assert attempts(ldsn, b.id) == [*failed_3, (1, 1, "failed"), (1, 2, "failed"), (1, 3, "failed")]
    assert [d.id for d in admin.dead_letters(jl.DEAD)] == [a.id, b.id, c.id]

    flag(ldsn, on=False)
    assert admin.redrive(jl.DEAD) == [a.id, b.id, c.id]
    assert admin.dead_letters(jl.DEAD) == []
    run_all(w, ldsn)
    for task in (a, b, c):
        assert task.status() is TaskState.SUCCEEDED
        assert effects(ldsn, task.id) == [(0, 1, "prepare"), (1, 1, "deliver")]
        assert attempts(ldsn, task.id)[-1] == (1, 1, "succeeded")
        row = task_row(ldsn, task.id)
        assert row["expires_at"] == row["finished_at"] + FOURTEEN_DAYS
    assert attempts(ldsn, a.id) == [*failed_3, (1, 1, "succeeded")]
    assert admin.redrive(jl.DEAD) == []


@pytest.mark.timeout(30)
def test_redrive_ignores_other_queues_and_tasks_not_dead_lettered(ldsn, make_worker):
    """redrive touches only failed tasks of the queue named: ids of pending, succeeded or
    plainly failed tasks, or of another dead-letter queue, are left alone."""
    flag(ldsn)
    letter = jl.dlq.enqueue({"n": 1, "fatal": True})
    plain = jl.no_dlq.enqueue({"n": 2})
    done = jl.one.enqueue({"n": 3})
    run_all(make_worker(), ldsn)
    waiting = jl.one.enqueue({"n": 4})
    ids = [letter.id, plain.id, done.id, waiting.id]
    assert admin.redrive("lifecycle-other-dead", ids=ids) == []
    assert admin.redrive(jl.DEAD, ids=[plain.id, done.id, waiting.id]) == []
    assert [t.status() for t in (letter, plain, done, waiting)] == [
        "failed",
        "failed",
        "succeeded",
        "pending",
    ]
    assert admin.redrive(jl.DEAD, ids=ids) == [letter.id]


@pytest.mark.timeout(30)
def test_redrive_of_a_dead_letter_cancelled_during_its_last_try_runs_it(ldsn, make_worker):
    """A task is cancelled while its last try fails: it lands in the dead-letter queue
    (failed, not cancelled). An operator's redrive of it reports the task re-driven, so it
    must be back to work (pending) and then run."""
    w = make_worker()
    flag(ldsn)
    task = jl.dlq.enqueue({"n": 1})
    for _ in range(3):  # step 0, then 2 failed tries of step 1
        query(ldsn, "UPDATE underway.task SET run_at = now() - interval '1 s'")
        assert w.run_once() is True
    query(ldsn, "UPDATE underway.task SET run_at = now() - interval '1 s'")
    claim = w.claim()  # the last try of step 1
    assert claim is not None and claim.attempt == 3
    assert task.cancel() is CancelResult.REQUESTED
    w.execute(claim)
    assert [d.id for d in admin.dead_letters(jl.DEAD)] == [task.id]

    flag(ldsn, on=False)
    assert admin.redrive(jl.DEAD) == [task.id]
    assert task.status() is TaskState.PENDING
    run_all(w, ldsn)
    assert task.status() is TaskState.SUCCEEDED


# == job keys ===============================================================================


def run_at(dsn, task_id):
    return scalar(dsn, "SELECT run_at FROM underway.task WHERE id = %s", (task_id,))


def due_in(dsn, task_id):
    return scalar(
        dsn,
        "SELECT extract(epoch FROM run_at - now())::float8 FROM underway.task WHERE id = %s",
        (task_id,),
    )


@pytest.mark.timeout(30)
def test_key_replace_updates_the_pending_task(ldsn):
    """key_mode='replace' (the default): the pending task holding the key takes the new
    input, run time and priority; the same task is returned; one row."""
    old = jl.keyed.enqueue({"v": 1}, key="k", delay=3600, priority=1)
    new = jl.keyed.enqueue({"v": 2}, key="k", priority=5)
    assert new == old
    [(task_id, st, inp)] = keyed_rows(ldsn, "k")
    assert (task_id, st, inp) == (old.id, "pending", {"v": 2})
    assert task_row(ldsn, old.id)["priority"] == 5
    assert due_in(ldsn, old.id) <= 0.01


@pytest.mark.timeout(30)
def test_key_preserve_run_at_updates_input_keeps_run_time(ldsn):
    """key_mode='preserve_run_at': the pending task takes the new input, keeps its run time."""
    old = jl.keyed.enqueue({"v": 1}, key="k", delay=3600)
    when = run_at(ldsn, old.id)
    new = jl.keyed.enqueue({"v": 2}, key="k", key_mode="preserve_run_at")
    assert new == old
    assert keyed_rows(ldsn, "k") == [(old.id, "pending", {"v": 2})]
    assert run_at(ldsn, old.id) == when


@pytest.mark.timeout(30)
def test_key_keep_leaves_the_pending_task_alone(ldsn):
    """key_mode='keep': the pending task is returned unchanged (input, run time, priority)."""
    old = jl.keyed.enqueue({"v": 1}, key="k", delay=3600, priority=1)
    before = task_row(ldsn, old.id)
    new = jl.keyed.enqueue({"v": 2}, key="k", key_mode="keep", priority=9)
    assert new == old
    assert task_row(ldsn, old.id) == before
    assert len(keyed_rows(ldsn, "k")) == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["replace", "preserve_run_at", "keep"])
def test_key_held_by_a_running_task(ldsn, make_worker, mode):
    """A running task holds the key. replace/preserve_run_at: a new task takes the key, the
    running one gives it up, and both run to the end with their own inputs. keep: the
    enqueue does nothing and returns the running task."""
    w = make_worker()
    running = jl.keyed.enqueue({"v": 1}, key="k")
    claim = w.claim()
    assert claim is not None and claim.id == running.id
    new = jl.keyed.enqueue({"v": 2}, key="k", key_mode=mode)
    if mode == "keep":
        assert new == running
        assert keyed_rows(ldsn, "k") == [(running.id, "running", {"v": 1})]
    else:
        assert new != running
        assert keyed_rows(ldsn, "k") == [(new.id, "pending", {"v": 2})]
        assert task_row(ldsn, running.id)["key"] is None
    w.execute(claim)
    run_all(w, ldsn)
    assert running.status() is TaskState.SUCCEEDED
    assert effects(ldsn, running.id) == [(0, 1, "keyed-first"), (1, 1, "keyed-second")]
    if mode != "keep":
        assert new.status() is TaskState.SUCCEEDED
        assert [e[2] for e in effects(ldsn, new.id)] == ["keyed-first", "keyed-second"]
        assert query(
            ldsn,
            "SELECT input FROM lifecycle_effect WHERE task_id = %s AND step = 0",
            (new.id,),
        ) == [({"v": 2},)]
    assert scalar(ldsn, "SELECT count(*) FROM underway.task") == (1 if mode == "keep" else 2)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["replace", "preserve_run_at", "keep"])
def test_a_holder_being_cancelled_gives_its_key_up_in_every_mode(ldsn, make_worker, mode):
    """A running holder whose cancellation was asked for will not do the work: an enqueue of
    its key, in any mode (keep included), makes a new task that holds the key and runs."""
    w = make_worker()
    running = jl.keyed.enqueue({"v": 1}, key="k")
    claim = w.claim()
    assert claim is not None and claim.id == running.id
    assert running.cancel()
    new = jl.keyed.enqueue({"v": 2}, key="k", key_mode=mode)
    assert new != running
    assert keyed_rows(ldsn, "k") == [(new.id, "pending", {"v": 2})]
    w.execute(claim)
    run_all(w, ldsn)
    assert running.status() is TaskState.CANCELLED
    assert new.status() is TaskState.SUCCEEDED


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ending", ["succeeded", "cancelled", "failed"])
def test_key_is_free_again_once_its_task_finished(ldsn, make_worker, ending):
    """After the task holding a key succeeded, was cancelled or failed, enqueueing the key
    (even with 'keep') makes a new task."""
    w = make_worker()
    first = jl.keyed.enqueue({"v": 1}, key="k")
    if ending == "succeeded":
        run_all(w, ldsn)
    elif ending == "cancelled":
        assert first.cancel() is CancelResult.CANCELLED
    else:
        query(ldsn, "UPDATE underway.task SET state = 'failed' WHERE id = %s", (first.id,))
    assert first.status() == ending
    again = jl.keyed.enqueue({"v": 2}, key="k", key_mode="keep")
    assert again != first
    assert again.status() is TaskState.PENDING
    assert [r[0] for r in keyed_rows(ldsn, "k")] == [first.id, again.id]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["replace", "preserve_run_at", "keep"])
def test_keyed_enqueue_never_rewrites_a_task_waiting_between_steps(ldsn, make_worker, mode):
    """A keyed task ran step 0, which returned To.delay(1 h, its output): it is pending at
    step 1, under way. Enqueueing the same key again must not hand step 1 the new job input
    or move its run time: step 1 receives the output of step 0. As for a running holder,
    replace/preserve_run_at make a new task that takes the key and runs with the new input;
    keep does nothing and returns the task under way."""
    w = make_worker()
    task = jl.keyed.enqueue({"wait": True}, key="k")
    assert w.run_once() is True
    row = task_row(ldsn, task.id)
    assert (row["state"], row["step"]) == ("pending", 1)
    step1_input = row["input"]
    assert step1_input == {"stage": "second", "from": {"wait": True}}

    new = jl.keyed.enqueue({"v": 2}, key="k", key_mode=mode)
    after = task_row(ldsn, task.id)
    assert (after["input"], after["run_at"]) == (step1_input, row["run_at"])
    if mode == "keep":
        assert new == task
        assert after["key"] == "k"
    else:
        assert new != task
        assert keyed_rows(ldsn, "k") == [(new.id, "pending", {"v": 2})]
        assert after["key"] is None
    run_all(w, ldsn)
    assert query(
        ldsn,
        "SELECT input FROM lifecycle_effect WHERE task_id = %s AND step = 1",
        (task.id,),
    ) == [(step1_input,)]
    if mode != "keep":
        assert new.status() is TaskState.SUCCEEDED
        assert query(
            ldsn,
            "SELECT input FROM lifecycle_effect WHERE task_id = %s AND step = 0",
            (new.id,),
        ) == [({"v": 2},)]


RACE_APP = "lifecycle-key-race"


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("holder", ["none", "running"])
@pytest.mark.parametrize("mode", ["replace", "preserve_run_at", "keep"])
def test_concurrent_keyed_enqueues_leave_exactly_one_task(ldsn, lgate, make_worker, mode, holder):
    """Eight threads, each on its own connection, enqueue the same key at once, each in a
    transaction that stays open until every one of the eight is in flight (blocked on the
    test's gate or on another's uncommitted row). Afterwards exactly one pending task holds
    the key and every enqueue returned it; with a running holder, 'keep' makes no task at
    all and returns the holder, the other modes take the key from it."""
    holder_task = None
    if holder == "running":
        holder_task = jl.keyed.enqueue({"holder": True}, key="race")
        claim = make_worker().claim()
        assert claim is not None and claim.id == holder_task.id
    key = lgate.hold(9200)
    barrier = threading.Barrier(8)
    results: dict[int, object] = {}

    def enqueue(n):
        conn = psycopg2.connect(ldsn, application_name=RACE_APP)
        try:
            barrier.wait(10)
            task = jl.keyed.enqueue({"thread": n}, key="race", key_mode=mode, conn=conn)
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (key,))
            conn.commit()
            results[n] = task.id
        except Exception as exc:
            results[n] = exc
        finally:
            conn.close()

    threads = [threading.Thread(target=enqueue, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: (
                scalar(
                    ldsn,
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = %s AND wait_event_type = 'Lock'",
                    (RACE_APP,),
                )
                == 8
            ),
            message="all eight enqueues in flight and waiting",
        )
    finally:
        lgate.release(key)
        for t in threads:
            t.join(20)
    assert all(isinstance(v, int) for v in results.values()), results
    assert len(results) == 8
    holders = query(
        ldsn,
        "SELECT id, state::text FROM underway.task"
        " WHERE key = 'race' AND state IN ('pending', 'running')",
    )
    assert len(holders) == 1, holders
    [(holder_id, holder_state)] = holders
    assert set(results.values()) == {holder_id}
    total = scalar(ldsn, "SELECT count(*) FROM underway.task")
    if holder_task is not None and mode == "keep":
        assert (holder_id, holder_state, total) == (holder_task.id, "running", 1)
    else:
        assert holder_state == "pending"
        assert total == (1 if holder_task is None else 2)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("before", ["none", "pending", "running"])
def test_keyed_enqueue_in_a_rolled_back_transaction_writes_nothing(ldsn, make_worker, before):
    """A keyed enqueue (replace) in the caller's transaction, rolled back: no new task, the
    pending task's input is unchanged, a running holder keeps its key."""
    existing = None
    if before != "none":
        existing = jl.keyed.enqueue({"v": 1}, key="k", delay=3600)
        if before == "running":
            query(ldsn, "UPDATE underway.task SET run_at = now()")
            assert make_worker().claim() is not None
    snapshot = query(ldsn, "SELECT * FROM underway.task ORDER BY id")
    conn = psycopg2.connect(ldsn)
    try:
        jl.keyed.enqueue({"v": 2}, key="k", conn=conn)
        conn.rollback()
    finally:
        conn.close()
    assert query(ldsn, "SELECT * FROM underway.task ORDER BY id") == snapshot
    if existing is not None:
        assert task_row(ldsn, existing.id)["key"] == "k"


@pytest.mark.timeout(30)
def test_bad_keys_and_key_modes_are_refused_clearly(ldsn):
    """An empty or non-string key is a TypeError, an unknown key_mode a ValueError listing
    the modes, each naming the job; nothing is written. SQL underway.enqueue refuses an
    unknown key_mode too."""
    with pytest.raises(TypeError, match=r"job 'lifecycle-keyed': key must be a non-empty string"):
        jl.keyed.enqueue({"v": 1}, key="")
    with pytest.raises(TypeError, match="key must be a non-empty string, not 42"):
        jl.keyed.enqueue({"v": 1}, key=42)
    with pytest.raises(
        ValueError, match=r"key_mode must be one of replace, preserve_run_at, keep, not 'bogus'"
    ):
        jl.keyed.enqueue({"v": 1}, key="k", key_mode="bogus")
    with pytest.raises(
        psycopg2.errors.InvalidParameterValue, match="key_mode must be replace, preserve_run_at"
    ):
        query(ldsn, "SELECT underway.enqueue('lifecycle-keyed', '{}', key => 'k', key_mode => 'x')")
    assert scalar(ldsn, "SELECT count(*) FROM underway.task") == 0


# == retention ==============================================================================


def expiry(dsn, task_id):
    """(expires_at - finished_at) of a task, or None without an expiry."""
    return scalar(
        dsn, "SELECT expires_at - finished_at FROM underway.task WHERE id = %s", (task_id,)
    )


@pytest.mark.timeout(30)
def test_finished_tasks_expire_keep_for_after_they_finished(ldsn, make_worker):
    """expires_at = finished_at + keep_for for succeeded, failed (no dead-letter queue) and
    cancelled tasks, with the job's keep_for (1 h) or the default 14 days; pending, running
    and dead-lettered tasks have none."""
    w = make_worker()
    flag(ldsn)
    kept_ok = jl.kept.enqueue({"n": 1})
    kept_failed = jl.kept.enqueue({"fail": True})
    default_ok = jl.one.enqueue({"n": 2})
    default_failed = jl.no_dlq.enqueue({"n": 3})
    cancelled = jl.kept.enqueue({"n": 4}, delay=3600)
    assert cancelled.cancel() is CancelResult.CANCELLED
    letter = jl.dlq.enqueue({"n": 5, "fatal": True})
    run_all(w, ldsn)
    pending = jl.one.enqueue({"n": 6})
    running = jl.one.enqueue({"n": 7})
    query(ldsn, "UPDATE underway.task SET priority = 1 WHERE id = %s", (running.id,))
    assert w.claim().id == running.id

    hour = timedelta(hours=1)
    assert [t.status() for t in (kept_ok, kept_failed, default_ok, default_failed)] == [
        "succeeded",
        "failed",
        "succeeded",
        "failed",
    ]
    assert expiry(ldsn, kept_ok.id) == hour
    assert expiry(ldsn, kept_failed.id) == hour
    assert expiry(ldsn, cancelled.id) == hour
    assert expiry(ldsn, default_ok.id) == FOURTEEN_DAYS
    assert expiry(ldsn, default_failed.id) == FOURTEEN_DAYS
    for task in (letter, pending, running):
        assert task_row(ldsn, task.id)["expires_at"] is None, task


@pytest.mark.timeout(30)
def test_purge_deletes_only_expired_tasks_with_their_attempts_in_batches(ldsn, make_worker):
    """purge_expired(batch=2) deletes the 5 expired tasks and their attempts in 3
    transactions (2 + 2 + 1, seen by a test trigger recording each deletion's transaction
    id); tasks not yet expired, pending, running and dead-lettered ones stay with their
    attempts. max_batches=1 stops after one batch."""
    query(
        ldsn,
        """
        CREATE TABLE purge_log (txid bigint, task_id bigint);
        CREATE FUNCTION log_purge() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO purge_log VALUES (txid_current(), OLD.id); RETURN OLD; END $$;
        CREATE TRIGGER log_purge BEFORE DELETE ON underway.task
            FOR EACH ROW EXECUTE FUNCTION log_purge();
        """,
    )
    w = make_worker()
    flag(ldsn)
    expired = jl.one.enqueue_many([{"n": n} for n in range(5)])
    fresh = jl.one.enqueue_many([{"n": n} for n in range(2)])
    letter = jl.dlq.enqueue({"n": 9, "fatal": True})
    run_all(w, ldsn)
    pending = jl.one.enqueue({"n": 10}, delay=3600)
    running = jl.one.enqueue({"n": 11})
    assert w.claim().id == running.id
    query(
        ldsn,
        "UPDATE underway.task SET expires_at = now() - interval '1 s' WHERE id = ANY(%s)",
        ([t.id for t in expired],),
    )
    kept_ids = [t.id for t in (*fresh, letter, pending, running)]
    kept_attempts = scalar(
        ldsn, "SELECT count(*) FROM underway.attempt WHERE task_id = ANY(%s)", (kept_ids,)
    )

    assert admin.purge_expired(batch=2) == 5
    assert query(ldsn, "SELECT id FROM underway.task ORDER BY id") == [(i,) for i in kept_ids]
    assert scalar(ldsn, "SELECT count(*) FROM underway.attempt") == kept_attempts
    batches = query(ldsn, "SELECT count(*) FROM purge_log GROUP BY txid ORDER BY 1 DESC")
    assert batches == [(2,), (2,), (1,)]
    assert admin.purge_expired(batch=2) == 0

    query(ldsn, "UPDATE underway.task SET expires_at = now() WHERE id = ANY(%s)", (kept_ids[:2],))
    assert admin.purge_expired(batch=1, max_batches=1) == 1
    assert admin.purge_expired(batch=1) == 1


@pytest.mark.timeout(30)
def test_purge_skips_rows_locked_by_another_transaction(ldsn, make_worker):
    """An expired task locked by another open transaction is skipped, not waited for: purge
    returns at once (its session would give up after a 5 s lock_timeout) having deleted the
    others; the locked one goes once the lock is gone."""
    tasks = jl.one.enqueue_many([{"n": n} for n in range(3)])
    run_all(make_worker(), ldsn)
    query(ldsn, "UPDATE underway.task SET expires_at = now() - interval '1 s'")
    locker = psycopg2.connect(ldsn)
    purger = psycopg2.connect(ldsn)
    purger.autocommit = True
    try:
        with locker.cursor() as cur:
            cur.execute("SELECT 1 FROM underway.task WHERE id = %s FOR UPDATE", (tasks[1].id,))
        with purger.cursor() as cur:
            cur.execute("SET lock_timeout = '5s'")
        started = time.monotonic()
        assert admin.purge_expired(conn=purger) == 2
        assert time.monotonic() - started < 4
        assert [t.status() for t in tasks] == [None, "succeeded", None]
        locker.commit()
        assert admin.purge_expired(conn=purger) == 1
    finally:
        locker.close()
        purger.close()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_supervisor_applies_retention_on_its_own(ldsn, make_worker):
    """A running supervisor deletes expired finished tasks by itself (its first retention
    pass comes at start); tasks not expired stay."""
    old, young = jl.one.enqueue_many([{"n": 1}, {"n": 2}])
    run_all(make_worker(), ldsn)
    query(
        ldsn,
        "UPDATE underway.task SET expires_at = now() - interval '1 s' WHERE id = %s",
        (old.id,),
    )
    with supervisor(ldsn, "--lease", "3") as sup:  # maintenance every second
        wait_until(lambda: old.status() is None, timeout=15, message=f"purged: {sup!r}")
        sup.wait_for_output("retention: deleted 1 finished tasks")
    assert young.status() is TaskState.SUCCEEDED


# == pausing queues =========================================================================


@pytest.mark.timeout(30)
def test_paused_queue_is_left_alone_while_others_flow(ldsn, make_worker):
    """While a queue is paused, enqueueing into it works but no worker starts its tasks;
    other queues' tasks run; queues() shows it paused with its pending count. resume() says
    True (then False) and its tasks run."""
    w = make_worker()
    admin.pause("lifecycle-one")
    admin.pause("lifecycle-one")  # pausing twice is fine
    held = jl.one.enqueue_many([{"n": 1}, {"n": 2}])
    other = jl.two.enqueue({"n": 3}, priority=-1)
    assert run_all(w, ldsn) == 2
    assert other.status() is TaskState.SUCCEEDED
    assert [t.status() for t in held] == ["pending", "pending"]
    summary = {q.queue: q for q in admin.queues()}
    one = summary["lifecycle-one"]
    assert (one.pending, one.running, one.failed, one.paused) == (2, 0, 0, True)
    assert one.lag is not None and one.lag >= 0
    assert "lifecycle-two" not in summary

    assert admin.resume("lifecycle-one") is True
    assert admin.resume("lifecycle-one") is False
    assert run_all(w, ldsn) == 2
    assert [t.status() for t in held] == ["succeeded", "succeeded"]
    assert admin.queues() == []


@pytest.mark.timeout(30)
def test_pausing_a_shared_queue_pauses_every_job_in_it(ldsn, make_worker):
    """Two jobs with Job(queue='lifecycle-shared'): pausing that queue stops both; pausing a
    job's own name does not touch a job whose queue is another."""
    w = make_worker()
    a = jl.shared_a.enqueue({"n": 1})
    b = jl.shared_b.enqueue({"n": 2})
    assert [task_row(ldsn, t.id)["queue"] for t in (a, b)] == ["lifecycle-shared"] * 2
    admin.pause("lifecycle-shared")
    assert w.run_once() is False
    admin.resume("lifecycle-shared")
    admin.pause("lifecycle-shared-a")  # a job name, not its queue
    assert run_all(w, ldsn) == 2
    assert [a.status(), b.status()] == ["succeeded", "succeeded"]


@pytest.mark.timeout(30)
def test_bad_queue_names_are_refused(ldsn):
    """pause/resume/dead_letters/redrive refuse an empty or non-string queue name."""
    for call in (admin.pause, admin.resume, admin.dead_letters, admin.redrive):
        for bad in ("", "  ", None, 7):
            with pytest.raises(TypeError, match="a queue name is a non-empty string"):
                call(bad)
    assert admin.queues() == []


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_pause_lets_the_running_step_finish_and_resume_wakes_idle_workers(ldsn, lgate):
    """Under a real supervisor (idle workers poll only every 30 s): a queue paused while its
    step runs lets that step finish and commit, but its next step waits; tasks of other
    queues flow. resume() wakes the idle workers at once: the waiting tasks run within 2 s."""
    key = lgate.hold(9300)
    task = jl.two.enqueue({"lock": key})
    with supervisor(ldsn, workers=2) as sup:
        wait_blocked(ldsn, key)
        admin.pause("lifecycle-two")
        more = jl.two.enqueue_many([{"n": n} for n in range(3)])
        lgate.release(key)
        wait_until(
            lambda: task_row(ldsn, task.id)["step"] == 1, message=f"step 0 committed: {sup!r}"
        )
        assert effects(ldsn, task.id) == [(0, 1, "first")]
        others = jl.one.enqueue_many([{"n": n} for n in range(3)])
        wait_until(lambda: all(t.status() == "succeeded" for t in others), message=repr(sup))
        wait_idle(ldsn, 2)
        holds_for(
            0.5,
            lambda: [t.status() for t in (task, *more)] == ["pending"] * 4,
            "paused tasks stay pending",
        )
        assert admin.resume("lifecycle-two") is True
        resumed = time.monotonic()
        wait_until(
            lambda: all(t.status() == "succeeded" for t in (task, *more)),
            timeout=5,
            message=f"resumed tasks done: {sup!r}",
        )
        elapsed = time.monotonic() - resumed
    assert elapsed < 2, elapsed
    assert effects(ldsn, task.id) == [(0, 1, "first"), (1, 1, "second")]


def cpu_seconds(pids):
    """User + system CPU time used so far by these processes."""
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_idle_worker_does_not_spin_on_paused_due_tasks(ldsn):
    """A worker whose only due tasks are in a paused queue waits quietly. Over 2 s (poll
    interval: the default 1 s) it wakes only a few times (voluntary context switches: about
    6 when idle, some 800 for a worker retrying its claim every few milliseconds) and it and
    its PostgreSQL backend use under 0.1 s of CPU together."""
    admin.pause("lifecycle-one")
    jl.one.enqueue_many([{"n": n} for n in range(50)])
    query(ldsn, "UPDATE underway.task SET run_at = now() - interval '1 minute'")
    with Supervisor(["jobs_lifecycle"], ldsn, ["--workers", "1", "--no-scheduler"]) as sup:
        wait_idle(ldsn, 1)
        [worker] = sup.worker_pids()
        backend = scalar(
            ldsn,
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (f"underway worker {worker}",),
        )
        pids = [worker, backend]
        cpu_before = cpu_seconds(pids)
        wakes_before = psutil.Process(worker).num_ctx_switches().voluntary
        window = time.monotonic()
        while time.monotonic() - window < 2.0:  # a measuring window, not a synchronisation
            time.sleep(0.1)
        wakes = psutil.Process(worker).num_ctx_switches().voluntary - wakes_before
        cpu = cpu_seconds(pids) - cpu_before
        assert scalar(ldsn, "SELECT count(*) FROM underway.task WHERE state = 'pending'") == 50
    assert wakes < 100, f"idle worker woke {wakes} times in 2 s: {sup!r}"
    assert cpu < 0.1, f"idle worker and backend used {cpu:.2f} s of CPU in 2 s: {sup!r}"
