"""Issue #13's API beside results, limits and cancellation: absolute run times, retry of
failed tasks, retry filters and jitter, schedules() and the pruning of schedule ticks, and
tasks of jobs no supervisor runs.

Steps are in ``tests/jobs_api.py``; an in-process :class:`~underway.worker.Worker` runs
them with ``run_once``. Upkeep units (``Retention``, ``UnhandledJobs``, ``Heartbeat``) and
the ``Scheduler`` are called with ``run_once`` on this test's database.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import jobs_api as ja
import psycopg2
import psycopg2.errors
import pytest
from jobs_api import attempts, effects, run_all
from jobs_faults import task_row

import underway
from underway import RetryPolicy, TaskState, admin
from underway.errors import UnderwayError
from underway.records import DeadLetterQueue, UnhandledJob
from underway.scheduler import Scheduler
from underway.upkeep import PURGE_CATCH_UP, PURGE_INTERVAL, Heartbeat, Retention, UnhandledJobs

from .helpers import query, scalar

# -- fixtures and helpers -------------------------------------------------------------------


def flag(dsn, name="deliver", on=True):
    """Raise (or lower) a flag that makes the flaky jobs' second step fail."""
    if on:
        query(dsn, "INSERT INTO api_flag VALUES (%s) ON CONFLICT DO NOTHING", (name,))
    else:
        query(dsn, "DELETE FROM api_flag WHERE name = %s", (name,))


def run_at_of(dsn, task_id):
    return scalar(dsn, "SELECT run_at FROM underway.task WHERE id = %s", (task_id,))


# == absolute run times ======================================================================


@pytest.mark.timeout(30)
def test_run_at_takes_an_aware_datetime_in_every_python_enqueue(adsn, make_worker):
    """enqueue, enqueue_many, a keyed enqueue and admin.enqueue take run_at (an aware
    datetime, in any zone): the task's run_at is that instant, and no worker runs it
    before; one in the past is ready at once."""
    when = datetime.now(timezone(timedelta(hours=5))).replace(microsecond=0) + timedelta(hours=2)
    one = ja.echo.enqueue({"n": 1}, run_at=when)
    many = ja.echo.enqueue_many([{"n": 2}, {"n": 3}], run_at=when)
    keyed = ja.echo.enqueue({"n": 4}, key="k", run_at=when)
    named = admin.enqueue("api-echo", {"n": 5}, run_at=when)
    for task_id in (one.id, *(t.id for t in many), keyed.id, named):
        assert run_at_of(adsn, task_id) == when
    w = make_worker(ja.echo)
    assert w.run_once() is False
    past = ja.echo.enqueue({"n": 6}, run_at=datetime.now(timezone.utc) - timedelta(days=1))
    assert w.run_once() is True
    assert past.result(timeout=0) == {"n": 6}
    assert w.run_once() is False


@pytest.mark.timeout(30)
def test_naive_run_at_and_run_at_with_delay_are_refused_in_python(adsn):
    """A naive datetime is refused with a ValueError saying it needs a time zone; a run_at
    that is not a datetime is a TypeError; delay and run_at together are refused. Nothing
    is written."""
    naive = datetime.now() + timedelta(hours=1)
    aware = datetime.now(timezone.utc) + timedelta(hours=1)
    for enqueue in (ja.echo.enqueue, ja.echo.enqueue_many):
        arg = [{"n": 1}] if enqueue == ja.echo.enqueue_many else {"n": 1}
        with pytest.raises(
            ValueError, match=r"run_at must be an aware datetime \(with a time zone"
        ):
            enqueue(arg, run_at=naive)
        with pytest.raises(ValueError, match="give delay or run_at, not both"):
            enqueue(arg, run_at=aware, delay=5)
        with pytest.raises(ValueError, match="give delay or run_at, not both"):
            enqueue(arg, run_at=aware, delay=0)
        with pytest.raises(TypeError, match="run_at must be a datetime"):
            enqueue(arg, run_at="2030-01-01T00:00:00+00:00")
    with pytest.raises(ValueError, match="aware datetime"):
        admin.enqueue("api-echo", {"n": 1}, run_at=naive)
    with pytest.raises(ValueError, match="give delay or run_at, not both"):
        admin.enqueue("api-echo", {"n": 1}, run_at=aware, delay=1)
    assert scalar(adsn, "SELECT count(*) FROM underway.task") == 0


