"""Honest cancellation and abort (issue #13): what cancel() says it did, a cancel during
the last step, and cancel(abort=True) ending steps stuck where Python cannot interrupt them.

Steps are in ``tests/jobs_api.py``. Running steps run in real supervisors
(``python -m underway.supervisor jobs_api``) whose workers block on advisory locks the test
holds, or sleep in ``pg_sleep`` on a connection of the step's own, or in libc's ``sleep``.
Supervisors run with ``--lease 30``, so their periodic upkeep (lease renewal, and the
periodic look for aborts) comes only every 10 s: an abort within 3 s was woken by its
notification.
"""

from __future__ import annotations

import os
import select
import signal
import time

import jobs_api as ja
import psycopg2
import pytest
from jobs_api import attempts, effects, state
from jobs_faults import Gate, task_row

from underway import CancelResult, TaskCancelled, TaskState, admin

from .faults_common import wait_blocked
from .helpers import Supervisor, query, scalar, wait_until

# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def gate(adsn):
    """Advisory locks held by the test; a step given ``{"lock": key}`` waits for its key."""
    g = Gate(adsn)
    yield g
    g.close()


def supervisor(dsn, *args, workers=1):
    """A supervisor for the api jobs (no scheduler; idle workers poll only every 30 s)."""
    return Supervisor(
        ["jobs_api"],
        dsn,
        ["--workers", str(workers), "--poll-interval", "30", "--no-scheduler", *args],
    )


def stop(*sups):
    """Stop idle supervisors gracefully (SIGTERM) and wait for them: much quicker than the
    SIGKILL of leaving their block, whose orphaned workers take seconds to be reaped."""
    for sup in sups:
        sup.signal(signal.SIGTERM)
    for sup in sups:
        assert sup.wait(15) == 0, sup


