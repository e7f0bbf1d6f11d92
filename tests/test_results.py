"""Task results (issue #13): what a job's last step returns is the task's output, and
``task.result()`` waits for it; plus the handles for tasks enqueued elsewhere and
``run_inline``'s finished task.

Steps are in ``tests/jobs_api.py``; an in-process :class:`~underway.worker.Worker` runs them
with ``run_once``. Waiting is measured against the clock where the claim is about time
(answers at once, within 100 ms of the finish, not before the timeout); nothing waits by
sleeping.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import jobs_api as ja
import psycopg2
import pytest
from jobs_api import attempts, effect_inputs, effects, run_all
from jobs_faults import Gate, holds_for, task_row

import underway
from underway import TaskCancelled, TaskFailed, TaskState, admin
from underway.testing import run_inline

from .helpers import query, register, scalar, wait_until

# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def gate(adsn):
    """Advisory locks held by the test; a step given ``{"lock": key}`` waits for its key."""
    g = Gate(adsn)
    yield g
    g.close()


def output(dsn, task_id):
    """The task's stored output (decoded by psycopg2), and whether the column is NULL."""
    value, is_null = query(
        dsn, "SELECT output, output IS NULL FROM underway.task WHERE id = %s", (task_id,)
    )[0]
    return value, is_null


def result_session(dsn):
    """(state, query, query_start, idle for 50 ms) of the session a waiting result() holds,
    or None."""
    rows = query(
        dsn,
        "SELECT state, query, query_start, clock_timestamp() - state_change > interval '50 ms'"
        " FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'underway result'",
    )
    return rows[0] if rows else None


def wait_result_listening(dsn, task_id):
    """Wait until a result() call is waiting on the task: the task is marked awaited and the
    session has sat idle for 50 ms after its last statement (it is in its select() on the
    socket)."""
    wait_until(
        lambda: (
            scalar(dsn, "SELECT awaited FROM underway.task WHERE id = %s", (task_id,))
            and (s := result_session(dsn)) is not None
            and s[0] == "idle"
            and s[3]
        ),
        message=f"result() of task {task_id} waiting",
    )


class Waiter(threading.Thread):
    """``task.result(timeout)`` in a thread: what it returned or raised, and when."""

    def __init__(self, task, timeout=None):
        super().__init__(daemon=True)
        self.task = task
        self.timeout = timeout
        self.value = None
        self.error = None
        self.started_at = 0.0
        self.ended_at = 0.0

    def run(self):
        self.started_at = time.monotonic()
        try:
            self.value = self.task.result(timeout=self.timeout)
        except BaseException as exc:
            self.error = exc
        self.ended_at = time.monotonic()


# == what a job returns ======================================================================


@pytest.mark.timeout(30)
def test_last_steps_plain_return_value_is_the_result(adsn, make_worker):
    """A last step that returns a plain value (``return inp``) succeeds (it used to fail
    with Fatal): one succeeded try, the value stored as the task's output (JSON, as given)
    and returned by result(); status() is still a TaskState."""
    value = {"a": [1, "two", None, True], "b": {"c": 3.5}}
    task = ja.echo.enqueue(value)
    assert make_worker().run_once() is True
    assert task.status() is TaskState.SUCCEEDED
    assert attempts(adsn, task.id) == [(0, 1, "succeeded")]
    assert output(adsn, task.id) == (value, False)
    assert task.result() == value


@pytest.mark.timeout(30)
def test_task_detail_shows_the_output_and_history(adsn, make_worker):
    """admin.task_detail (the operators' view of one task) shows the task's output and its
    tries."""
    task = ja.echo.enqueue({"n": 5})
    assert make_worker().run_once() is True
    detail = admin.task_detail(task.id)
    assert detail.output == {"n": 5}
    assert [(a.step, a.attempt, a.outcome) for a in detail.history] == [(0, 1, "succeeded")]
    assert detail.step_names == ()  # no supervisor registered the job: names unknown


@pytest.mark.timeout(30)
def test_task_detail_names_every_step_of_a_registered_job(adsn):
    """Once a supervisor registered the job, task_detail names all its steps, those the
    task has not reached included, and the one it is at."""
    register(adsn, ja.chain)
    detail = admin.task_detail(ja.chain.enqueue({"n": 1}).id)
    assert detail.step_names == ("chain_first", "chain_second", "chain_third")
    assert (detail.step, detail.step_name, detail.step_count) == (0, "chain_first", 3)


