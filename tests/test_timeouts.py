"""Step timeouts, against a real PostgreSQL and real worker processes and signals.

A step over its timeout is stopped in one of three ways, and each is tested where it really
happens:

- in a worker process, SIGALRM raises ``StepTimeout`` inside a step stuck in Python code;
- a statement the step sends through ``cx`` is cancelled by the ``statement_timeout`` of the
  step's transaction (the time the step has left);
- a step stuck where SIGALRM cannot reach it (inside libpq, here) is ended by the supervisor,
  which SIGKILLs the worker ``TIMEOUT_KILL_AFTER`` (5 s) past the deadline.

In the pytest process pytest-timeout owns SIGALRM, so a ``Worker`` driven in-process never arms
it: a late step is only caught when it returns (the elapsed-time check), and a step that never
returns would run unbounded (not tested: it would hang by design). The in-process tests check
exactly that fallback, and that underway leaves the test runner's timer alone.

The steps (``tests/jobs_timeouts.py``) write ``timeouts_effect`` rows through ``cx`` (these
commit only with a successful try) and ``timeouts_note`` rows on a connection of their own
(these always stay), so every test can tell what a try did and what was rolled back.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import jobs_timeouts as jt
import pytest
from jobs_faults import Gate

import underway
import underway.testing
from underway.errors import StepTimeout
from underway.job import DEFAULT_TIMEOUT, Job
from underway.supervisor import TIMEOUT_KILL_AFTER
from underway.timeouts import _on_alarm
from underway.worker import Worker

from .helpers import Supervisor, query, scalar, wait_until

#: The error a try interrupted by the worker's own SIGALRM (or its elapsed check) records.
TIMED_OUT_1S = "StepTimeout: the step ran past its timeout of 1s"

#: Slack for process start-up, claims and commits on a slow 2-core machine.
SLACK = 1.5


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def tdsn(dsn: str) -> str:
    """The test database, with the tables the timeout steps write to."""
    jt.prepare(dsn)
    return dsn


@pytest.fixture
def make_job():
    """Define throwaway jobs with unique names; unregistered after the test."""
    made = []

    def make(**kwargs):
        name = f"timeouts-tmp-{uuid.uuid4().hex[:12]}"
        job = Job(name, **kwargs)
        made.append(name)
        return job

    yield make
    for name in made:
        underway.testing.unregister_job(name)


@pytest.fixture
def worker(tdsn: str):
    """An in-process worker for every timeouts job; its connection closes afterwards."""
    w = Worker(tdsn, {j.name: j for j in vars(jt).values() if isinstance(j, Job)})
    yield w
    w.disconnect()


@pytest.fixture
def foreign_alarm():
    """Make sure something other than underway owns SIGALRM, as pytest-timeout does with its
    default 'signal' method (when it runs without it, a stand-in handler and timer are set)."""
    handler = signal.getsignal(signal.SIGALRM)
    if handler not in (signal.SIG_DFL, None, _on_alarm) and signal.getitimer(
        signal.ITIMER_REAL
    ) != (0.0, 0.0):
        yield handler
        return

    def stand_in(signum, frame):
        raise AssertionError("the stand-in test-runner alarm went off")

    previous = signal.signal(signal.SIGALRM, stand_in)
    signal.setitimer(signal.ITIMER_REAL, 300)
    try:
        yield stand_in
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def supervisor(dsn: str, workers: int = 1, *args: str) -> Iterator[Supervisor]:
    """A supervisor for the timeout jobs, its idle workers woken only through LISTEN. A block
    that completes ends with a graceful stop, which must succeed (and is much quicker than
    killing the group)."""
    with Supervisor(
        ["jobs_timeouts"],
        dsn,
        ["--workers", str(workers), "--poll-interval", "30", "--no-scheduler", *args],
    ) as sup:
        yield sup
        sup.signal(signal.SIGTERM)
        assert sup.wait(15) == 0, repr(sup)


def attempts(dsn: str, task_id: int) -> list[tuple]:
    """(attempt, outcome, error) of each recorded try, oldest first."""
    return query(
        dsn,
        "SELECT attempt, outcome, error FROM underway.attempt WHERE task_id = %s ORDER BY id",
        (task_id,),
    )


def durations(dsn: str, task_id: int) -> list[float]:
    """Seconds from each try's claim to the recording of its outcome."""
    return [
        float(d)
        for (d,) in query(
            dsn,
            "SELECT extract(epoch FROM finished_at - started_at) FROM underway.attempt"
            " WHERE task_id = %s ORDER BY id",
            (task_id,),
        )
    ]


