"""Rate limits and concurrency limits (issue #13), enforced in the database's claim.

In-process tests drive :class:`~underway.worker.Worker` claims one by one against limits
stored as a supervisor stores them at start (:meth:`Upkeep.register
<underway.upkeep.Upkeep.register>`) or through :mod:`underway.admin`. Process-level tests
run TWO real supervisors on one database (two "hosts") and measure what happened from the
database (each try's ``started_at``) and from the steps themselves (rows written with
``clock_timestamp()`` on the step's own connection at its start and end).

Token-bucket semantics, as observed: a queue's bucket holds ``count`` tokens and starts
full (a burst of ``count`` claims at once); it refills continuously at ``count`` per
``per`` (one token every ``per / count`` seconds), never beyond ``count``; each claim takes
one. So in any interval of length L at most ``count + count * L / per`` claims start, and a
queue whose bucket is empty is passed over (other queues' tasks are claimed instead).
"""

from __future__ import annotations

import signal
import time

import jobs_api as ja
import pytest
from jobs_api import run_all

from underway import Job, TaskState, admin
from underway.errors import ConfigurationError
from underway.job import unregister_job
from underway.records import Limit

from .helpers import Supervisor, query, register, scalar, wait_until

# -- fixtures and helpers -------------------------------------------------------------------


def supervisor(dsn, *args, workers=2):
    """A supervisor for the api jobs (no scheduler)."""
    return Supervisor(["jobs_api"], dsn, ["--workers", str(workers), "--no-scheduler", *args])


def stop(*sups):
    """Stop idle supervisors gracefully (SIGTERM) and wait for them: much quicker than the
    SIGKILL of leaving their block, whose orphaned workers take seconds to be reaped."""
    for sup in sups:
        sup.signal(signal.SIGTERM)
    for sup in sups:
        assert sup.wait(15) == 0, sup


def rated_limit(available=None):
    """The limits row of the rated queue as a supervisor stores it."""
    return Limit("rate", ja.RATED_QUEUE, ja.RATE, 1.0, ja.RATE if available is None else available)