@pytest.mark.timeout(30)
def test_middle_steps_plain_values_are_the_next_inputs_and_the_last_is_the_result(
    adsn, make_worker
):
    """Three steps returning plain values: each middle step's value is the next step's input
    (not the task's output), and the last step's value is the result."""
    task = ja.chain.enqueue({"n": 1})
    run_all(make_worker(), adsn)
    assert effect_inputs(adsn, task.id) == [
        ("first", {"n": 1}),
        ("second", {"n": 2, "seen": ["first"]}),
        ("third", {"n": 20, "seen": ["first", "second"]}),
    ]
    assert task.result(timeout=0) == {"result": 21, "seen": ["first", "second", "third"]}
    assert attempts(adsn, task.id) == [
        (0, 1, "succeeded"),
        (1, 1, "succeeded"),
        (2, 1, "succeeded"),
    ]


@pytest.mark.timeout(30)
def test_to_done_from_a_middle_step_ends_the_run_with_its_value(adsn, make_worker):
    """To.done(value) from the middle step finishes the task there: the value is the
    result and the last step never runs."""
    task = ja.chain.enqueue({"n": 11})
    run_all(make_worker(), adsn)
    assert [note for _, _, note in effects(adsn, task.id)] == ["first", "second"]
    assert task.status() is TaskState.SUCCEEDED
    assert task.result(timeout=0) == {"stopped_at": "second", "n": 12}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("value", [0, False, "", [], {}, "text", 1.5, [None]])
def test_to_done_keeps_falsy_and_plain_values(adsn, make_worker, value):
    """To.done(value) stores any JSON value as the result, falsy ones included (0, False,
    "" and [] are results, not "no result")."""
    task = ja.done.enqueue({"value": value})
    assert make_worker().run_once() is True
    assert output(adsn, task.id) == (value, False)
    assert task.result(timeout=0) == value


@pytest.mark.timeout(30)
def test_no_value_is_a_none_result(adsn, make_worker):
    """To.done() and a last step returning None finish the task with no output: result()
    is None."""
    w = make_worker()
    bare = ja.done.enqueue({})
    silent = ja.nothing.enqueue({"n": 1})
    run_all(w, adsn)
    for task in (bare, silent):
        assert task.status() is TaskState.SUCCEEDED
        assert output(adsn, task.id) == (None, True)
        assert task.result(timeout=0) is None


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["middle", "last"])
@pytest.mark.parametrize("kind", ["object", "nan", "nul"])
def test_output_that_is_not_json_fails_the_task_at_once_naming_the_step(
    adsn, make_worker, where, kind
):
    """A step returning something JSON (or jsonb) cannot hold: an object, NaN, a string with
    NUL. Checked as inputs are: the task fails at once (one try of three), its error naming
    the step and the job; result() raises TaskFailed with it."""
    task = ja.bad_output.enqueue({"where": where, "kind": kind})
    run_all(make_worker(), adsn)
    step = {"middle": "maybe_bad_middle", "last": "maybe_bad_last"}[where]
    row = task_row(adsn, task.id)
    assert row["state"] == "failed"
    assert row["output"] is None
    tries = attempts(adsn, task.id)
    assert tries[-1] == ({"middle": 0, "last": 1}[where], 1, "failed"), tries
    assert row["error"].startswith("Fatal: "), row["error"]
    assert f"step {step!r}" in row["error"] and "'api-bad-output'" in row["error"], row["error"]
    with pytest.raises(TaskFailed) as failed:
        task.result(timeout=0)
    assert failed.value.error == row["error"]


@pytest.mark.timeout(30)
def test_last_step_asking_for_a_next_step_is_fatal(adsn, make_worker):
    """To.next() from the last step is a mistake in the code: the task fails at once (one
    try of three) saying to return To.done(result)."""
    task = ja.last_to_next.enqueue({"n": 1})
    run_all(make_worker(), adsn)
    assert attempts(adsn, task.id) == [(0, 1, "failed")]
    assert "return To.done(result)" in task_row(adsn, task.id)["error"]


# == result(): how it waits and what it raises ================================================