def task(dsn: str, task_id: int) -> tuple:
    """(state, attempts, error) of a task."""
    return query(
        dsn, "SELECT state::text, attempts, error FROM underway.task WHERE id = %s", (task_id,)
    )[0]


def finished(dsn: str, task_id: int) -> str | None:
    """The task's state once it is no longer pending or running, else None."""
    state = task(dsn, task_id)[0]
    return None if state in ("pending", "running") else state


def effects(dsn: str, task_id: int) -> list[tuple]:
    """(attempt, note) of the committed ``timeouts_effect`` rows of a task."""
    return query(
        dsn,
        "SELECT attempt, note FROM timeouts_effect WHERE task_id = %s ORDER BY id",
        (task_id,),
    )


def notes(dsn: str, task_id: int) -> list[tuple]:
    """(attempt, pid, note) of every ``timeouts_note`` row of a task."""
    return query(
        dsn,
        "SELECT attempt, pid, note FROM timeouts_note WHERE task_id = %s ORDER BY id",
        (task_id,),
    )


def blocked_in_libpq(dsn: str, lock: int) -> int:
    """How many steps' own connections wait for the test's advisory lock ``lock``."""
    return scalar(
        dsn,
        """
        SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND NOT l.granted AND l.objid = %s
          AND a.application_name = %s AND a.datname = current_database()
        """,
        (lock, jt.BLOCKER),
    )


# -- stuck in Python: SIGALRM -----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_spinning_step_is_interrupted_rolled_back_and_retried_until_failed(tdsn: str) -> None:
    """A step spinning in ``while True: pass`` with timeout=1 is interrupted by the worker's
    own SIGALRM after about a second, each time: with max_attempts=2 both tries are recorded
    'timed_out' with an error naming the timeout, the task fails after exactly two tries, the
    write the step made through cx before hanging is rolled back both times, and the same
    worker process ran both tries (nobody was killed)."""
    t = jt.spin.enqueue({"dsn": tdsn})
    with supervisor(tdsn) as sup:
        wait_until(lambda: finished(tdsn, t.id), timeout=15, message=f"task done: {sup!r}")
        assert task(tdsn, t.id) == ("failed", 2, TIMED_OUT_1S)
        assert attempts(tdsn, t.id) == [
            (1, "timed_out", TIMED_OUT_1S),
            (2, "timed_out", TIMED_OUT_1S),
        ]
        for seconds in durations(tdsn, t.id):
            assert 1.0 <= seconds < 1.0 + SLACK, durations(tdsn, t.id)
        assert effects(tdsn, t.id) == []
        tries = notes(tdsn, t.id)
        assert [(a, n) for a, _, n in tries] == [(1, "entered"), (2, "entered")]
        assert len({pid for _, pid, _ in tries}) == 1
        assert sup.worker_pids() == [tries[0][1]]
        assert "killing the worker" not in sup.output()
        assert "task failed: job=timeouts-spin" in sup.output()