def max_overlap(intervals):
    """The most intervals (start, end) open at one instant; an end at the same instant as a
    start closes first."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = now = 0
    for _, change in events:
        now += change
        most = max(most, now)
    return most


def step_intervals(dsn, jobs):
    """(task, try, start, end) of each measured step call of these jobs; end is None for a
    call that never ended (its worker was killed)."""
    return query(
        dsn,
        """
        SELECT s.task_id, s.attempt, s.at,
               (SELECT e.at FROM api_effect e WHERE e.task_id = s.task_id
                AND e.attempt = s.attempt AND e.note = 'end')
        FROM api_effect s
        WHERE s.note = 'start' AND s.job = ANY(%s)
        ORDER BY s.at
        """,
        (list(jobs),),
    )


# == checking the settings ==================================================================


@pytest.mark.parametrize(
    "bad", ["10/d", "0/s", "-1/s", "abc", "10", "10/", "/s", "1.5/s", "1000000000/s", 10]
)
def test_bad_rates_are_refused(bad):
    """Job(rate_limit=...) takes "N/s", "N/m" or "N/h" (N from 1): anything else is a
    ValueError naming the job and the forms, and defines no job."""
    with pytest.raises(ValueError, match=r"job 'api-bad-rate': rate_limit .*'N/s', 'N/m' or 'N/h'"):
        Job("api-bad-rate", rate_limit=bad)
    assert unregister_job("api-bad-rate") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("100/m", (100, 60.0)), (" 5 / s ", (5, 1.0)), ("1000/h", (1000, 3600.0))],
)
def test_good_rates_are_read(text, expected):
    """The three forms read as (count, seconds)."""
    job = Job("api-good-rate", rate_limit=text)
    unregister_job(job.name)
    assert job.rate_limit == expected


@pytest.mark.timeout(30)
def test_bad_limits_are_refused_by_admin_and_job(adsn):
    """admin.set_rate_limit refuses a count that is not an integer from 1, a period that is
    not 's', 'm', 'h' or seconds up to a day, and an empty queue; Job refuses a
    max_concurrency that is not an integer from 1. Nothing is stored."""
    for count in (0, -1, 1.5, True, "10", 2**31):
        with pytest.raises(ValueError, match="count must be an integer from 1"):
            admin.set_rate_limit("q", count, "s")
    for per in ("d", "x", 0, -1, 86_401, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            admin.set_rate_limit("q", 10, per)
    with pytest.raises(TypeError, match="a queue name is a non-empty string"):
        admin.set_rate_limit("", 10, "s")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="max_concurrency must be an integer from 1"):
            Job("api-bad-concurrency", max_concurrency=bad)
    assert admin.limits() == []
    assert scalar(adsn, "SELECT count(*) FROM underway.concurrency_limit") == 0


# == rate limits, in process ================================================================


@pytest.mark.timeout(30)
def test_empty_bucket_passes_its_queue_over_and_other_queues_flow(adsn, make_worker):
    """A queue limited to 3 per hour (a full bucket of 3): of its 5 tasks (first in line, by
    priority) 3 run, then the worker claims the unlimited queue's 4 tasks instead of
    waiting, then nothing. limits() shows the bucket empty. Raising the limit does not
    refill the bucket; clearing it lets the rest run."""
    admin.set_rate_limit(ja.RATED_QUEUE, 3, "h")
    assert admin.limits() == [Limit("rate", ja.RATED_QUEUE, 3, 3600.0, 3)]
    rated = ja.rated.enqueue_many([{"n": n} for n in range(5)], priority=10)
    free = ja.free.enqueue_many([{"n": n} for n in range(4)])
    w = make_worker(ja.rated, ja.free)
    order = []
    while (claim := w.claim()) is not None:
        order.append(claim.job)
        w.execute(claim)
    assert order == ["api-rated"] * 3 + ["api-free"] * 4
    assert [t.status() for t in rated].count(TaskState.PENDING) == 2
    assert all(t.status() is TaskState.SUCCEEDED for t in free)
    assert admin.limits() == [Limit("rate", ja.RATED_QUEUE, 3, 3600.0, 0)]

    admin.set_rate_limit(ja.RATED_QUEUE, 100, "h")
    assert admin.limits() == [Limit("rate", ja.RATED_QUEUE, 100, 3600.0, 0)]
    assert w.run_once() is False
    assert admin.clear_rate_limit(ja.RATED_QUEUE) is True
    assert admin.clear_rate_limit(ja.RATED_QUEUE) is False
    assert run_all(w, adsn) == 2
    assert all(t.status() is TaskState.SUCCEEDED for t in rated)
    assert admin.limits() == []


@pytest.mark.timeout(30)
def test_bucket_refills_one_token_per_period_over_count(adsn, make_worker):
    """2 per second: the full bucket gives 2 claims at once; the third is refused, and
    granted once a token has refilled: half a second after the first claim (the bucket
    refills 2 per second from then), not before, on the database's clock."""
    admin.set_rate_limit(ja.RATED_QUEUE, 2, 1.0)
    ja.rated.enqueue_many([{"n": n} for n in range(3)])
    w = make_worker(ja.rated)
    assert w.claim() is not None
    assert w.claim() is not None
    assert w.claim() is None
    third = wait_until(w.claim, timeout=5, interval=0.01, message="a refilled token")
    assert third.job == "api-rated"
    first_at, _, third_at = (
        row[0]
        for row in query(
            adsn,
            "SELECT extract(epoch FROM started_at)::float8 FROM underway.task ORDER BY started_at",
        )
    )
    assert 0.49 <= third_at - first_at < 1.0, third_at - first_at