def wait_state(dsn, task_id, wanted, timeout=10.0, sup=None):
    """Wait until the task is in state ``wanted``; on failure, show the supervisor's log."""
    try:
        wait_until(
            lambda: state(dsn, task_id) == wanted,
            timeout=timeout,
            interval=0.01,
            message=f"task {task_id} {wanted}",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{sup!r}") from None


def wait_supervisor_idle(dsn, sup, workers):
    """Wait until the supervisor runs ``workers`` workers and its own connection has sat
    idle for 100 ms (its upkeep statements, at most every 10 s with --lease 30, are done)."""
    wait_until(
        lambda: (
            len(sup.worker_pids()) == workers
            and scalar(
                dsn,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                " AND state = 'idle' AND clock_timestamp() - state_change > interval '100 ms'",
                (f"underway supervisor {sup.pid}",),
            )
        ),
        message="the supervisor idle",
    )


# == cancellation and abort ==================================================================


@pytest.mark.timeout(30)
def test_cancel_says_what_it_did_and_abort_of_a_waiting_task_is_a_cancel(adsn, make_worker):
    """cancel() and cancel(abort=True) of a waiting task say "cancelled" (no abort is asked
    for: nothing runs to end) and of a finished one "finished"; CancelResult is a str
    enum. An abort of a running task says "requested" and tells supervisors at once: a
    notification on underway_abort carrying the task id."""
    w = make_worker(ja.echo)
    waiting = ja.echo.enqueue({"n": 1}, delay=3600)
    assert waiting.cancel(abort=True) is CancelResult.CANCELLED
    assert task_row(adsn, waiting.id)["abort_requested_at"] is None
    assert waiting.cancel(abort=True) == "finished"
    assert isinstance(CancelResult.REQUESTED, str) and str(CancelResult.REQUESTED) == "requested"

    running = ja.echo.enqueue({"n": 2})
    listener = psycopg2.connect(adsn)
    listener.autocommit = True
    try:
        with listener.cursor() as c:
            c.execute("LISTEN underway_abort")
        claim = w.claim()
        assert claim is not None and claim.id == running.id
        assert running.cancel(abort=True) is CancelResult.REQUESTED
        assert task_row(adsn, running.id)["abort_requested_at"] is not None
        assert select.select([listener], [], [], 5)[0], "no notification on underway_abort"
        listener.poll()
        assert [n.payload for n in listener.notifies] == [str(running.id)]
    finally:
        listener.close()
    w.execute(claim)
    assert running.cancel(abort=True) is CancelResult.FINISHED


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_cancel_during_the_last_step_leaves_the_task_succeeded(adsn, gate):
    """Two tasks of a two-step job under a real supervisor, each cancelled while a step
    runs (blocked on the gate): cancel() says "requested" for both. The one cancelled in
    its first step stops at the step boundary (cancelled: result() raises TaskCancelled,
    the last step never ran); the one cancelled in its last step has nothing left to stop
    and ends succeeded, with its result, as documented; cancel() then says "finished"."""
    first_key, last_key = gate.hold(4501), gate.hold(4502)
    early = ja.gated.enqueue({"lock": first_key})
    late = ja.gated.enqueue({"second_lock": last_key})
    with supervisor(adsn, workers=2) as sup:
        wait_blocked(adsn, first_key)
        wait_blocked(adsn, last_key)
        assert [n for _, _, n in effects(adsn, late.id)] == ["gated-first"]  # step 0 done
        assert early.cancel() is CancelResult.REQUESTED
        assert late.cancel() is CancelResult.REQUESTED
        gate.release(first_key)
        gate.release(last_key)
        wait_state(adsn, early.id, "cancelled", sup=sup)
        wait_state(adsn, late.id, "succeeded", sup=sup)
        stop(sup)
    with pytest.raises(TaskCancelled):
        early.result(timeout=0)
    assert [n for _, _, n in effects(adsn, early.id)] == ["gated-first"]
    assert late.result(timeout=0) == {"finished": True}
    assert [n for _, _, n in effects(adsn, late.id)] == ["gated-first", "gated-last"]
    assert late.cancel() is early.cancel() is CancelResult.FINISHED


def stuck_in_pg_sleep(dsn, task_id):
    """Whether the step's own connection is inside pg_sleep."""
    return scalar(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        " AND state = 'active' AND query LIKE '%%pg_sleep%%'",
        (f"api-stuck {task_id}",),
    )


def sleeping_in_c(dsn, task_id):
    """The pid of the worker whose step said it is about to sleep in C, or None."""
    return scalar(
        dsn,
        "SELECT pid FROM api_effect WHERE task_id = %s AND note = 'sleeping in C'",
        (task_id,),
    )


def end_stuck_sessions(dsn):
    """End the pg_sleep sessions left by aborted steps (their process is gone; the server
    notices only when the sleep ends)."""
    query(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name LIKE 'api-stuck %%'",
    )


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_abort_ends_steps_stuck_in_c_within_seconds(adsn):
    """With --lease 30 (so lease upkeep runs only every 10 s), two running steps are stuck
    where Python never runs: one in SELECT pg_sleep(600) on a connection of its own, one in
    libc's sleep(600). cancel(abort=True) says "requested" and within 3 s the supervisor
    (woken by the notification) has killed each worker: the try is recorded 'aborted', not
    retried, the task is cancelled (result() raises TaskCancelled) and its step never
    finished. Fresh workers replace the killed ones and run new work. (Each abort is asked
    for while the supervisor is idle; for one asked while it is busy, see the next test.)"""
    try:
        with supervisor(adsn, "--lease", "30", workers=2) as sup:
            in_db = ja.stuck_sql.enqueue({"dsn": adsn})
            in_c = ja.stuck_c.enqueue({"dsn": adsn})
            wait_until(lambda: stuck_in_pg_sleep(adsn, in_db.id), message=f"pg_sleep: {sup!r}")
            wait_until(lambda: sleeping_in_c(adsn, in_c.id), message=f"sleep(): {sup!r}")
            before = sup.worker_pids()
            assert len(before) == 2
            for task in (in_db, in_c):
                wait_supervisor_idle(adsn, sup, 2)
                asked = time.monotonic()
                assert task.cancel(abort=True) is CancelResult.REQUESTED
                wait_state(adsn, task.id, "cancelled", timeout=3, sup=sup)
                print(f"\nabort of task {task.id} took {time.monotonic() - asked:.2f}s")
            wait_until(
                lambda: len(pids := sup.worker_pids()) == 2 and not set(pids) & set(before),
                message=f"two fresh workers: {sup!r}",
            )
            fresh = ja.echo.enqueue({"after": "abort"})
            # (status, not result(): see test_results' race of result() with a finish)
            wait_state(adsn, fresh.id, "succeeded", sup=sup)
            stop(sup)
            out = sup.output()
        for task in (in_db, in_c):
            assert attempts(adsn, task.id) == [(0, 1, "aborted")]
            assert "woke up" not in [n for _, _, n in effects(adsn, task.id)]
            with pytest.raises(TaskCancelled):
                task.result(timeout=0)
            assert f"aborting task {task.id}" in out
    finally:
        end_stuck_sessions(adsn)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_abort_of_a_task_on_its_last_try_ends_cancelled(adsn):
    """A task with a single try (and a dead-letter queue) is aborted while its step sleeps
    in C: it ends cancelled, not failed, and is no dead letter."""
    try:
        with supervisor(adsn, "--lease", "30") as sup:
            task = ja.stuck_once.enqueue({"dsn": adsn})
            wait_until(lambda: sleeping_in_c(adsn, task.id), message=f"sleep(): {sup!r}")
            assert task.cancel(abort=True) is CancelResult.REQUESTED
            wait_until(
                lambda: state(adsn, task.id) in ("cancelled", "failed"),
                timeout=3,
                message=f"aborted: {sup!r}",
            )
            stop(sup)
        assert attempts(adsn, task.id) == [(0, 1, "aborted")]
        assert admin.dead_letters(ja.DEAD) == []
        assert task.status() is TaskState.CANCELLED
    finally:
        end_stuck_sessions(adsn)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_abort_while_the_supervisor_is_busy_is_not_missed(adsn, gate):
    """An abort is asked for while the supervisor's connection is busy with a statement:
    giving back the task of a worker that died (SIGKILL), which waits on a row lock the test
    holds. Once that statement is done, the abort must still take effect within 3 s, not
    wait for the next periodic pass."""
    key = gate.hold(4601)
    held = ja.gated.enqueue({"lock": key})
    stuck = ja.stuck_c.enqueue({"dsn": adsn})
    locker = psycopg2.connect(adsn)
    try:
        with supervisor(adsn, "--lease", "30", workers=2) as sup:
            [holder] = wait_blocked(adsn, key)
            wait_until(lambda: sleeping_in_c(adsn, stuck.id), message=f"sleep(): {sup!r}")
            with locker.cursor() as c:
                c.execute("SELECT 1 FROM underway.task WHERE id = %s FOR UPDATE", (held.id,))
            os.kill(holder, signal.SIGKILL)
            wait_until(
                lambda: scalar(
                    adsn,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                    " AND wait_event_type = 'Lock'",
                    (f"underway supervisor {sup.pid}",),
                ),
                message=f"the supervisor waits on the locked row: {sup!r}",
            )
            assert stuck.cancel(abort=True) is CancelResult.REQUESTED
            locker.commit()
            wait_until(lambda: held.status() is TaskState.FAILED, message=f"given back: {sup!r}")
            wait_state(adsn, stuck.id, "cancelled", timeout=3, sup=sup)
            gate.release(key)
            stop(sup)
        assert attempts(adsn, stuck.id) == [(0, 1, "aborted")]
    finally:
        locker.close()