@pytest.mark.timeout(30)
def test_sleeping_step_that_hangs_only_on_its_first_try_succeeds_on_the_second(
    tdsn: str,
) -> None:
    """A step stuck in a ``time.sleep`` loop is interrupted too; the retry policy gives it a
    second try, which does not hang and succeeds: only that try's writes commit."""
    t = jt.nap.enqueue({"dsn": tdsn, "hang_tries": 1})
    with supervisor(tdsn) as sup:
        wait_until(lambda: finished(tdsn, t.id), timeout=15, message=f"task done: {sup!r}")
        assert task(tdsn, t.id) == ("succeeded", 2, None)
        assert attempts(tdsn, t.id) == [(1, "timed_out", TIMED_OUT_1S), (2, "succeeded", None)]
        assert effects(tdsn, t.id) == [(2, "before the hang"), (2, "after")]
        assert "task retrying: job=timeouts-nap" in sup.output()


@pytest.mark.timeout(30)
def test_step_cannot_swallow_its_timeout(tdsn: str) -> None:
    """StepTimeout is a BaseException: a step looping under its own ``except Exception:`` is
    still stopped at its timeout (its handler never sees the interruption). A step that
    catches it as BaseException, writes through cx and returns normally has still run past
    its timeout: the worker's elapsed-time check records that try as timed out too, and rolls
    back every write it made through cx."""
    swallow = jt.swallow.enqueue({"dsn": tdsn})
    late = jt.late.enqueue({"dsn": tdsn})
    with supervisor(tdsn, 2) as sup:
        wait_until(
            lambda: finished(tdsn, swallow.id) and finished(tdsn, late.id),
            timeout=15,
            message=f"both done: {sup!r}",
        )
        for t in (swallow, late):
            assert attempts(tdsn, t.id) == [(1, "timed_out", TIMED_OUT_1S)]
            assert task(tdsn, t.id) == ("failed", 1, TIMED_OUT_1S)
            assert effects(tdsn, t.id) == []
            assert 1.0 <= durations(tdsn, t.id)[0] < 1.0 + SLACK
        assert [n for _, _, n in notes(tdsn, swallow.id)] == ["entered"]
        assert [n for _, _, n in notes(tdsn, late.id)] == [
            f"caught StepTimeout: {TIMED_OUT_1S[len('StepTimeout: ') :]}"
        ]
        assert "killing the worker" not in sup.output()


@pytest.mark.timeout(30)
def test_step_timeout_overrides_the_jobs_in_a_worker_process(tdsn: str) -> None:
    """SIGALRM uses the step's own timeout: a step with timeout=0.2 in a job with timeout=60
    is interrupted after 0.2 s, and a step with timeout=30 in a job with timeout=0.2 may sleep
    0.5 s and succeed."""
    short = jt.overrides.enqueue({"sleep_first": 30})
    long = jt.tight.enqueue({"sleep": 0.5})
    with supervisor(tdsn, 2) as sup:
        wait_until(
            lambda: finished(tdsn, short.id) and finished(tdsn, long.id),
            timeout=15,
            message=f"both done: {sup!r}",
        )
        error = "StepTimeout: the step ran past its timeout of 0.2s"
        assert attempts(tdsn, short.id) == [(1, "timed_out", error)]
        assert 0.2 <= durations(tdsn, short.id)[0] < 0.2 + SLACK
        assert attempts(tdsn, long.id) == [(1, "succeeded", None)]
        assert effects(tdsn, long.id) == [(1, "done")]


