"""Cron schedules end to end: storing them, firing their ticks exactly once, missed ticks,
DST through the scheduler, and the scheduler process beside a real supervisor's workers.

Two kinds of test:

* Clock-injected, in-process: ``Scheduler(dsn, jobs).run_once(now=...)`` with an aware
  ``now`` of our choosing, so DST days and hours of outage pass in milliseconds. A schedule is
  placed in the past by setting its ``updated_at`` (ticks at or before it never fire).
* Real processes: ``python -m underway.supervisor jobs_scheduler`` with a per-second schedule
  (``*/1 * * * * *``, leading seconds field), observed only through the database.

Every run of a job in ``tests/jobs_scheduler.py`` writes a ``sched_runs`` row (no unique
constraint) with the ``cx.scheduled_at`` it saw, so a tick run twice would show up twice.
Nothing sleeps: tests poll with ``wait_until`` and a deadline.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import jobs_scheduler
import psycopg2
import pytest
from jobs_scheduler import JOBS, marker, report

import underway
import underway.cron
from underway import store
from underway.scheduler import Scheduler
from underway.worker import Worker

from .helpers import Supervisor, query, scalar, wait_until

MODULE = "jobs_scheduler"
UTC = timezone.utc
EVERY_SECOND = "*/1 * * * * *"
#: Generous deadline for things a supervisor does "within a few seconds".
SOON = 20.0


def utc(*args: int) -> datetime:
    """An aware UTC datetime."""
    return datetime(*args, tzinfo=UTC)


# -- fixtures and database helpers ------------------------------------------------------------


@pytest.fixture
def runs(dsn):
    """The ``sched_runs`` table the jobs' steps write to."""
    jobs_scheduler.prepare(dsn)


@pytest.fixture
def make_scheduler(dsn):
    """Make in-process schedulers (each with its own connection), closed afterwards."""
    made = []

    def make(**options):
        scheduler = Scheduler(dsn, JOBS, **options)
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.disconnect()