@pytest.mark.timeout(30)
def test_run_at_in_sql(adsn):
    """underway.enqueue(..., run_at => ...) stores that instant; with a delay too it is
    refused (invalid_parameter_value) and writes nothing."""
    when = datetime(2031, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    task_id = scalar(adsn, "SELECT underway.enqueue('api-echo', '{}', run_at => %s)", (when,))
    assert run_at_of(adsn, task_id) == when
    with pytest.raises(psycopg2.errors.InvalidParameterValue, match="give delay or run_at"):
        query(adsn, "SELECT underway.enqueue('api-echo', '{}', delay => 5, run_at => %s)", (when,))
    assert scalar(adsn, "SELECT count(*) FROM underway.task") == 1


@pytest.mark.timeout(30)
def test_a_step_enqueues_at_an_absolute_time(adsn, make_worker):
    """A step's cx.enqueue(job, input, run_at=aware datetime) enqueues at that instant, in
    the step's transaction."""
    when = datetime(2031, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    task = ja.spawner.enqueue({"run_at": when.isoformat()})
    assert make_worker(ja.spawner).run_once() is True
    assert task.status() is TaskState.SUCCEEDED, task_row(adsn, task.id)["error"]
    spawned = task.result(timeout=0)
    assert run_at_of(adsn, spawned) == when


# == retry of failed tasks ==================================================================


@pytest.mark.timeout(30)
def test_retry_of_a_failed_task_resumes_at_the_failed_step_with_tries_renewed(adsn, make_worker):
    """A task without a dead-letter queue fails at step 1 (both tries). task.retry() puts the
    same task back (same id, no new row): pending at step 1, tries at 0, error cleared,
    history kept. Still failing, it gets both tries again; once the cause is gone, a
    second retry runs step 1 only, and result() returns its value."""
    w = make_worker()
    flag(adsn)
    task = ja.flaky.enqueue({"n": 1})
    run_all(w, adsn)
    failed_twice = [(0, 1, "succeeded"), (1, 1, "failed"), (1, 2, "failed")]
    assert attempts(adsn, task.id) == failed_twice
    assert task.status() is TaskState.FAILED

    assert task.retry() is None
    row = task_row(adsn, task.id)
    assert (row["state"], row["step"], row["attempts"], row["error"]) == ("pending", 1, 0, None)
    assert row["finished_at"] is None and row["expires_at"] is None
    assert scalar(adsn, "SELECT count(*) FROM underway.task") == 1
    assert attempts(adsn, task.id) == failed_twice

    run_all(w, adsn)
    assert attempts(adsn, task.id) == [*failed_twice, (1, 1, "failed"), (1, 2, "failed")]
    assert task.status() is TaskState.FAILED

    flag(adsn, on=False)
    task.retry()
    run_all(w, adsn)
    assert task.result(timeout=0) == {"delivered": {"prepared": {"n": 1}}}
    assert [n for _, _, n in effects(adsn, task.id)] == ["prepare", "deliver"]
    assert attempts(adsn, task.id)[-1] == (1, 1, "succeeded")
    assert scalar(adsn, "SELECT count(*) FROM underway.task") == 1


@pytest.mark.timeout(30)
def test_admin_retry_takes_dead_letters_back_by_id_or_by_job(adsn, make_worker):
    """admin.retry(ids) puts dead letters back (they leave the dead-letter queue) and
    returns their ids; admin.retry(job=...) puts back that job's failed tasks only (since a
    time, if given); giving both or neither is a ValueError."""
    w = make_worker()
    flag(adsn)
    a, b = ja.flaky_dlq.enqueue({"n": 1}), ja.flaky_dlq.enqueue({"n": 2})
    plain = ja.flaky.enqueue({"n": 3})
    run_all(w, adsn)
    assert [d.id for d in admin.dead_letters(ja.DEAD)] == [a.id, b.id]
    assert [d.id for d in admin.dead_letters(ja.DEAD, limit=1)] == [a.id]
    assert admin.dead_letter_queues() == [DeadLetterQueue(ja.DEAD, 2)]
    flag(adsn, on=False)

    assert admin.retry([a.id]) == [a.id]
    assert [d.id for d in admin.dead_letters(ja.DEAD)] == [b.id]
    run_all(w, adsn)
    assert a.result(timeout=0) == {"delivered": {"prepared": {"n": 1}}}

    assert admin.retry(job="api-flaky-dlq", since=datetime.now(timezone.utc)) == []
    assert admin.retry(job="api-flaky-dlq", since=timedelta(hours=1)) == [b.id]
    assert plain.status() is TaskState.FAILED
    assert admin.retry(job="api-flaky") == [plain.id]
    run_all(w, adsn)
    assert [t.status() for t in (a, b, plain)] == ["succeeded"] * 3
    assert admin.dead_letters(ja.DEAD) == []
    assert admin.dead_letter_queues() == []
    assert admin.retry(job="api-flaky") == []
    with pytest.raises(ValueError):
        admin.retry()
    with pytest.raises(ValueError):
        admin.retry([a.id], job="api-flaky")


@pytest.mark.timeout(30)
def test_retry_of_a_task_not_failed_raises_and_retries_nothing(adsn, make_worker):
    """Retrying a pending, succeeded or cancelled task, or one that does not exist, raises
    UnderwayError naming it and what it is; in a batch with failed tasks, nothing is
    retried (the failed ones stay failed, untouched)."""
    w = make_worker()
    flag(adsn)
    failed = ja.flaky.enqueue({"n": 1})
    done = ja.echo.enqueue({"n": 2})
    run_all(w, adsn)
    cancelled = ja.echo.enqueue({"n": 3}, delay=3600)
    cancelled.cancel()
    pending = ja.echo.enqueue({"n": 4}, delay=3600)
    before = task_row(adsn, failed.id)

    for task, what in ((done, "succeeded"), (cancelled, "cancelled"), (pending, "pending")):
        with pytest.raises(UnderwayError, match=f"task {task.id} is {what}, not failed"):
            task.retry()
        with pytest.raises(UnderwayError, match=f"task {task.id} is {what}, not failed"):
            admin.retry([failed.id, task.id])
    with pytest.raises(UnderwayError, match=f"task {10**12} does not exist"):
        admin.retry([failed.id, 10**12])
    assert task_row(adsn, failed.id) == before
    assert [t.status() for t in (done, cancelled, pending)] == ["succeeded", "cancelled", "pending"]
    assert admin.retry([failed.id, failed.id]) == [failed.id]


@pytest.mark.timeout(30)
def test_retry_of_a_keyed_task_whose_key_another_task_now_holds(adsn, make_worker):
    """A task with job key 'k' fails; a new task with key 'k' is enqueued (the failed one no
    longer holds it). Retrying the failed one must either be refused with an UnderwayError
    that changes nothing, or put it back without taking the key from the new task; never
    a raw database error, and never two holders of the key."""
    w = make_worker()
    flag(adsn)
    old = ja.flaky.enqueue({"n": 1}, key="k")
    run_all(w, adsn)
    assert old.status() is TaskState.FAILED
    new = ja.flaky.enqueue({"n": 2}, key="k", delay=3600)
    assert new.id != old.id
    try:
        old.retry()
    except UnderwayError:
        assert old.status() is TaskState.FAILED
    holders = query(
        adsn,
        "SELECT id FROM underway.task WHERE key = 'k' AND state IN ('pending', 'running')",
    )
    assert holders == [(new.id,)]


# == retry filters and jitter ===============================================================


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("raised", "retried"),
    [
        ("ConnectionError", True),
        ("ConnectionRefusedError", True),  # a subclass of a listed type
        ("ValueError", False),
        ("Fatal", False),
    ],
)
def test_retry_on_retries_only_the_listed_errors(adsn, make_worker, raised, retried):
    """RetryPolicy(retry_on=(ConnectionError,), max_attempts=3): a ConnectionError (or a
    subclass) is retried, and the third try succeeds; any other error fails the task at
    once, as Fatal does: one try, failed."""
    task = ja.picky.enqueue({"raise": raised})
    run_all(make_worker(ja.picky), adsn)
    if retried:
        assert attempts(adsn, task.id) == [(0, 1, "failed"), (0, 2, "failed"), (0, 3, "succeeded")]
        assert task.result(timeout=0) == "made it"
    else:
        assert attempts(adsn, task.id) == [(0, 1, "failed")]
        assert task_row(adsn, task.id)["error"] == f"{raised}: {raised} on try 1"


def test_retry_on_is_checked_and_normalised():
    """retry_on takes one exception type or several (kept as a tuple); anything else is a
    TypeError."""
    assert RetryPolicy(retry_on=ConnectionError).retry_on == (ConnectionError,)
    assert RetryPolicy(retry_on=[KeyError, OSError]).retry_on == (KeyError, OSError)
    for bad in ("ConnectionError", [ValueError, 3], (int,)):
        with pytest.raises(TypeError, match="retry_on must be exception types"):
            RetryPolicy(retry_on=bad)


def test_jitter_spreads_the_backoff_between_half_and_all_of_the_wait():
    """With jitter, 1000 waits after the same try lie between half the computed wait and
    all of it, are not all equal, and fill the range (the lowest under 55%, the highest
    over 95% of it); without jitter they are all exactly the computed wait."""
    policy = RetryPolicy(initial_interval=2.0, backoff_coefficient=3.0, max_interval=100.0)
    jittery = RetryPolicy(
        initial_interval=2.0, backoff_coefficient=3.0, max_interval=100.0, jitter=True
    )
    for attempt, wait in ((1, 2.0), (3, 18.0), (10, 100.0)):
        assert {policy.delay(attempt) for _ in range(100)} == {wait}
        delays = [jittery.delay(attempt) for _ in range(1000)]
        assert all(wait / 2 <= d <= wait for d in delays), (attempt, min(delays), max(delays))
        assert len(set(delays)) > 900
        assert min(delays) < 0.55 * wait and max(delays) > 0.95 * wait


# == schedules and their ticks ================================================================


def next_multiple_of_five_minutes(after):
    """The first instant after ``after`` at a whole five minutes (UTC)."""
    base = after.astimezone(timezone.utc).replace(second=0, microsecond=0)
    minute = base.minute - base.minute % 5
    candidate = base.replace(minute=minute)
    while candidate <= after:
        candidate += timedelta(minutes=5)
    return candidate


@pytest.mark.timeout(30)
def test_schedules_lists_stored_schedules_with_their_next_fire(adsn):
    """underway.schedules() lists every stored schedule (by job, then name) with its
    expression, zone, input, catch_up, last fire and next fire; the next fire of
    '*/5 * * * *' is the next whole five minutes, that of a Berlin Monday-9:00 schedule is
    the next Monday at 9:00 in Berlin. Once a tick fired, last_fire is it and next_fire
    comes after it."""
    ja.echo.schedule("*/5 * * * *", {"x": 1})
    ja.chain.schedule("0 9 * * MON[Europe/Berlin]", {"n": 1}, name="weekly", catch_up=False)
    before = datetime.now(timezone.utc)
    found = underway.schedules()
    after = datetime.now(timezone.utc)
    assert [(s.job, s.name) for s in found] == [("api-chain", "weekly"), ("api-echo", "default")]
    weekly, five = found
    assert (five.expression, five.zone, five.input, five.catch_up) == (
        "*/5 * * * *[UTC]",
        "UTC",
        {"x": 1},
        True,
    )
    assert five.last_fire is None
    assert five.next_fire in {
        next_multiple_of_five_minutes(before),
        next_multiple_of_five_minutes(after),
    }
    assert (weekly.zone, weekly.input, weekly.catch_up) == ("Europe/Berlin", {"n": 1}, False)
    berlin = weekly.next_fire.astimezone(ZoneInfo("Europe/Berlin"))
    assert (berlin.weekday(), berlin.hour, berlin.minute) == (0, 9, 0)
    assert timedelta(0) < weekly.next_fire - before <= timedelta(days=7)

    # Fire the tick five minutes on, as a scheduler would then.
    query(adsn, "UPDATE underway.schedule SET updated_at = now() - interval '1 hour'")
    scheduler = Scheduler(adsn, {ja.echo.name: ja.echo})
    try:
        scheduler.run_once(now=after + timedelta(minutes=5))
    finally:
        scheduler.disconnect()
    [five] = [s for s in underway.schedules() if s.job == "api-echo"]
    assert five.last_fire == next_multiple_of_five_minutes(after)
    assert five.next_fire == five.last_fire + timedelta(minutes=5)


def old_ticks(dsn, job, name, fire_ats, handled_ago):
    """Record fired ticks of a schedule, handled ``handled_ago`` before now."""
    for fire_at in fire_ats:
        query(
            dsn,
            "INSERT INTO underway.schedule_tick (job, name, fire_at, task_id, handled_at)"
            " VALUES (%s, %s, %s, 1, now() - %s)",
            (job, name, fire_at, handled_ago),
        )


def ticks(dsn):
    return query(dsn, "SELECT job, name, fire_at FROM underway.schedule_tick ORDER BY 1, 2, 3")


@pytest.mark.timeout(30)
def test_retention_keeps_pace_with_a_busy_queue(adsn, cur):
    """A pass that runs out of time with expired tasks left comes back after a second, not
    a minute; passes then delete the rest (and never an unexpired task), and once nothing
    expired is left, the next pass is a minute away again."""
    query(
        adsn,
        "INSERT INTO underway.task (job, input, state, finished_at, expires_at) "
        "SELECT 'api-echo', '{}', 'succeeded', now(), now() - interval '1 second' * g "
        "FROM generate_series(1, 2500) AS g",
    )
    query(
        adsn,
        "INSERT INTO underway.task (job, input, state, finished_at, expires_at) "
        "SELECT 'api-echo', '{}', 'succeeded', now(), now() + interval '1 hour' "
        "FROM generate_series(1, 10)",
    )
    hurried = Retention(batch=100, budget=0.0)
    hurried.run_once(cur)
    assert scalar(adsn, "SELECT count(*) FROM underway.task") == 2410
    assert hurried.interval == PURGE_CATCH_UP

    unhurried = Retention(batch=100, budget=60.0)
    unhurried.run_once(cur)
    assert scalar(adsn, "SELECT count(*) FROM underway.task WHERE expires_at <= now()") == 0
    assert scalar(adsn, "SELECT count(*) FROM underway.task") == 10
    assert unhurried.interval == PURGE_INTERVAL


@pytest.mark.timeout(30)
def test_retention_prunes_old_ticks_but_keeps_each_schedules_latest(adsn, cur):
    """A schedule firing every minute has 73 ticks handled two days ago (hourly over three
    days, up to this minute's) and two handled an hour ago; a removed schedule has three
    old ticks. Retention().run_once deletes the ticks handled over a day ago except each
    schedule's latest, and keeps the recent ones. Exactly-once still holds: a scheduler
    at this minute fires nothing (the latest tick, kept, is its anchor), and fires the
    next minute's tick when it comes."""
    ja.echo.schedule("* * * * *", {"tick": True})
    query(adsn, "UPDATE underway.schedule SET updated_at = now() - interval '4 days'")
    latest = scalar(adsn, "SELECT date_trunc('minute', now())")
    hourly = [latest - timedelta(hours=h) for h in range(72, 0, -1)]
    old_ticks(adsn, "api-echo", "default", [*hourly, latest], timedelta(days=2))
    recent = [latest - timedelta(minutes=90), latest - timedelta(minutes=30)]
    old_ticks(adsn, "api-echo", "default", recent, timedelta(hours=1))
    gone = [latest - timedelta(days=d) for d in (5, 4, 3)]
    old_ticks(adsn, "api-echo", "removed", gone, timedelta(days=2))

    Retention().run_once(cur)
    assert ticks(adsn) == [
        ("api-echo", "default", recent[0]),
        ("api-echo", "default", recent[1]),
        ("api-echo", "default", latest),
        ("api-echo", "removed", gone[-1]),
    ]
    Retention().run_once(cur)
    assert len(ticks(adsn)) == 4

    scheduler = Scheduler(adsn, {ja.echo.name: ja.echo})
    try:
        scheduler.run_once(now=latest + timedelta(seconds=30))
        assert scalar(adsn, "SELECT count(*) FROM underway.task") == 0
        scheduler.run_once(now=latest + timedelta(seconds=90))
    finally:
        scheduler.disconnect()
    assert query(adsn, "SELECT scheduled_at FROM underway.task") == [
        (latest + timedelta(minutes=1),)
    ]


# == tasks of jobs no supervisor runs ==========================================================


def enqueue_waiting(dsn, job, count, waited="2 minutes"):
    """Enqueue ``count`` tasks of ``job`` from SQL, due ``waited`` ago."""
    for _ in range(count):
        task_id = scalar(dsn, "SELECT underway.enqueue(%s, '{}')", (job,))
        query(
            dsn,
            "UPDATE underway.task SET run_at = now() - %s::interval WHERE id = %s",
            (waited, task_id),
        )


def beat_ago(dsn, interval):
    """Make the supervisors' last heartbeat ``interval`` old, as if they stopped beating."""
    query(
        dsn,
        "UPDATE underway.supervisor SET heartbeat_at = heartbeat_at - %s::interval,"
        " alive_until = alive_until - %s::interval",
        (interval, interval),
    )


@pytest.mark.timeout(30)
def test_unhandled_jobs_lists_waiting_tasks_no_live_supervisor_runs(adsn, cur):
    """admin.unhandled_jobs() lists, per job, the tasks waiting over a minute that no live
    supervisor runs (a job renamed, or enqueued from SQL by mistake); never a job a live
    supervisor runs (its heartbeat is recent), nor tasks younger than a minute, delayed,
    running or finished. Once that supervisor's heartbeat is old, its job is listed too."""
    Heartbeat(30.0, ["api-echo", "api-chain"], lambda: []).run_once(cur)
    enqueue_waiting(adsn, "api-ghost", 3)
    enqueue_waiting(adsn, "api-renamed", 1)
    enqueue_waiting(adsn, "api-ghost", 2, waited="30 seconds")  # too young
    enqueue_waiting(adsn, "api-echo", 2)  # a live supervisor runs it
    query(adsn, "SELECT underway.enqueue('api-later', '{}', delay => 3600)")
    enqueue_waiting(adsn, "api-failed", 1)
    query(adsn, "UPDATE underway.task SET state = 'failed' WHERE job = 'api-failed'")

    assert admin.unhandled_jobs() == [UnhandledJob("api-ghost", 3), UnhandledJob("api-renamed", 1)]
    beat_ago(adsn, "5 minutes")
    assert admin.unhandled_jobs() == [
        UnhandledJob("api-echo", 2),
        UnhandledJob("api-ghost", 3),
        UnhandledJob("api-renamed", 1),
    ]


@pytest.mark.timeout(30)
def test_supervisor_logs_unhandled_jobs(adsn, cur, caplog):
    """The supervisor's UnhandledJobs unit (once a minute) logs a warning per unhandled job:
    "N tasks of job X wait, which no running supervisor handles", with the job and count
    as structured fields; nothing about a job a live supervisor runs."""
    Heartbeat(30.0, ["api-echo"], lambda: []).run_once(cur)
    enqueue_waiting(adsn, "api-ghost", 3)
    enqueue_waiting(adsn, "api-echo", 2)
    unit = UnhandledJobs()
    assert unit.interval == 60
    caplog.set_level(logging.WARNING, logger="underway.supervisor")
    unit.run_once(cur)
    lines = [r for r in caplog.records if getattr(r, "event", None) == "job_unhandled"]
    assert [(r.job, r.tasks) for r in lines] == [("api-ghost", 3)], caplog.text
    assert "3 tasks of job 'api-ghost' wait, which no running supervisor handles" in (
        lines[0].getMessage()
    )


@pytest.mark.timeout(30)
def test_a_live_supervisor_with_a_longer_lease_is_never_reported(adsn, cur, caplog):
    """During a rolling deploy, supervisors may run with different leases. One with the
    default lease (30 s: heartbeat every 10 s) last beat 5 s ago: it is alive, and the
    UnhandledJobs unit of a supervisor started with --lease 3 must not report its job's
    waiting tasks."""
    Heartbeat(30.0, ["api-echo"], lambda: []).run_once(cur)
    beat_ago(adsn, "5 seconds")
    enqueue_waiting(adsn, "api-echo", 2)
    caplog.set_level(logging.WARNING, logger="underway.supervisor")
    UnhandledJobs().run_once(cur)
    assert [r for r in caplog.records if getattr(r, "event", None) == "job_unhandled"] == []