# -- stuck in C: the supervisor kills the worker ----------------------------------------------


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(60)
def test_step_stuck_where_sigalrm_cannot_reach_is_killed_by_the_supervisor(tdsn: str) -> None:
    """Steps stuck inside libpq (a query on a connection of their own, waiting for a lock the
    test holds: libpq retries poll() on EINTR, so SIGALRM's handler never gets to run) and a
    step that catches and ignores every interruption are ended by the supervisor: it SIGKILLs
    each worker 5 s (TIMEOUT_KILL_AFTER) past its step's deadline, says why in its log, records
    the try as 'timed_out' (it counts), and starts a new worker in its place. The task with a
    try left is retried (on a new worker) and succeeds; the others fail.

    The deadlines are posted while the supervisor sleeps (default --lease, so maintenance
    only every 10 s): it must still wake in time for each kill, not a maintenance interval
    late."""
    gate = Gate(tdsn)
    lock = gate.hold(4242)
    try:
        retried = jt.stuck.enqueue({"dsn": tdsn, "lock": lock, "hang_tries": 1})
        once = jt.stuck_once.enqueue({"dsn": tdsn, "lock": lock})
        deaf = jt.deaf.enqueue({"dsn": tdsn})
        with supervisor(tdsn, 3) as sup:
            wait_until(lambda: len(sup.worker_pids()) == 3, timeout=10, message=repr(sup))
            first_workers = set(sup.worker_pids())
            wait_until(lambda: blocked_in_libpq(tdsn, lock) == 2, timeout=10, message=repr(sup))
            wait_until(
                lambda: all(finished(tdsn, t.id) for t in (retried, once, deaf)),
                timeout=25,
                message=f"all three done: {sup!r}",
            )
            # Each stuck try was ended by the supervisor, no sooner than 5 s past its deadline.
            for t in (retried, once, deaf):
                outcome, error = attempts(tdsn, t.id)[0][1:]
                assert outcome == "timed_out"
                assert re.fullmatch(
                    r"the step ran past its timeout; worker process (\d+) killed by SIGKILL by"
                    r" the supervisor",
                    error,
                ), error
                kill_at = 1 + TIMEOUT_KILL_AFTER
                assert kill_at <= durations(tdsn, t.id)[0] < kill_at + SLACK, durations(tdsn, t.id)
            assert task(tdsn, retried.id)[:2] == ("succeeded", 2)
            assert attempts(tdsn, retried.id)[1] == (2, "succeeded", None)
            assert effects(tdsn, retried.id) == [(2, "done")]
            assert task(tdsn, once.id)[:2] == ("failed", 1)
            assert task(tdsn, deaf.id)[:2] == ("failed", 1)
            assert effects(tdsn, once.id) == effects(tdsn, deaf.id) == []
            # SIGALRM did fire in the deaf step: it ignored it, and only the kill stopped it.
            assert "ignored the interruption" in [n for _, _, n in notes(tdsn, deaf.id)]

            killed = {notes(tdsn, t.id)[0][1] for t in (retried, once, deaf)}
            assert killed == first_workers
            second_try_pid = notes(tdsn, retried.id)[-1][1]
            assert second_try_pid not in killed
            wait_until(
                lambda: len(sup.worker_pids()) == 3 and not set(sup.worker_pids()) & killed,
                timeout=10,
                message=f"three new workers: {sup!r}",
            )
            log = sup.output()
            for t in (retried, once, deaf):
                assert re.search(
                    rf"task {t.id} is \d+\.\ds past its step's timeout; killing the worker", log
                ), log
            assert f"task {retried.id} given back (pending): the step ran past its timeout" in log
            assert f"task {once.id} given back (failed): the step ran past its timeout" in log
            assert sup.is_running()
    finally:
        gate.close()


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(60)
def test_a_timeout_the_supervisor_ends_follows_the_steps_retry_policy(tdsn: str) -> None:
    """A try the supervisor ends for running past its timeout is retried as one the worker
    ends itself: not at all when the policy's retry_on leaves StepTimeout out (the task
    fails with tries left), and otherwise after the policy's backoff, not at once."""
    gate = Gate(tdsn)
    lock = gate.hold(4243)
    try:
        strict = jt.stuck_strict.enqueue({"dsn": tdsn, "lock": lock})
        later = jt.stuck_later.enqueue({"dsn": tdsn, "lock": lock})
        with supervisor(tdsn, 2) as sup:
            wait_until(lambda: blocked_in_libpq(tdsn, lock) == 2, timeout=10, message=repr(sup))
            wait_until(
                lambda: all(attempts(tdsn, t.id) for t in (strict, later)),
                timeout=20,
                message=f"both tries ended: {sup!r}",
            )
            for t in (strict, later):
                assert attempts(tdsn, t.id)[0][1] == "timed_out"
            assert task(tdsn, strict.id)[:2] == ("failed", 1)
            assert task(tdsn, later.id)[:2] == ("pending", 1)
            wait_in = scalar(
                tdsn,
                "SELECT extract(epoch FROM run_at - now()) FROM underway.task WHERE id = %s",
                (later.id,),
            )
            assert 3500 < wait_in <= 3600, wait_in
    finally:
        gate.close()