def place_in_past(dsn, when, name="default"):
    """Pretend ``report``'s schedule ``name`` was stored at ``when``."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "UPDATE underway.schedule SET updated_at = %s WHERE job = %s AND name = %s",
                (when, report.name, name),
            )
            assert cur.rowcount == 1, f"no schedule {name!r} to move"
    finally:
        conn.close()


def schedule_rows(dsn):
    """Every stored schedule as (job, name, expression, input, catch_up)."""
    return query(
        dsn,
        "SELECT job, name, expression, input, catch_up FROM underway.schedule ORDER BY job, name",
    )


def schedule_count(dsn):
    return scalar(dsn, "SELECT count(*) FROM underway.schedule")


def scheduled_tasks(dsn):
    """Tasks enqueued by a schedule, as (id, job, scheduled_at, input), oldest first."""
    return query(
        dsn,
        "SELECT id, job, scheduled_at, input FROM underway.task"
        " WHERE scheduled_at IS NOT NULL ORDER BY id",
    )


def task_count(dsn):
    return scalar(dsn, "SELECT count(*) FROM underway.task")


def tick_rows(dsn):
    """``underway.schedule_tick`` as (name, fire_at, task_id), in fire order."""
    return query(dsn, "SELECT name, fire_at, task_id FROM underway.schedule_tick ORDER BY fire_at")


def db_now(dsn):
    return scalar(dsn, "SELECT clock_timestamp()")


def run_count(cur, where="TRUE", params=()):
    cur.execute(f"SELECT count(*) FROM sched_runs WHERE {where}", params)
    return cur.fetchone()[0]


def supervisor(dsn, *args):
    """A supervisor for ``jobs_scheduler`` with one worker (not yet started)."""
    return Supervisor([MODULE], dsn, ["--workers", "1", *args])


def backends(cur):
    """(role, pid, state, query) of every ``underway <role> <pid>`` backend of this database."""
    cur.execute(
        "SELECT application_name, coalesce(state, ''), coalesce(query, '') FROM pg_stat_activity"
        " WHERE datname = current_database()"
        " AND application_name ~ '^underway (supervisor|worker|scheduler) [0-9]+$'"
    )
    result = []
    for name, state, text in cur.fetchall():
        _, role, pid = name.split(" ")
        result.append((role, int(pid), state, text))
    return result


def roles_of(cur, sup):
    """The sorted roles of the backends opened by ``sup`` and its child processes."""
    pids = {sup.pid, *sup.worker_pids()}
    return sorted(role for role, pid, _, _ in backends(cur) if pid in pids)


def stop_gracefully(*sups):
    """SIGTERM each supervisor and check it exits with status 0."""
    for sup in sups:
        sup.signal(signal.SIGTERM)
    for sup in sups:
        assert sup.wait(timeout=SOON) == 0, repr(sup)


# -- the API: storing and removing schedules --------------------------------------------------


def test_schedule_stores_replaces_and_unschedule_removes(dsn):
    """job.schedule stores one row per (job, name), replaces it on a second call, a second
    name adds a row, and unschedule removes one, returning whether there was one."""
    stored = report.schedule("@daily[America/Los_Angeles]", {"kind": "sales"})
    assert stored == underway.ZonedSchedule.parse("@daily[America/Los_Angeles]")
    rows = schedule_rows(dsn)
    assert len(rows) == 1
    job, name, expression, inp, catch_up = rows[0]
    assert (job, name, inp, catch_up) == ("sched-report", "default", {"kind": "sales"}, True)
    # What is stored parses back to the same schedule.
    assert underway.ZonedSchedule.parse(expression) == stored

    report.schedule("@daily[America/Los_Angeles]", {"kind": "returns"}, catch_up=False)
    assert schedule_rows(dsn) == [(job, "default", expression, {"kind": "returns"}, False)]

    report.schedule("*/15 8-18 * * MON-FRI[Europe/Berlin]", name="office-hours")
    assert [(r[1], r[3]) for r in schedule_rows(dsn)] == [
        ("default", {"kind": "returns"}),
        ("office-hours", None),
    ]

    assert report.unschedule() is True
    assert [r[1] for r in schedule_rows(dsn)] == ["office-hours"]
    assert report.unschedule() is False
    assert report.unschedule(name="office-hours") is True
    assert report.unschedule(name="office-hours") is False
    assert schedule_count(dsn) == 0


def test_storing_the_same_schedule_again_keeps_its_missed_ticks(dsn):
    """Re-storing an unchanged schedule (as an app does at start-up) keeps updated_at, so
    ticks missed meanwhile are still caught up; a real change starts afresh."""
    report.schedule("0 * * * *", {"kind": "x"})
    sql = "SELECT updated_at FROM underway.schedule WHERE job = %s"
    query(dsn, "UPDATE underway.schedule SET updated_at = now() - interval '5 hours'")
    before = scalar(dsn, sql, (report.name,))
    report.schedule("0 * * * *", {"kind": "x"})
    assert scalar(dsn, sql, (report.name,)) == before
    report.schedule("0 * * * *", {"kind": "y"})
    assert scalar(dsn, sql, (report.name,)) > before


@pytest.mark.parametrize(
    ("expression", "named"),
    [
        ("61 * * * *", "minute"),
        ("0 25 * * *", "hour"),
        ("0 * * * *[Mars/Olympus_Mons]", "Mars/Olympus_Mons"),
        ("@daily[America/New_Yrok]", "America/New_Yrok"),
        ("* * * *", "5 fields"),
        ("@fortnightly", "@fortnightly"),
    ],
)
def test_bad_expression_raises_value_error_and_stores_nothing(dsn, expression, named):
    """A malformed expression or unknown zone raises ValueError naming the bad part, and
    neither adds a schedule nor touches the stored one of the same name."""
    report.schedule("0 9 * * *[UTC]", {"v": "kept"})
    before = schedule_rows(dsn)
    with pytest.raises(ValueError, match=named.replace("*", r"\*")):
        report.schedule(expression, {"v": "bad"})
    with pytest.raises(ValueError, match=named.replace("*", r"\*")):
        report.schedule(expression, {"v": "bad"}, name="other")
    assert schedule_rows(dsn) == before
    assert schedule_count(dsn) == 1


@pytest.mark.parametrize("bad_input", [object(), {"when": datetime(2027, 1, 1)}, {1, 2}])
def test_non_json_input_raises_type_error_and_stores_nothing(dsn, bad_input):
    """An input that is not JSON-serialisable raises TypeError and stores nothing."""
    with pytest.raises(TypeError, match="sched-report"):
        report.schedule("0 9 * * *", bad_input)
    assert schedule_count(dsn) == 0


def test_zoned_schedule_is_exported():
    """underway.ZonedSchedule is the cron class, in __all__, and parse() reads the zone."""
    assert "ZonedSchedule" in underway.__all__
    assert underway.ZonedSchedule is underway.cron.ZonedSchedule
    parsed = underway.ZonedSchedule.parse("30 2 * * *[America/New_York]")
    assert (parsed.expression, parsed.zone_name) == ("30 2 * * *", "America/New_York")


# -- firing, with an injected clock ------------------------------------------------------------


def test_due_tick_fires_once_with_stored_input_and_worker_sees_scheduled_at(
    dsn, runs, make_scheduler
):
    """A */15 schedule fires the :15 tick exactly once, as a task with scheduled_at = the tick
    and the stored input; repeated or later run_once before :30 fires nothing; a worker runs it
    and the step sees cx.scheduled_at == the tick (and None for a plain enqueue)."""
    report.schedule("*/15 * * * *", {"kind": "quarter"})
    place_in_past(dsn, utc(2027, 6, 1, 12, 5))
    scheduler = make_scheduler(poll_interval=3600)

    # Just before the tick: nothing, and the scheduler would wake in one second.
    assert scheduler.run_once(utc(2027, 6, 1, 12, 14, 59)) == pytest.approx(1.0)
    assert task_count(dsn) == 0

    # At the tick: one task; it would next wake at 12:30.
    assert scheduler.run_once(utc(2027, 6, 1, 12, 15)) == pytest.approx(900.0)
    for now in (utc(2027, 6, 1, 12, 15), utc(2027, 6, 1, 12, 22), utc(2027, 6, 1, 12, 29, 59)):
        scheduler.run_once(now)
    tasks = scheduled_tasks(dsn)
    assert [(job, at, inp) for _, job, at, inp in tasks] == [
        ("sched-report", utc(2027, 6, 1, 12, 15), {"kind": "quarter"})
    ]
    task_id = tasks[0][0]
    assert task_count(dsn) == 1
    assert tick_rows(dsn) == [("default", utc(2027, 6, 1, 12, 15), task_id)]

    plain = marker.enqueue({"plain": True})
    worker = Worker(dsn, JOBS)
    try:
        assert worker.run_once()
        assert worker.run_once()
        assert not worker.run_once()
    finally:
        worker.disconnect()
    assert query(dsn, "SELECT task_id, job, scheduled_at, input FROM sched_runs ORDER BY id") == [
        (task_id, "sched-report", utc(2027, 6, 1, 12, 15), {"kind": "quarter"}),
        (plain.id, "sched-marker", None, {"plain": True}),
    ]

    # The next tick does fire.
    scheduler.run_once(utc(2027, 6, 1, 12, 30))
    assert [at for _, _, at, _ in scheduled_tasks(dsn)] == [
        utc(2027, 6, 1, 12, 15),
        utc(2027, 6, 1, 12, 30),
    ]


def test_concurrent_schedulers_fire_each_tick_once(dsn, make_scheduler):
    """Four schedulers on four connections, released together by a barrier for each of 20
    ticks, enqueue every tick exactly once."""
    report.schedule("* * * * *", {"kind": "race"})
    start = utc(2027, 6, 1, 12, 0, 30)
    place_in_past(dsn, start)
    schedulers = [make_scheduler() for _ in range(4)]
    for scheduler in schedulers:
        scheduler.connect()
    ticks = [utc(2027, 6, 1, 12, 1) + timedelta(minutes=k) for k in range(20)]
    barrier = threading.Barrier(len(schedulers))
    errors: list[BaseException] = []

    def race(scheduler):
        try:
            for now in ticks:
                barrier.wait(timeout=10)
                scheduler.run_once(now)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=race, args=(s,)) for s in schedulers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    assert query(dsn, "SELECT scheduled_at, count(*) FROM underway.task GROUP BY 1 ORDER BY 1") == [
        (tick, 1) for tick in ticks
    ]
    assert [(name, at) for name, at, _ in tick_rows(dsn)] == [("default", t) for t in ticks]


def test_new_scheduler_after_restart_does_not_fire_the_same_tick_again(dsn, make_scheduler):
    """A tick fired by one Scheduler is not fired again by a new Scheduler object (a restart)
    at the same or a later now before the next tick; the next tick still fires."""
    report.schedule("0 * * * *", {"kind": "hourly"})
    place_in_past(dsn, utc(2027, 6, 1, 11, 30))
    first = make_scheduler()
    first.run_once(utc(2027, 6, 1, 12, 0, 5))
    first.disconnect()
    assert [at for _, _, at, _ in scheduled_tasks(dsn)] == [utc(2027, 6, 1, 12)]

    restarted = make_scheduler()
    restarted.run_once(utc(2027, 6, 1, 12, 0, 5))
    restarted.run_once(utc(2027, 6, 1, 12, 59, 59))
    assert task_count(dsn) == 1
    restarted.run_once(utc(2027, 6, 1, 13))
    assert [at for _, _, at, _ in scheduled_tasks(dsn)] == [
        utc(2027, 6, 1, 12),
        utc(2027, 6, 1, 13),
    ]


def test_missed_ticks_enqueue_only_the_latest_and_are_logged(dsn, make_scheduler, caplog):
    """After five hours without a scheduler, an hourly schedule enqueues exactly one task
    (the latest tick), logs a warning counting the 4 ticks passed over, and a later run_once
    within the same hour enqueues nothing."""
    caplog.set_level(logging.INFO, logger="underway.scheduler")
    report.schedule("0 * * * *", {"kind": "hourly"})
    now = utc(2027, 6, 1, 12, 30)
    place_in_past(dsn, now - timedelta(hours=5))  # 07:30: ticks 08:00 ... 12:00 are due
    scheduler = make_scheduler()
    scheduler.run_once(now)

    assert [(at, inp) for _, _, at, inp in scheduled_tasks(dsn)] == [
        (utc(2027, 6, 1, 12), {"kind": "hourly"})
    ]
    missed = [
        r
        for r in caplog.records
        if r.name == "underway.scheduler" and getattr(r, "event", None) == "ticks_skipped"
    ]
    assert len(missed) == 1, caplog.text
    assert missed[0].levelno == logging.WARNING
    assert "missed 4 ticks" in missed[0].getMessage()

    caplog.clear()
    scheduler.run_once(utc(2027, 6, 1, 12, 45))
    scheduler.run_once(utc(2027, 6, 1, 12, 59, 59))
    assert task_count(dsn) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_catch_up_false_passes_over_a_late_tick_and_fires_the_next(dsn, make_scheduler, caplog):
    """With catch_up=False a tick found 30 minutes late is recorded as passed over (no task,
    tick row with task_id NULL, a warning) and not reported again; the next hour's tick, run
    at its time, is enqueued."""
    caplog.set_level(logging.INFO, logger="underway.scheduler")
    report.schedule("0 * * * *", {"kind": "strict"}, catch_up=False)
    place_in_past(dsn, utc(2027, 6, 1, 11, 45))
    scheduler = make_scheduler()

    scheduler.run_once(utc(2027, 6, 1, 12, 30))
    assert task_count(dsn) == 0
    assert tick_rows(dsn) == [("default", utc(2027, 6, 1, 12), None)]
    passed = [r for r in caplog.records if getattr(r, "event", None) == "tick_skipped"]
    assert len(passed) == 1 and passed[0].levelno == logging.WARNING, caplog.text

    caplog.clear()
    scheduler.run_once(utc(2027, 6, 1, 12, 45))
    assert task_count(dsn) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text

    scheduler.run_once(utc(2027, 6, 1, 13))
    assert [(at, inp) for _, _, at, inp in scheduled_tasks(dsn)] == [
        (utc(2027, 6, 1, 13), {"kind": "strict"})
    ]


def test_catch_up_false_fires_within_misfire_grace_only(dsn, make_scheduler):
    """With catch_up=False and misfire_grace=60, a tick found 59 s late still fires; one found
    61 s late is passed over (tick recorded with task_id NULL)."""
    report.schedule("0 0 12 * * *", {"late": 59}, name="on-time", catch_up=False)
    report.schedule("58 59 11 * * *", {"late": 61}, name="too-late", catch_up=False)
    place_in_past(dsn, utc(2027, 6, 1, 11, 30), name="on-time")
    place_in_past(dsn, utc(2027, 6, 1, 11, 30), name="too-late")
    make_scheduler(misfire_grace=60).run_once(utc(2027, 6, 1, 12, 0, 59))
    assert [(at, inp) for _, _, at, inp in scheduled_tasks(dsn)] == [
        (utc(2027, 6, 1, 12), {"late": 59})
    ]
    ticks = {name: (at, task_id) for name, at, task_id in tick_rows(dsn)}
    assert ticks["too-late"] == (utc(2027, 6, 1, 11, 59, 58), None)
    assert ticks["on-time"][1] is not None


# -- a schedule that can never fire again -------------------------------------------------------

#: Every 30 minutes from 02:00 to 02:59 on the second Sunday of March, in New York. That hour
#: is skipped by the spring-forward change on that very day every year since 2007, and this is
#: an interval schedule (two minutes match), so by the DST rule it fires never again; yet it
#: did fire before 2007 and in croniter's naive calendar, so it parses.
NEVER_AGAIN = "*/30 2 * 3 sun#2[America/New_York]"


def test_a_schedule_that_never_fires_again_does_not_stop_the_others(dsn, make_scheduler):
    """A stored schedule with no future tick is skipped, and the other schedules of
    the same scheduler turn still fire."""
    # Stored in SQL, as by an older version or before a time-zone rule change: whatever
    # Job.schedule accepts, the scheduler must cope with what is in the table.
    query(
        dsn,
        "INSERT INTO underway.schedule (job, name, expression, input, updated_at)"
        " VALUES (%s, 'a-never-again', %s, '{}', %s)",
        (report.name, NEVER_AGAIN, utc(2027, 6, 1, 11, 30)),
    )
    report.schedule("0 * * * *", {"kind": "hourly"}, name="b-hourly")
    place_in_past(dsn, utc(2027, 6, 1, 11, 30), name="b-hourly")
    make_scheduler().run_once(utc(2027, 6, 1, 12, 0, 1))
    assert [(at, inp) for _, _, at, inp in scheduled_tasks(dsn)] == [
        (utc(2027, 6, 1, 12), {"kind": "hourly"})
    ]


def test_schedule_that_never_fires_again_is_refused(dsn):
    """job.schedule refuses, with ValueError and nothing stored, a schedule whose every future
    wall time falls in a DST gap."""
    try:
        report.schedule(NEVER_AGAIN, {"kind": "never"})
    except ValueError as exc:
        assert "sun#2" in str(exc), "the error names the schedule"
    else:
        raise AssertionError(f"stored {NEVER_AGAIN!r}, which never fires again")
    assert schedule_count(dsn) == 0


# -- never before it was stored ----------------------------------------------------------------


@pytest.mark.parametrize("offset", [timedelta(seconds=1), timedelta(0)])
def test_tick_at_or_before_the_store_never_fires(dsn, make_scheduler, offset):
    """A tick 1 s before (or exactly at) the schedule's updated_at is never enqueued, however
    late the scheduler looks; the first tick after it is."""
    report.schedule("* * * * *", {"kind": "fresh"})
    place_in_past(dsn, utc(2027, 6, 1, 12) + offset)
    scheduler = make_scheduler()
    for now in (utc(2027, 6, 1, 12), utc(2027, 6, 1, 12, 0, 30), utc(2027, 6, 1, 12, 0, 59)):
        scheduler.run_once(now)
    assert task_count(dsn) == 0
    assert tick_rows(dsn) == []
    scheduler.run_once(utc(2027, 6, 1, 12, 1))
    assert [at for _, _, at, _ in scheduled_tasks(dsn)] == [utc(2027, 6, 1, 12, 1)]


def test_schedule_stored_now_does_not_fire_its_past_ticks(dsn, make_scheduler, conn):
    """A per-second schedule stored just now fires nothing at its own updated_at, and
    underway.fire_tick itself refuses ticks 1 s before and at updated_at (a scheduler with a
    stale view cannot enqueue them), leaving no tick row; 1 s after, it enqueues."""
    report.schedule(EVERY_SECOND, {"kind": "fresh"})
    stored = scalar(dsn, "SELECT updated_at FROM underway.schedule")
    make_scheduler().run_once(stored)
    assert task_count(dsn) == 0

    def fire(at):
        with conn.cursor() as cur:
            return store.fire_tick(cur, report.name, "default", at, priority=0, max_attempts=1)

    assert fire(stored - timedelta(seconds=1)) is None
    assert fire(stored) is None
    assert task_count(dsn) == 0
    assert tick_rows(dsn) == []
    task_id = fire(stored + timedelta(seconds=1))
    assert task_id is not None
    assert tick_rows(dsn) == [("default", stored + timedelta(seconds=1), task_id)]


# -- DST, through the scheduler ----------------------------------------------------------------


def hours_from(start: datetime, count: int) -> list[datetime]:
    return [start + timedelta(hours=k) for k in range(count)]


DST_DAYS = {
    # zone, local date, length in hours, {schedule name: (expression, expected ticks)}
    "new-york-spring": (
        "America/New_York",
        (2027, 3, 14),
        23,
        {
            "fixed-0230": ("30 2 * * *", [utc(2027, 3, 14, 7, 0)]),  # 03:00 EDT
            "fixed-0130": ("30 1 * * *", [utc(2027, 3, 14, 6, 30)]),  # 01:30 EST
            "hourly": ("0 * * * *", hours_from(utc(2027, 3, 14, 5), 23)),
        },
    ),
    "new-york-fall": (
        "America/New_York",
        (2027, 11, 7),
        25,
        {
            "fixed-0230": ("30 2 * * *", [utc(2027, 11, 7, 7, 30)]),  # 02:30 EST
            "fixed-0130": ("30 1 * * *", [utc(2027, 11, 7, 5, 30)]),  # the first 01:30 (EDT)
            "hourly": ("0 * * * *", hours_from(utc(2027, 11, 7, 4), 25)),
        },
    ),
    "berlin-spring": (
        "Europe/Berlin",
        (2027, 3, 28),
        23,
        {
            "fixed-0230": ("30 2 * * *", [utc(2027, 3, 28, 1, 0)]),  # 03:00 CEST
            "hourly": ("0 * * * *", hours_from(utc(2027, 3, 27, 23), 23)),
        },
    ),
    "berlin-fall": (
        "Europe/Berlin",
        (2027, 10, 31),
        25,
        {
            "fixed-0230": ("30 2 * * *", [utc(2027, 10, 31, 0, 30)]),  # the first 02:30 (CEST)
            "hourly": ("0 * * * *", hours_from(utc(2027, 10, 30, 22), 25)),
        },
    ),
}


@pytest.mark.parametrize("case", sorted(DST_DAYS))
def test_dst_change_day_through_the_scheduler(dsn, conn, make_scheduler, caplog, case):
    """Stepping run_once through a DST change day in 5-minute increments enqueues each fixed
    daily schedule exactly once, at the instant the cron rule gives (a skipped 02:30 at the end
    of the gap, a repeated time at its first pass), and an hourly one 23 or 25 times, one real
    hour apart; every tick is enqueued at the first step at or after it, none missed."""
    zone_name, day, hours, schedules = DST_DAYS[case]
    zone = ZoneInfo(zone_name)
    start = datetime(*day, tzinfo=zone).astimezone(UTC)
    # Adding a day to an aware datetime is wall-clock arithmetic: the next local midnight.
    end = (datetime(*day, tzinfo=zone) + timedelta(days=1)).astimezone(UTC)
    assert end - start == timedelta(hours=hours)

    for name, (expression, _) in schedules.items():
        report.schedule(f"{expression}[{zone_name}]", {"schedule": name}, name=name)
        place_in_past(dsn, start - timedelta(minutes=1), name=name)
    caplog.set_level(logging.WARNING, logger="underway.scheduler")

    scheduler = make_scheduler()
    fired: dict[str, list[datetime]] = {name: [] for name in schedules}
    last_id = 0
    now = start
    with conn.cursor() as cur:
        while now < end:
            scheduler.run_once(now)
            cur.execute(
                "SELECT id, scheduled_at, input FROM underway.task WHERE id > %s ORDER BY id",
                (last_id,),
            )
            for task_id, at, inp in cur.fetchall():
                assert now - timedelta(minutes=5) < at <= now, (now, at, inp)
                fired[inp["schedule"]].append(at)
                last_id = task_id
            now += timedelta(minutes=5)

    assert fired == {name: ticks for name, (_, ticks) in schedules.items()}
    assert len(fired["hourly"]) == hours
    assert not caplog.records, caplog.text


# -- the scheduler process beside real supervisors --------------------------------------------


def test_two_supervisors_fire_each_second_tick_exactly_once(dsn, runs, conn):
    """Two supervisors (two scheduler processes racing for every tick) on one database, with
    eight per-second schedules: after at least five ticks of each and a graceful stop (exit
    0), no tick of any schedule was enqueued or run twice."""
    names = [f"s{i}" for i in range(8)]
    for name in names:
        report.schedule(EVERY_SECOND, {"schedule": name}, name=name)
    with supervisor(dsn) as first, supervisor(dsn) as second, conn.cursor() as cur:
        wait_until(
            lambda: (
                roles_of(cur, first).count("scheduler") == 1
                and roles_of(cur, second).count("scheduler") == 1
            ),
            timeout=SOON,
            message="both schedulers connected",
        )
        both_up = db_now(dsn)
        wait_until(
            lambda: run_count(cur, "scheduled_at > %s", (both_up,)) >= 5 * len(names),
            timeout=SOON,
            interval=0.05,
            message=f"5 ticks of each schedule run; {first!r}\n{second!r}",
        )
        stop_gracefully(first, second)

    run_keys = [
        (inp["schedule"], at)
        for at, inp in query(dsn, "SELECT scheduled_at, input FROM sched_runs")
    ]
    task_keys = [(inp["schedule"], at) for _, _, at, inp in scheduled_tasks(dsn)]
    assert len(run_keys) >= 5 * len(names)
    assert [key for key, n in Counter(run_keys).items() if n > 1] == []
    assert [key for key, n in Counter(task_keys).items() if n > 1] == []
    assert max(Counter(at for _, at in task_keys).values()) <= len(names)
    assert set(run_keys) <= set(task_keys)
    # Every tick row names its own task, and that task serves that tick of that schedule.
    tick_keys = query(
        dsn,
        "SELECT t.name, t.fire_at, k.input ->> 'schedule', k.scheduled_at"
        " FROM underway.schedule_tick t LEFT JOIN underway.task k ON k.id = t.task_id",
    )
    assert [row for row in tick_keys if (row[0], row[1]) != (row[2], row[3])] == []
    assert sorted((name, at) for name, at, _, _ in tick_keys) == sorted(task_keys)


def scheduler_asleep_since(cur, since, quiet=0.0):
    """Whether a scheduler last loaded the schedules after ``since`` and has been idle since,
    for at least ``quiet`` seconds (so it is in a long wait: its 60 s poll or a far tick)."""
    cur.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'underway scheduler %%' AND state = 'idle'"
        " AND query LIKE '%%underway.schedule_tick%%' AND query_start > %s"
        " AND state_change < clock_timestamp() - make_interval(secs => %s)",
        (since, quiet),
    )
    return cur.fetchone()[0] == 1


def test_schedule_changes_take_effect_without_restart(dsn, runs, conn):
    """With a supervisor running and its scheduler asleep (up to 60 s), a schedule stored
    afterwards fires within seconds; replacing its input changes the input of every later
    tick; replacing a per-second expression by a yearly one stops it, and back again wakes
    the sleeping scheduler within seconds; after unschedule no tick later than the removal is
    enqueued, shown against a second schedule the same scheduler keeps firing."""
    with supervisor(dsn) as sup, conn.cursor() as cur:
        # The scheduler has loaded the (empty) schedules and sleeps: it only notices a new
        # one in time through LISTEN.
        wait_until(
            lambda: scheduler_asleep_since(cur, utc(2000, 1, 1)),
            timeout=SOON,
            message=f"scheduler asleep: {sup!r}",
        )

        def runs_with(inp):
            return run_count(cur, "input = %s::jsonb", (json.dumps(inp),))

        report.schedule(EVERY_SECOND, {"v": 1})
        wait_until(lambda: runs_with({"v": 1}) >= 2, timeout=10, interval=0.05, message=repr(sup))

        report.schedule(EVERY_SECOND, {"v": 2})
        changed = db_now(dsn)
        wait_until(lambda: runs_with({"v": 2}) >= 2, timeout=10, interval=0.05, message=repr(sup))

        before_yearly = db_now(dsn)
        report.schedule("0 0 1 1 *", {"v": 3})  # yearly: the scheduler goes to sleep
        yearly = db_now(dsn)
        # Idle for 1.5 s: with a per-second schedule still in view it would have woken.
        wait_until(
            lambda: scheduler_asleep_since(cur, before_yearly, quiet=1.5),
            timeout=SOON,
            interval=0.05,
            message=f"scheduler asleep after the yearly change: {sup!r}",
        )
        report.schedule(EVERY_SECOND, {"v": 4})
        wait_until(lambda: runs_with({"v": 4}) >= 2, timeout=10, interval=0.05, message=repr(sup))

        report.schedule(EVERY_SECOND, {"heartbeat": True}, name="heartbeat")
        assert report.unschedule() is True
        removed = db_now(dsn)
        # Once the scheduler fired heartbeat ticks 2 s past the removal, it has looked at the
        # schedules since then; a removed schedule still being fired would show by now.
        wait_until(
            lambda: scalar(
                dsn,
                "SELECT count(*) FROM underway.schedule_tick"
                " WHERE name = 'heartbeat' AND fire_at >= %s",
                (removed + timedelta(seconds=2),),
            ),
            timeout=SOON,
            interval=0.05,
            message=f"heartbeat ticks after the removal: {sup!r}",
        )
        stop_gracefully(sup)

    default_ticks = query(
        dsn,
        "SELECT t.fire_at, k.input FROM underway.schedule_tick t"
        " JOIN underway.task k ON k.id = t.task_id WHERE t.name = 'default' ORDER BY 1",
    )
    assert {inp["v"] for _, inp in default_ticks} == {1, 2, 4}
    assert [(at, inp) for at, inp in default_ticks if at > changed and inp["v"] == 1] == []
    assert [(at, inp) for at, inp in default_ticks if at > yearly and inp["v"] != 4] == []
    assert [at for at, _ in default_ticks if at > removed] == []


def test_no_scheduler_option_fires_no_ticks(dsn, runs, conn):
    """A supervisor started with --no-scheduler runs no scheduler process or connection and
    fires no tick of a per-second schedule while its worker runs a task 3 s later; a supervisor
    without the option, started next, fires that same schedule."""
    with supervisor(dsn, "--no-scheduler") as sup, conn.cursor() as cur:
        wait_until(
            lambda: "worker" in roles_of(cur, sup),
            timeout=SOON,
            message=f"worker connected: {sup!r}",
        )
        report.schedule(EVERY_SECOND, {"kind": "every-second"})
        marker.enqueue({"marker": True}, delay=3)
        wait_until(
            lambda: run_count(cur, "job = 'sched-marker'"),
            timeout=SOON,
            interval=0.05,
            message=f"the worker ran the delayed marker: {sup!r}",
        )
        assert tick_rows(dsn) == []
        assert scheduled_tasks(dsn) == []
        assert roles_of(cur, sup) == ["supervisor", "worker"]
        assert len(sup.worker_pids()) == 1

        with supervisor(dsn) as control:
            wait_until(
                lambda: scheduled_tasks(dsn),
                timeout=SOON,
                interval=0.05,
                message=f"the control supervisor fires the schedule: {control!r}",
            )
            stop_gracefully(control)
        stop_gracefully(sup)


def test_connection_budget_with_scheduler(dsn, runs, conn):
    """A supervisor with --workers 2 and a busy per-second schedule never has more than
    2 + 2 = 4 backends named 'underway%': itself, two workers and one scheduler (besides
    the short probe each opens while it connects, to refuse transaction pooling)."""
    report.schedule(EVERY_SECOND, {"kind": "every-second"})
    underway.configure(dsn=dsn)  # closes this process's own 'underway enqueue' connection
    seen: list[int] = []
    with Supervisor([MODULE], dsn, ["--workers", "2"]) as sup, conn.cursor() as cur:

        def sample():
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE 'underway%'"
                " AND application_name <> 'underway probe'"
            )
            seen.append(cur.fetchone()[0])
            return run_count(cur) >= 4 and len(roles_of(cur, sup)) >= 4

        wait_until(sample, timeout=SOON, interval=0.02, message=f"4 ticks run: {sup!r}")
        assert max(seen) <= 4, seen
        assert roles_of(cur, sup) == ["scheduler", "supervisor", "worker", "worker"]
        stop_gracefully(sup)