@pytest.mark.timeout(30)
def test_a_paused_rate_limited_queue_is_like_any_paused_queue(adsn, make_worker):
    """A paused rate-limited queue starts nothing and spends no token; resumed, it runs as
    many tasks as its bucket holds."""
    admin.set_rate_limit(ja.RATED_QUEUE, 2, "m")
    admin.pause(ja.RATED_QUEUE)
    tasks = ja.rated.enqueue_many([{"n": n} for n in range(3)])
    w = make_worker(ja.rated)
    assert w.run_once() is False
    assert admin.limits() == [Limit("rate", ja.RATED_QUEUE, 2, 60.0, 2)]
    assert {q.queue: q.paused for q in admin.queues()} == {ja.RATED_QUEUE: True}
    assert admin.resume(ja.RATED_QUEUE) is True
    assert run_all(w, adsn) == 2
    assert [t.status() for t in tasks].count(TaskState.SUCCEEDED) == 2
    assert w.run_once() is False


# == rate limits across supervisors ==========================================================


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_two_supervisors_share_one_rate_budget_and_other_queues_flow(adsn):
    """Two supervisors of 2 workers each run a queue limited to 10/s (Job(rate_limit=
    "10/s"), stored by the supervisors at start), polling every 0.1 s so that 4 workers
    press on the bucket far harder than 10/s. Over the ~3 s its 35 tasks take, the claims
    (each try's started_at) keep to one shared token bucket: in every interval of length L,
    at most 10 + 10 L (+1 for clock granularity) start; the initial burst of 10 starts
    within half a second; workers of both supervisors take part. Meanwhile an unlimited
    queue's 20 tasks, enqueued after the limited ones, are all done within a second."""
    args = ["--poll-interval", "0.1"]
    with supervisor(adsn, *args) as one, supervisor(adsn, *args) as two:
        wait_until(
            lambda: (
                rated_limit() in admin.limits()
                and len(one.worker_pids()) == len(two.worker_pids()) == 2
            ),
            message=f"supervisors up: {one!r} {two!r}",
        )
        rated = ja.rated.enqueue_many([{"n": n} for n in range(35)])
        free = ja.free.enqueue_many([{"n": n} for n in range(20)])
        enqueued = time.monotonic()
        wait_until(
            lambda: all(t.status() is TaskState.SUCCEEDED for t in free),
            timeout=5,
            message="the unlimited queue's tasks",
        )
        free_done = time.monotonic() - enqueued
        wait_until(
            lambda: all(t.status() is TaskState.SUCCEEDED for t in rated),
            timeout=20,
            message=f"the limited queue's tasks: {one!r} {two!r}",
        )
        pids = {one: set(one.worker_pids()), two: set(two.worker_pids())}
        stop(one, two)
    starts = [
        row[0]
        for row in query(
            adsn,
            "SELECT extract(epoch FROM a.started_at)::float8 FROM underway.attempt a"
            " JOIN underway.task t ON t.id = a.task_id WHERE t.job = 'api-rated'"
            " ORDER BY a.started_at",
        )
    ]
    assert len(starts) == 35
    first = starts[0]
    windows = [sum(1 for s in starts if k <= s - first < k + 1) for k in range(5)]
    print(
        f"\nclaims per second from the first: {windows}; unlimited queue done in {free_done:.2f}s"
    )
    for i in range(len(starts)):
        for j in range(i, len(starts)):
            allowed = ja.RATE + ja.RATE * (starts[j] - starts[i]) + 1
            assert j - i + 1 <= allowed, (i, j, starts[j] - starts[i], windows)
    assert sum(1 for s in starts if s - first < 0.5) >= ja.RATE, windows
    assert starts[-1] - first >= (35 - ja.RATE - 1) / ja.RATE, windows
    ran_in = {
        row[0] for row in query(adsn, "SELECT DISTINCT pid FROM api_effect WHERE job = 'api-rated'")
    }
    assert ran_in & pids[one] and ran_in & pids[two], (ran_in, pids)
    assert free_done < 1.0, free_done


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_rate_limited_queue_keeps_its_rate_without_polling(adsn):
    """A supervisor whose idle workers poll only every 30 s (they rely on notifications) runs
    a queue limited to 10/s: its 18 tasks (a burst of 10, then 8 at 10/s) are all done
    within 3 s."""
    with supervisor(adsn, "--poll-interval", "30") as sup:
        wait_until(lambda: rated_limit() in admin.limits(), message=f"registered: {sup!r}")
        tasks = ja.rated.enqueue_many([{"n": n} for n in range(18)])
        try:
            wait_until(lambda: all(t.status() is TaskState.SUCCEEDED for t in tasks), timeout=3)
        except AssertionError:
            done = [t.status() for t in tasks].count(TaskState.SUCCEEDED)
            raise AssertionError(f"{done} of 18 tasks done after 3 s: {sup!r}") from None
        stop(sup)