# -- statements through cx: statement_timeout -------------------------------------------------


@pytest.mark.timeout(30)
def test_statement_through_cx_is_cancelled_at_the_steps_timeout(tdsn: str) -> None:
    """A step's ``SELECT pg_sleep(30)`` through cx, with 1 s left, is cut off at about 1 s:
    its transaction's statement_timeout is the time left (at most 1000 ms), the try is
    recorded 'timed_out' whether SIGALRM's StepTimeout or the server's cancel comes first
    (the cancel comes no sooner than the deadline), the server is no longer sleeping, and
    the worker lives on and runs the next task."""
    t = jt.statement.enqueue({"dsn": tdsn})
    with supervisor(tdsn) as sup:
        wait_until(lambda: finished(tdsn, t.id), timeout=15, message=f"task done: {sup!r}")
        first = notes(tdsn, t.id)[0]
        setting = re.fullmatch(r"statement_timeout=(\d+)", first[2])
        assert setting and 0 < int(setting.group(1)) <= 1000, first
        assert attempts(tdsn, t.id) == [(1, "timed_out", TIMED_OUT_1S)]
        assert task(tdsn, t.id)[0] == "failed"
        assert 1.0 <= durations(tdsn, t.id)[0] < 1.0 + SLACK
        assert not scalar(
            tdsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state = 'active' AND query LIKE %s AND pid <> pg_backend_pid()",
            ("%pg_sleep(30)%",),
        )
        # Not killed: the same worker takes the next task.
        after = jt.probe.enqueue({})
        wait_until(lambda: finished(tdsn, after.id), timeout=10, message=repr(sup))
        assert sup.worker_pids() == [first[1]]
        assert "killing the worker" not in sup.output()


@pytest.mark.timeout(30)
def test_statement_timeout_alone_cancels_a_statement_of_an_in_process_worker(
    tdsn: str, worker: Worker, foreign_alarm: object
) -> None:
    """Without SIGALRM (owned by the test runner here), statement_timeout alone stops the
    step's 30 s statement after about a second, never before the step's deadline: the
    QueryCanceled the step then raises is the timeout's doing, and the try is recorded
    'timed_out', as SIGALRM's interruption would have it."""
    t = jt.statement.enqueue({"dsn": tdsn})
    started = time.monotonic()
    assert worker.run_once() is True
    assert time.monotonic() - started < 1.0 + SLACK
    assert [n for _, _, n in notes(tdsn, t.id)][1:] == ["statement ended: QueryCanceled"]
    assert attempts(tdsn, t.id) == [(1, "timed_out", TIMED_OUT_1S)]


@pytest.mark.timeout(30)
def test_an_error_met_past_the_deadline_counts_as_the_timeout(
    tdsn: str, worker: Worker, foreign_alarm: object
) -> None:
    """A step (timeout 0.2 s, not interrupted: SIGALRM is the test runner's) that raises its
    own error 0.3 s in has timed out: the try is 'timed_out', so ``retry_on`` and the
    dashboards see a timeout. The same error raised in time stays the step's failure."""
    late = jt.late_error.enqueue({"sleep": 0.3})
    in_time = jt.late_error.enqueue({"sleep": 0})
    while worker.run_once():
        pass
    error = "StepTimeout: the step ran past its timeout of 0.2s"
    assert attempts(tdsn, late.id) == [(1, "timed_out", error)]
    [(attempt, outcome, failure)] = attempts(tdsn, in_time.id)
    assert (attempt, outcome) == (1, "failed")
    assert failure.startswith("ValueError: the step's own error"), failure