@pytest.mark.timeout(30)
def test_result_of_a_failed_task_raises_task_failed_with_error_and_traceback(adsn, make_worker):
    """result() of a task that failed for good raises TaskFailed carrying its last error and
    that try's traceback (apart, and in the message)."""
    task = ja.fails.enqueue({"n": 1})
    run_all(make_worker(), adsn)
    assert task.status() is TaskState.FAILED
    with pytest.raises(TaskFailed) as failed:
        task.result(timeout=0)
    assert failed.value.error == "RuntimeError: no luck on try 2"
    assert "explode_for_the_traceback" in failed.value.traceback
    assert "no luck on try 2" in failed.value.traceback
    assert "RuntimeError: no luck on try 2" in str(failed.value)
    assert "explode_for_the_traceback" in str(failed.value)


@pytest.mark.timeout(30)
def test_result_of_a_cancelled_task_raises_task_cancelled(adsn, make_worker):
    """result() of a cancelled task raises TaskCancelled, at once."""
    task = ja.echo.enqueue({"n": 1}, delay=3600)
    assert task.cancel() == "cancelled"
    started = time.monotonic()
    with pytest.raises(TaskCancelled):
        task.result()
    assert time.monotonic() - started < 2


@pytest.mark.timeout(30)
def test_result_of_a_finished_task_answers_at_once(adsn, make_worker):
    """result() without a timeout, of a task that finished long before, returns at once
    (no waiting for a notification that was sent before anyone listened), from the
    enqueue's handle and from a fresh one."""
    task = ja.echo.enqueue({"n": 7})
    assert make_worker().run_once() is True
    for handle in (task, underway.task(task.id), ja.echo.task(task.id)):
        started = time.monotonic()
        assert handle.result() == {"n": 7}
        assert time.monotonic() - started < 1


@pytest.mark.timeout(30)
def test_result_times_out_after_the_timeout_not_before(adsn):
    """result(timeout=0.5) of a task no worker runs raises TimeoutError after about 0.5 s
    (not before), and leaves the task alone."""
    task = ja.echo.enqueue({"n": 1})
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        task.result(timeout=0.5)
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 1.5, elapsed
    assert task.status() is TaskState.PENDING


@pytest.mark.timeout(30)
def test_result_waits_without_polling(adsn):
    """While result(timeout=1.5) waits on a pending task, its session sends no statement:
    for 0.8 s its last statement (marking the task awaited) and its start time stay the
    same, the session idle. It then times out."""
    task = ja.echo.enqueue({"n": 1})
    waiter = Waiter(task, timeout=1.5)
    waiter.start()
    wait_result_listening(adsn, task.id)
    first = result_session(adsn)
    holds_for(0.8, lambda: result_session(adsn) == first, "the result() session stays idle")
    waiter.join(10)
    assert isinstance(waiter.error, TimeoutError), waiter.error
    assert waiter.ended_at - waiter.started_at >= 1.5


@pytest.mark.timeout(30)
def test_waiting_result_returns_within_100_ms_of_the_finish(adsn, make_worker):
    """A result() waiting in another thread returns within 100 ms of the worker's commit
    (woken by the notification, not by a recheck 30 s later)."""
    task = ja.chain.enqueue({"n": 1})
    w = make_worker()
    assert w.run_once() and w.run_once()  # two of three steps done
    waiter = Waiter(task)
    waiter.start()
    wait_result_listening(adsn, task.id)
    assert w.run_once() is True
    finished = time.monotonic()
    waiter.join(10)
    assert waiter.error is None, waiter.error
    assert waiter.value == {"result": 21, "seen": ["first", "second", "third"]}
    print(f"\nresult() returned {waiter.ended_at - finished:+.3f}s after the commit")
    assert waiter.ended_at - finished < 0.1, waiter.ended_at - finished


@pytest.mark.timeout(30)
def test_waiting_result_sees_a_cancellation_at_once(adsn):
    """A result() waiting on a pending task raises TaskCancelled within 100 ms of the task
    being cancelled (on another connection)."""
    task = ja.echo.enqueue({"n": 1}, delay=3600)
    waiter = Waiter(task)
    waiter.start()
    wait_result_listening(adsn, task.id)
    assert task.cancel() == "cancelled"
    cancelled = time.monotonic()
    waiter.join(10)
    assert isinstance(waiter.error, TaskCancelled), waiter.error
    assert waiter.ended_at - cancelled < 0.1