# == concurrency limits ======================================================================


@pytest.mark.timeout(30)
def test_max_concurrency_of_a_job_holds_and_never_blocks_other_jobs(adsn, make_worker):
    """Job(max_concurrency=3), as a supervisor stores it: three of its tasks are claimed,
    a fourth is not (the worker claims another job's tasks instead, then nothing); once
    one of the three finishes, another starts. A task of the job enqueued from SQL joins
    its group. limits() shows the room left."""
    register(adsn, ja.solo, ja.echo)
    assert admin.limits() == [Limit("concurrency", "api-solo", 3, None, 3)]
    ja.solo.enqueue_many([{"n": n} for n in range(4)], priority=10)
    sql_task = scalar(adsn, "SELECT underway.enqueue('api-solo', '{}', priority => 10)")
    assert (
        scalar(adsn, "SELECT concurrency_group FROM underway.task WHERE id = %s", (sql_task,))
        == "api-solo"
    )
    ja.echo.enqueue_many([{"n": n} for n in range(2)])
    w = make_worker(ja.solo, ja.echo)
    claims = [w.claim() for _ in range(6)]
    assert [c and c.job for c in claims] == ["api-solo"] * 3 + ["api-echo"] * 2 + [None]
    assert admin.limits() == [Limit("concurrency", "api-solo", 3, None, 0)]
    w.execute(claims[0])
    assert admin.limits() == [Limit("concurrency", "api-solo", 3, None, 1)]
    again = w.claim()
    assert again is not None and again.job == "api-solo"
    assert w.claim() is None


@pytest.mark.timeout(30)
def test_jobs_sharing_a_group_or_queue_must_agree_on_its_limit(adsn):
    """Two jobs naming one concurrency group with different limits, or one queue with
    different rates: a supervisor refuses to start with them (ConfigurationError naming
    the group or queue), and stores no limit."""
    a = Job("api-disagree-a", concurrency_group="api-disagree", max_concurrency=2)
    b = Job("api-disagree-b", concurrency_group="api-disagree", max_concurrency=3)
    c = Job("api-disagree-c", queue="api-disagree-q", rate_limit="5/s")
    d = Job("api-disagree-d", queue="api-disagree-q", rate_limit="5/m")
    try:
        for job in (a, b, c, d):
            job.step(ja.free_step)
        with pytest.raises(ConfigurationError, match="concurrency group 'api-disagree'"):
            register(adsn, a, b)
        with pytest.raises(ConfigurationError, match="queue 'api-disagree-q': rate_limit"):
            register(adsn, c, d)
        assert admin.limits() == []
    finally:
        for job in (a, b, c, d):
            unregister_job(job.name)