# -- the elapsed-time fallback (in-process, SIGALRM owned by the test runner) -----------------


@pytest.mark.timeout(30)
def test_in_process_late_step_is_timed_out_by_the_elapsed_check(
    tdsn: str, worker: Worker, foreign_alarm: object
) -> None:
    """Under ``Worker.run_once`` in the pytest process SIGALRM is not armed (pytest-timeout's
    handler and timer are in place), so a step with timeout=0.3 sleeping 0.6 s is *not*
    interrupted; when it returns, the elapsed-time check records the try 'timed_out' and rolls
    its writes back, and the retry, which does not hang, succeeds. The runner's handler and
    timer are left exactly as they were."""
    timer_before = signal.getitimer(signal.ITIMER_REAL)
    t = jt.slow.enqueue({"sleep": 0.6, "hang_tries": 1})

    started = time.monotonic()
    assert worker.run_once() is True
    took = time.monotonic() - started

    assert took >= 0.6, "the step was cut short: SIGALRM was armed under the test runner"
    error = "StepTimeout: the step ran past its timeout of 0.3s"
    assert attempts(tdsn, t.id) == [(1, "timed_out", error)]
    assert task(tdsn, t.id) == ("pending", 1, error)
    assert effects(tdsn, t.id) == []
    assert signal.getsignal(signal.SIGALRM) is foreign_alarm
    remaining, _ = signal.getitimer(signal.ITIMER_REAL)
    assert 0 < remaining <= timer_before[0]

    query(tdsn, "UPDATE underway.task SET run_at = now() WHERE id = %s", (t.id,))
    assert worker.run_once() is True
    assert task(tdsn, t.id) == ("succeeded", 2, None)
    assert effects(tdsn, t.id) == [(2, "before the sleep"), (2, "after")]


@pytest.mark.timeout(30)
def test_in_process_step_timeout_overrides_the_jobs(
    tdsn: str, worker: Worker, foreign_alarm: object
) -> None:
    """The elapsed check uses the step's own timeout too: 0.3 s is too long for a step with
    timeout=0.2 in a job with timeout=60, but fine for the next step (the job's 60 s) and for
    a step with timeout=30 in a job with timeout=0.2."""
    over = jt.overrides.enqueue({"sleep_first": 0.3})
    fine = jt.overrides.enqueue({"sleep_first": 0, "sleep_second": 0.3})
    tight = jt.tight.enqueue({"sleep": 0.3})
    while worker.run_once():
        pass
    assert attempts(tdsn, over.id) == [
        (1, "timed_out", "StepTimeout: the step ran past its timeout of 0.2s")
    ]
    assert task(tdsn, fine.id)[0] == task(tdsn, tight.id)[0] == "succeeded"
    assert effects(tdsn, fine.id) == [(1, "first"), (1, "second")]
    assert effects(tdsn, tight.id) == [(1, "done")]


@pytest.mark.timeout(30)
def test_default_timeout_is_fifteen_minutes_and_bounds_the_steps_statements(
    tdsn: str, worker: Worker
) -> None:
    """A job without a timeout gives its steps 15 minutes: the step's deadline and the
    statement_timeout of its transaction are both (just under) 900 000 ms."""
    assert timedelta(minutes=15) == DEFAULT_TIMEOUT
    assert jt.probe.timeout == 900.0
    assert [s.timeout for s in jt.probe.steps] == [900.0]
    t = jt.probe.enqueue({})
    assert worker.run_once() is True
    ((_, text),) = effects(tdsn, t.id)
    found = re.fullmatch(r"deadline_ms=(\d+) statement_timeout_ms=(\d+)", text)
    assert found, text
    for value in map(int, found.groups()):
        assert 900_000 - 5_000 < value <= 900_000, text