@pytest.mark.timeout(30)
def test_result_started_while_the_worker_commits_is_not_missed(adsn, make_worker, gate):
    """result() is called while the worker's completion holds the task row (between its
    UPDATE and COMMIT; here widened by a step that locks its own row and waits on the gate):
    it must return the value within a second of the commit, not time out."""
    key = gate.hold(4401)
    task = ja.own_row.enqueue({"lock": key, "value": 42})
    w = make_worker(ja.own_row)
    runner = threading.Thread(target=w.run_once, daemon=True)
    runner.start()
    wait_until(
        lambda: scalar(
            adsn,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND objid = %s",
            (key,),
        ),
        message="the step waits on the gate",
    )
    waiter = Waiter(task, timeout=2)
    waiter.start()
    wait_until(
        lambda: scalar(
            adsn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'underway result'"
            " AND wait_event_type = 'Lock'",
        ),
        message="result() waits on the task row",
    )
    gate.release(key)
    runner.join(10)
    released = time.monotonic()
    waiter.join(10)
    assert task.status() is TaskState.SUCCEEDED
    assert waiter.error is None, repr(waiter.error)
    assert waiter.value == {"value": 42}
    assert waiter.ended_at - released < 1


# == handles, SQL, run_inline, retention ===================================================


@pytest.mark.timeout(30)
def test_result_of_a_task_enqueued_from_sql(adsn, make_worker):
    """A task enqueued in SQL (underway.enqueue): underway.task(id) finds its job by the id,
    job.task(id) makes the same handle; result() returns its output once a worker ran it.
    underway.task of an id that does not exist raises LookupError."""
    task_id = scalar(adsn, """SELECT underway.enqueue('api-echo', '{"from": "sql"}')""")
    found = underway.task(task_id)
    assert (found.id, found.job) == (task_id, "api-echo")
    assert ja.echo.task(task_id) == found
    assert found.status() is TaskState.PENDING
    assert make_worker().run_once() is True
    assert found.result(timeout=5) == {"from": "sql"}
    with pytest.raises(LookupError):
        underway.task(10**12)


@pytest.mark.timeout(30)
def test_output_is_kept_for_keep_for_and_deleted_with_the_task(adsn, make_worker):
    """The output lives in the task row: kept until keep_for (1 h here) after the finish,
    then retention deletes it with the task; result() then raises LookupError."""
    task = ja.kept.enqueue({"n": 1})
    other = ja.echo.enqueue({"n": 2})
    run_all(make_worker(), adsn)
    row = task_row(adsn, task.id)
    assert row["expires_at"] - row["finished_at"] == timedelta(hours=1)
    assert row["output"] == {"kept": {"n": 1}}
    assert admin.purge_expired() == 0
    assert task.result(timeout=0) == {"kept": {"n": 1}}
    query(
        adsn,
        "UPDATE underway.task SET expires_at = now() - interval '1 s' WHERE id = %s",
        (task.id,),
    )
    assert admin.purge_expired() == 1
    assert task.status() is None
    with pytest.raises(LookupError):
        task.result(timeout=0)
    assert other.result(timeout=0) == {"n": 2}


@pytest.mark.timeout(30)
def test_run_inline_returns_a_finished_task_with_its_result(adsn):
    """run_inline returns the finished task: its result() is there at once; a failing job
    raises TaskFailed, or with raise_on_failure=False returns a task whose result() does."""
    task = run_inline(ja.chain, {"n": 1})
    assert task.status() is TaskState.SUCCEEDED
    assert task.result(timeout=0) == {"result": 21, "seen": ["first", "second", "third"]}
    with pytest.raises(TaskFailed, match="no luck on try 2"):
        run_inline(ja.fails, {"n": 1})
    failed = run_inline(ja.fails, {"n": 2}, raise_on_failure=False)
    with pytest.raises(TaskFailed) as raised:
        failed.result(timeout=0)
    assert raised.value.error == "RuntimeError: no luck on try 2"


@pytest.mark.timeout(30)
def test_result_in_a_transaction_of_the_callers_sees_committed_state(adsn, make_worker):
    """result() uses a connection of its own: a task enqueued in a transaction not yet
    committed is not visible to it (LookupError), and is once committed."""
    conn = psycopg2.connect(adsn)
    try:
        task = ja.echo.enqueue({"n": 1}, conn=conn)
        with pytest.raises(LookupError):
            task.result(timeout=0)
        conn.commit()
    finally:
        conn.close()
    assert make_worker().run_once() is True
    assert task.result(timeout=0) == {"n": 1}