@pytest.mark.timeout(30)
def test_a_concurrency_limit_also_holds_for_tasks_queued_before_it(adsn, make_worker):
    """Four tasks of api-solo (max_concurrency=3) are enqueued from SQL before any supervisor
    registered the job; then a supervisor starts and registers it. Only three of them may
    run at once."""
    for n in range(4):
        scalar(adsn, "SELECT underway.enqueue('api-solo', %s)", (f'{{"n": {n}}}',))
    register(adsn, ja.solo)
    w = make_worker(ja.solo)
    claims = [w.claim() for _ in range(4)]
    assert [c is not None for c in claims] == [True, True, True, False]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_group_shared_by_two_jobs_holds_across_two_supervisors(adsn):
    """Two jobs share a concurrency group of 2; two supervisors of 2 workers each (idle ones
    looking every 0.1 s, and all four woken at once by the enqueue) run their 12 tasks (0.3 s
    of work each, all waiting from the start). Measured from the steps themselves (start
    and end rows on the clock), at most 2 run at any instant, and 2 do run together."""
    args = ["--poll-interval", "0.1"]
    with supervisor(adsn, *args) as one, supervisor(adsn, *args) as two:
        wait_until(
            lambda: (
                len(one.worker_pids()) == len(two.worker_pids()) == 2
                and scalar(adsn, "SELECT count(*) FROM underway.supervisor") == 2
            ),
            message="supervisors up",
        )
        work = {"dsn": adsn, "sleep": 0.3}
        started = time.monotonic()
        tasks = [*ja.group_a.enqueue_many([work] * 6), *ja.group_b.enqueue_many([work] * 6)]
        wait_until(
            lambda: all(t.status() is TaskState.SUCCEEDED for t in tasks),
            timeout=20,
            message=f"group tasks done: {one!r} {two!r}",
        )
        print(f"\n12 group tasks took {time.monotonic() - started:.2f}s")
        stop(one, two)
    calls = step_intervals(adsn, ["api-group-a", "api-group-b"])
    assert len(calls) == 12 and all(end is not None for *_, end in calls)
    assert max_overlap([(start, end) for _, _, start, end in calls]) == ja.GROUP_LIMIT


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(60)
def test_a_dead_hosts_running_tasks_count_until_their_leases_are_reclaimed(adsn):
    """Host A (a supervisor with --lease 2) runs both places of a group of 2; host B's
    supervisor is idle beside it, with 2 more tasks of the group waiting. A is SIGKILLed
    with its workers: its two tasks stay 'running' until their leases lapse and B
    reclaims them ('lost' tries), and until then B starts none of the four. Counting
    every try from its start to its end (the reclaim, for a lost one), and every step
    call measured by the step, at most 2 run at once; all four tasks then succeed."""
    work = {"dsn": adsn, "sleep": 30, "then_sleep": 0.3}
    with supervisor(adsn, "--lease", "2") as host_a:
        held = ja.group_a.enqueue_many([work] * 2)
        wait_until(
            lambda: scalar(adsn, "SELECT count(*) FROM api_effect WHERE note = 'start'") == 2,
            message=f"A runs two steps: {host_a!r}",
        )
        waiting = ja.group_b.enqueue_many([{**work, "sleep": 0.3}] * 2)
        with supervisor(adsn, "--lease", "2") as host_b:
            wait_until(
                lambda: scalar(adsn, "SELECT count(*) FROM underway.supervisor") == 2,
                message=f"B up: {host_b!r}",
            )
            assert [t.status() for t in waiting] == ["pending"] * 2
            host_a.kill_group()
            killed = scalar(adsn, "SELECT clock_timestamp()")
            wait_until(
                lambda: all(t.status() is TaskState.SUCCEEDED for t in (*held, *waiting)),
                timeout=20,
                message=f"all done at B: {host_b!r}",
            )
            stop(host_b)
    tries = query(
        adsn,
        "SELECT task_id, attempt, outcome, started_at, finished_at FROM underway.attempt"
        " ORDER BY started_at",
    )
    lost = [t for t in tries if t[2] == "lost"]
    assert sorted(t[0] for t in lost) == sorted(t.id for t in held), tries
    reclaimed = min(t[4] for t in lost)
    assert reclaimed > killed
    later = [t for t in tries if t[2] != "lost"]
    assert all(t[3] >= reclaimed for t in later), tries
    assert max_overlap([(t[3], t[4]) for t in tries]) <= ja.GROUP_LIMIT, tries
    reclaim_of = {t[0]: t[4] for t in lost}
    calls = [
        (start, end if end is not None else reclaim_of[task])
        for task, _, start, end in step_intervals(adsn, ["api-group-a", "api-group-b"])
    ]
    assert len(calls) == 6
    assert max_overlap(calls) == ja.GROUP_LIMIT