# -- timeouts as defined ----------------------------------------------------------------------


def test_timeouts_as_defined(make_job) -> None:
    """Job timeouts accept seconds or a timedelta; a step takes the job's unless it sets its
    own with ``@job.step(timeout=...)``; the default is 15 minutes."""
    assert make_job().timeout == 900.0
    job = make_job(timeout=timedelta(seconds=90))

    @job.step
    def inherits(cx, inp):
        pass

    @job.step(timeout=2.5)
    def own(cx, inp):
        pass

    @job.step(timeout=timedelta(hours=1))
    def longer(cx, inp):
        pass

    assert job.timeout == 90.0
    assert [(s.name, s.timeout) for s in job.steps] == [
        ("inherits", 90.0),
        ("own", 2.5),
        ("longer", 3600.0),
    ]


BAD_TIMEOUTS = [
    pytest.param(0, id="zero"),
    pytest.param(0.0, id="zero-float"),
    pytest.param(timedelta(0), id="zero-timedelta"),
    pytest.param(None, id="none-for-a-job"),
    pytest.param(-1, id="negative"),
    pytest.param(timedelta(seconds=-1), id="negative-timedelta"),
    pytest.param(math.nan, id="nan"),
    pytest.param(math.inf, id="infinite"),
    pytest.param("x", id="string"),
    pytest.param(True, id="bool"),
]


@pytest.mark.parametrize("bad", BAD_TIMEOUTS)
def test_bad_job_timeout_is_refused_at_definition(make_job, bad) -> None:
    """Zero, negative, NaN, infinite and non-numeric job timeouts are refused when the job is
    defined (ValueError or TypeError), and no job is registered."""
    before = set(underway.job.registered_jobs())
    with pytest.raises((ValueError, TypeError)):
        make_job(timeout=bad)
    assert set(underway.job.registered_jobs()) == before


@pytest.mark.parametrize("bad", [p for p in BAD_TIMEOUTS if p.id != "none-for-a-job"])
def test_bad_step_timeout_is_refused_at_definition(make_job, bad) -> None:
    """The same timeouts are refused by ``@job.step(timeout=...)``, before any function is
    given, and no step is added."""
    job = make_job()
    with pytest.raises((ValueError, TypeError)):
        job.step(timeout=bad)
    assert job.steps == []


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(0, id="zero"),
        pytest.param(timedelta(0), id="zero-timedelta"),
        pytest.param(-1, id="negative"),
        pytest.param(timedelta(seconds=-1), id="negative-timedelta"),
        pytest.param(math.nan, id="nan"),
        pytest.param("x", id="string"),
    ],
)
def test_bad_timeout_error_names_the_job_and_the_timeout(make_job, bad) -> None:
    """The error for a bad timeout says which job and that its timeout is wrong, for the job's
    timeout and a step's alike."""
    job = make_job()
    for define in (lambda: make_job(timeout=bad), lambda: job.step(timeout=bad)):
        with pytest.raises((ValueError, TypeError)) as info:
            define()
        message = str(info.value)
        assert "timeout" in message and "job 'timeouts-tmp-" in message, message


def test_step_timeout_is_a_base_exception() -> None:
    """StepTimeout gets past ``except Exception:`` in a step's code."""
    assert issubclass(StepTimeout, BaseException)
    assert not issubclass(StepTimeout, Exception)


def test_failed_definition_leaves_the_job_usable(make_job) -> None:
    """A refused step timeout leaves the job as it was: a good step can still be added."""
    job = make_job(timeout=5)
    with pytest.raises(ValueError):
        job.step(timeout=0)

    @job.step
    def ok(cx, inp):
        pass

    assert [(s.name, s.timeout) for s in job.steps] == [("ok", 5.0)]
