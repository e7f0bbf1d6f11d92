"""The worker, driven in-process: steps and their transactions, retries, ordering, fencing,
the lease and release queries, waiting, a lost connection, and logging.

Every test uses a real PostgreSQL database of its own. Steps (``tests/jobs_worker.py``) write
to an ``effects`` table through ``cx``, so a committed effect proves the step's transaction
committed. Time never passes by sleeping: a task's ``run_at`` is moved to ``now()`` instead,
after the ``run_at`` the library chose has been checked.
"""

from __future__ import annotations

import logging
import threading
import time

import jobs_worker
import pytest

from underway import store
from underway.records import Release
from underway.worker import Worker

from .helpers import dbname_of, query, scalar, wait_until

#: Every job the test workers know; ``worker-unknown`` is deliberately left out.
KNOWN_JOBS = (
    jobs_worker.act_job,
    jobs_worker.follow,
    jobs_worker.two_step,
    jobs_worker.capped,
    jobs_worker.per_step,
    jobs_worker.delayed,
    jobs_worker.kill_then_raise,
)

LEASE_EXPIRED = "lease expired: the worker holding the task stopped renewing it"


@pytest.fixture
def effects(conn):
    """The table steps record their calls in."""
    with conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE effects (id bigserial PRIMARY KEY, task_id bigint, job text,"
            " step int, attempt int, max_attempts int, input jsonb, note text)"
        )


@pytest.fixture
def make_worker(dsn, effects):
    """Make in-process workers for this test's database; their connections close afterwards."""
    made = []

    def make(*jobs, **options):
        options.setdefault("poll_interval", 0.1)
        jobs = jobs or KNOWN_JOBS
        worker = Worker(dsn, {job.name: job for job in jobs}, **options)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.disconnect()


# -- reading the database -------------------------------------------------------------------


def task_state(dsn, task_id):
    """(step, state, attempts, max_attempts, error) of a task."""
    rows = query(
        dsn,
        "SELECT step, state::text, attempts, max_attempts, error FROM underway.task WHERE id = %s",
        (task_id,),
    )
    assert len(rows) == 1, rows
    return rows[0]


def task_snapshot(dsn, task_id):
    """Every column of a task that a worker might write."""
    return query(
        dsn,
        "SELECT step, input, state::text, attempts, max_attempts, claim_token, lease_expires_at,"
        " error, run_at, started_at, finished_at FROM underway.task WHERE id = %s",
        (task_id,),
    )


def attempts_of(dsn, task_id):
    """(step, attempt, outcome, error) of every recorded try of a task, oldest first."""
    return query(
        dsn,
        "SELECT step, attempt, outcome, error FROM underway.attempt WHERE task_id = %s ORDER BY id",
        (task_id,),
    )


def effects_of(dsn, task_id):
    """(job, step, attempt, max_attempts, input, note) of every committed step call."""
    return query(
        dsn,
        "SELECT job, step, attempt, max_attempts, input, note FROM effects"
        " WHERE task_id = %s ORDER BY id",
        (task_id,),
    )


def due_in(dsn, task_id):
    """Seconds from the database's now() until the task's run_at."""
    return scalar(
        dsn,
        "SELECT extract(epoch FROM run_at - now())::float8 FROM underway.task WHERE id = %s",
        (task_id,),
    )


def make_due(dsn, task_id):
    """Move a delayed task's run_at to now() instead of waiting for it."""
    query(dsn, "UPDATE underway.task SET run_at = now() WHERE id = %s", (task_id,))


def assert_due_in(dsn, task_id, seconds):
    """The run_at the library chose is ``seconds`` from now (less the few ms since)."""
    remaining = due_in(dsn, task_id)
    assert seconds - 2 < remaining <= seconds + 0.01, (remaining, seconds)


# -- steps, their inputs and outputs --------------------------------------------------------


def test_two_step_job_advances_in_place_and_passes_output(dsn, make_worker):
    """Step 0 gets the enqueue input; its To.next value is step 1's input on the same row; the
    context describes each call; the task succeeds with one 'succeeded' try per step."""
    w = make_worker()
    task = jobs_worker.two_step.enqueue({"value": 21, "return": "done"})

    assert w.run_once() is True
    assert task_state(dsn, task.id) == (1, "pending", 0, 6, None)
    assert scalar(dsn, "SELECT input FROM underway.task WHERE id = %s", (task.id,)) == {
        "value": 21,
        "return": "done",
        "doubled": 42,
    }
    assert w.run_once() is True
    assert w.run_once() is False

    assert effects_of(dsn, task.id) == [
        ("worker-two-step", 0, 1, 6, {"value": 21, "return": "done"}, None),
        ("worker-two-step", 1, 1, 6, {"value": 21, "return": "done", "doubled": 42}, None),
    ]
    assert query(
        dsn,
        "SELECT id, state::text, step, claim_token, lease_expires_at, error,"
        " finished_at IS NOT NULL FROM underway.task",
    ) == [(task.id, "succeeded", 1, None, None, None, True)]
    assert attempts_of(dsn, task.id) == [(0, 1, "succeeded", None), (1, 1, "succeeded", None)]


@pytest.mark.parametrize("returned", ["none", "done"])
def test_returning_none_or_done_finishes_the_task(dsn, make_worker, returned):
    """A step returning None, or To.done(), ends the run: the task is 'succeeded'."""
    w = make_worker()
    task = jobs_worker.act_job.enqueue({"return": returned, "note": returned})

    assert w.run_once() is True

    assert task_state(dsn, task.id) == (0, "succeeded", 1, 3, None)
    assert [e[5] for e in effects_of(dsn, task.id)] == [returned]
    assert attempts_of(dsn, task.id) == [(0, 1, "succeeded", None)]
    assert w.run_once() is False


# -- a step's transaction -------------------------------------------------------------------


def test_failing_step_write_is_rolled_back(dsn, make_worker):
    """A step that writes through cx and then raises leaves no write; the task waits for its
    retry with one try used and the error recorded."""
    w = make_worker()
    task = jobs_worker.act_job.enqueue({"fail_times": 1})

    assert w.run_once() is True

    assert effects_of(dsn, task.id) == []
    assert task_state(dsn, task.id) == (0, "pending", 1, 3, "RuntimeError: boom on try 1")
    assert attempts_of(dsn, task.id) == [(0, 1, "failed", "RuntimeError: boom on try 1")]


def test_succeeding_step_write_commits_with_the_advance(dsn, make_worker):
    """A step's write and the task's advance are seen together in one snapshot."""
    w = make_worker()
    task = jobs_worker.two_step.enqueue({"value": 1})

    assert w.run_once() is True

    assert query(
        dsn,
        "SELECT t.step, t.state::text, (SELECT count(*) FROM effects e WHERE e.task_id = t.id)"
        " FROM underway.task t WHERE t.id = %s",
        (task.id,),
    ) == [(1, "pending", 1)]


def test_enqueue_through_cx_commits_with_the_step(dsn, make_worker):
    """cx.enqueue() and the step's write both exist after the step succeeds, and the enqueued
    task runs."""
    w = make_worker()
    task = jobs_worker.act_job.enqueue({"enqueue": True})

    assert w.run_once() is True

    assert len(effects_of(dsn, task.id)) == 1
    followers = query(
        dsn, "SELECT id, state::text, input FROM underway.task WHERE job = 'worker-follow'"
    )
    assert [(state, inp) for _, state, inp in followers] == [("pending", {"from": task.id})]
    assert w.run_once() is True
    assert [e[5] for e in effects_of(dsn, followers[0][0])] == ["follow"]


def test_enqueue_through_cx_is_rolled_back_with_a_failing_step(dsn, make_worker):
    """When the step raises after cx.enqueue() and a write, neither exists."""
    w = make_worker()
    task = jobs_worker.act_job.enqueue({"enqueue": True, "fail_times": 1})

    assert w.run_once() is True

    assert task_state(dsn, task.id)[1:3] == ("pending", 1)
    assert scalar(dsn, "SELECT count(*) FROM effects") == 0
    assert scalar(dsn, "SELECT count(*) FROM underway.task WHERE job = 'worker-follow'") == 0


def test_completed_step_never_runs_again(dsn, make_worker):
    """Once step 0 committed, retries of a failing step 1 never call step 0 again."""
    w = make_worker()
    task = jobs_worker.two_step.enqueue({"value": 5, "fail_times": 3})

    assert w.run_once() is True  # step 0 succeeds
    for attempt in (1, 2, 3):
        assert task_state(dsn, task.id)[:3] == (1, "pending", attempt - 1)
        make_due(dsn, task.id)
        assert w.run_once() is True  # step 1 fails
    make_due(dsn, task.id)
    assert w.run_once() is True  # step 1 succeeds on its 4th try
    assert w.run_once() is False

    assert [(step, attempt) for _, step, attempt, *_ in effects_of(dsn, task.id)] == [
        (0, 1),
        (1, 4),
    ]
    assert [(s, a, o) for s, a, o, _ in attempts_of(dsn, task.id)] == [
        (0, 1, "succeeded"),
        (1, 1, "failed"),
        (1, 2, "failed"),
        (1, 3, "failed"),
        (1, 4, "succeeded"),
    ]
    assert task_state(dsn, task.id) == (1, "succeeded", 4, 6, None)


# -- retries --------------------------------------------------------------------------------


def test_retries_back_off_then_fail_for_good(dsn, make_worker):
    """RetryPolicy(max_attempts=3, initial_interval=10, backoff_coefficient=2): retried after
    10 s, then 20 s; the third failure fails the task and every try is recorded."""
    w = make_worker()
    task = jobs_worker.act_job.enqueue({"fail_times": 99})

    assert w.run_once() is True
    assert task_state(dsn, task.id)[1:3] == ("pending", 1)
    assert_due_in(dsn, task.id, 10)
    assert w.run_once() is False  # not due yet

    make_due(dsn, task.id)
    assert w.run_once() is True
    assert task_state(dsn, task.id)[1:3] == ("pending", 2)
    assert_due_in(dsn, task.id, 20)

    make_due(dsn, task.id)
    assert w.run_once() is True
    assert task_state(dsn, task.id) == (0, "failed", 3, 3, "RuntimeError: boom on try 3")
    assert query(
        dsn,
        "SELECT finished_at IS NOT NULL, claim_token, lease_expires_at FROM underway.task"
        " WHERE id = %s",
        (task.id,),
    ) == [(True, None, None)]
    assert w.run_once() is False

    rows = query(
        dsn,
        "SELECT attempt, outcome, error, traceback FROM underway.attempt WHERE task_id = %s"
        " ORDER BY id",
        (task.id,),
    )
    assert [(a, o, e) for a, o, e, _ in rows] == [
        (n, "failed", f"RuntimeError: boom on try {n}") for n in (1, 2, 3)
    ]
    for *_, tb in rows:
        assert "in explode" in tb
        assert "RuntimeError: boom on try" in tb
    assert effects_of(dsn, task.id) == []


def test_backoff_is_capped_by_max_interval(dsn, make_worker):
    """Waits grow 10 s, then 30 s and 90 s, but never beyond max_interval (25 s)."""
    w = make_worker()
    task = jobs_worker.capped.enqueue()

    for attempt, expected in ((1, 10), (2, 25), (3, 25)):
        assert w.run_once() is True
        assert task_state(dsn, task.id)[1:3] == ("pending", attempt)
        assert_due_in(dsn, task.id, expected)
        make_due(dsn, task.id)
    assert w.run_once() is True
    assert task_state(dsn, task.id) == (0, "failed", 4, 4, "RuntimeError: capped")


def test_fatal_fails_at_once(dsn, make_worker):
    """Raising Fatal fails the task on its first try although the policy allows three."""
    w = make_worker()
    task = jobs_worker.act_job.enqueue({"fatal": "order 42 does not exist"})

    assert w.run_once() is True

    assert task_state(dsn, task.id) == (0, "failed", 1, 3, "Fatal: order 42 does not exist")
    assert attempts_of(dsn, task.id) == [(0, 1, "failed", "Fatal: order 42 does not exist")]
    assert effects_of(dsn, task.id) == []
    assert w.run_once() is False


def test_step_retry_policy_overrides_the_jobs(dsn, make_worker):
    """Step 0 has the job's 5 tries and survives 2 failures; step 1's own policy gives it 2
    tries, and the task row's max_attempts follows the step it is at."""
    w = make_worker()
    task = jobs_worker.per_step.enqueue({"step0_failures": 2})
    assert task_state(dsn, task.id) == (0, "pending", 0, 5, None)

    for _ in range(3):  # step 0: two failures, then success (interval 0: due at once)
        assert w.run_once() is True
    assert task_state(dsn, task.id) == (1, "pending", 0, 2, None)

    for _ in range(2):
        assert w.run_once() is True
    assert task_state(dsn, task.id) == (1, "failed", 2, 2, "RuntimeError: step 1 try 2")
    assert w.run_once() is False

    assert [(s, a, o) for s, a, o, _ in attempts_of(dsn, task.id)] == [
        (0, 1, "failed"),
        (0, 2, "failed"),
        (0, 3, "succeeded"),
        (1, 1, "failed"),
        (1, 2, "failed"),
    ]
    assert [(step, attempt, most) for _, step, attempt, most, *_ in effects_of(dsn, task.id)] == [
        (0, 3, 5)
    ]


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        ("bad", "Fatal: result of step 'act' of 'worker-act' is not JSON-serialisable"),
        ("next", "Fatal: step 'act' is the last step of job 'worker-act'"),
    ],
)
def test_wrong_return_value_fails_at_once(dsn, make_worker, returned, expected):
    """A step returning a value that is no JSON, or To.next from the last step, fails the
    task on its first try with a message naming the step; its write is rolled back."""
    w = make_worker()
    task = jobs_worker.act_job.enqueue({"return": returned})

    assert w.run_once() is True

    step, state, attempts, max_attempts, error = task_state(dsn, task.id)
    assert (step, state, attempts, max_attempts) == (0, "failed", 1, 3)
    assert error.startswith(expected), error
    assert [o for _, _, o, _ in attempts_of(dsn, task.id)] == ["failed"]
    assert effects_of(dsn, task.id) == []


def test_task_at_a_step_the_job_no_longer_has_fails_at_once(dsn, make_worker):
    """A task queued at a step the job no longer has (steps removed since) fails on its first
    try, with a message saying so, although the policy allows retries."""
    w = make_worker()
    task = jobs_worker.act_job.enqueue({})
    query(dsn, "UPDATE underway.task SET step = 3 WHERE id = %s", (task.id,))

    assert w.run_once() is True

    step, state, attempts, _, error = task_state(dsn, task.id)
    assert (step, state, attempts) == (3, "failed", 1)
    assert error.startswith("Fatal: job 'worker-act' has no step 3 (it has 1)"), error
    assert [(s, a, o) for s, a, o, _ in attempts_of(dsn, task.id)] == [(3, 1, "failed")]
    assert scalar(dsn, "SELECT count(*) FROM effects") == 0


# -- which task runs, and when ----------------------------------------------------------------


def test_higher_priority_first_then_older_run_at(dsn, make_worker):
    """Ready tasks run highest priority first; among equal priorities, oldest run_at first
    (not lowest id)."""
    w = make_worker()
    job = jobs_worker.act_job
    job.enqueue({"note": "p0"}, priority=0)
    job.enqueue({"note": "p10"}, priority=10)
    job.enqueue({"note": "p5"}, priority=5)
    older = job.enqueue({"note": "p5 older"}, priority=5)
    query(
        dsn,
        "UPDATE underway.task SET run_at = now() - interval '1 hour' WHERE id = %s",
        (older.id,),
    )

    while w.run_once():
        pass

    assert [r[0] for r in query(dsn, "SELECT note FROM effects ORDER BY id")] == [
        "p10",
        "p5 older",
        "p5",
        "p0",
    ]


def test_delayed_enqueue_waits_for_its_run_at(dsn, make_worker):
    """enqueue(delay=60) sets run_at 60 s ahead, and the task is not run before then."""
    w = make_worker()
    task = jobs_worker.act_job.enqueue({}, delay=60)
    assert_due_in(dsn, task.id, 60)

    assert w.run_once() is False
    assert task_state(dsn, task.id)[1:3] == ("pending", 0)

    make_due(dsn, task.id)
    assert w.run_once() is True
    assert task_state(dsn, task.id)[1] == "succeeded"


def test_to_delay_schedules_the_next_step(dsn, make_worker):
    """To.delay(60 s, v) leaves step 1 pending 60 s ahead with v as its input."""
    w = make_worker()
    task = jobs_worker.delayed.enqueue("hello")

    assert w.run_once() is True
    assert task_state(dsn, task.id) == (1, "pending", 0, 5, None)
    assert_due_in(dsn, task.id, 60)
    assert w.run_once() is False

    make_due(dsn, task.id)
    assert w.run_once() is True
    assert task_state(dsn, task.id)[:2] == (1, "succeeded")
    assert [(step, inp) for _, step, _, _, inp, _ in effects_of(dsn, task.id)] == [
        (0, "hello"),
        (1, {"after": "hello"}),
    ]


def test_tasks_of_unknown_jobs_are_left_alone(dsn, make_worker):
    """A worker never claims a task of a job it was not given, even one ahead in the queue,
    and still runs the known task behind it."""
    w = make_worker()
    stranger = jobs_worker.unknown.enqueue({}, priority=100)

    assert w.run_once() is False
    known = jobs_worker.act_job.enqueue({}, priority=0)
    assert w.run_once() is True
    assert w.run_once() is False

    assert task_state(dsn, known.id)[1] == "succeeded"
    assert query(
        dsn,
        "SELECT state::text, attempts, claim_token, started_at FROM underway.task WHERE id = %s",
        (stranger.id,),
    ) == [("pending", 0, None, None)]
    assert attempts_of(dsn, stranger.id) == []


# -- fencing, leases and releases -------------------------------------------------------------

FENCED_CASES = {
    "complete": (jobs_worker.act_job, {}),
    "advance": (jobs_worker.two_step, {"value": 1}),
    "fail": (jobs_worker.act_job, {"fail_times": 1}),
}


@pytest.mark.parametrize("case", list(FENCED_CASES))
def test_worker_that_lost_its_claim_changes_nothing(dsn, make_worker, case):
    """When another worker took the task over (claim_token changed), executing the old claim
    rolls back the step's write and leaves the task exactly as the new holder has it."""
    job, inp = FENCED_CASES[case]
    w = make_worker()
    task = job.enqueue(inp)
    claim = w.claim()
    assert claim is not None and claim.id == task.id
    query(dsn, "UPDATE underway.task SET claim_token = 999 WHERE id = %s", (task.id,))
    before = task_snapshot(dsn, task.id)

    w.execute(claim)

    assert task_snapshot(dsn, task.id) == before
    assert task_state(dsn, task.id)[1] == "running"
    assert scalar(dsn, "SELECT claim_token FROM underway.task WHERE id = %s", (task.id,)) == 999
    assert effects_of(dsn, task.id) == []
    assert attempts_of(dsn, task.id) == []


@pytest.mark.parametrize("case", list(FENCED_CASES))
def test_fenced_out_outcome_is_not_logged_as_one(dsn, make_worker, caplog, case):
    """A worker that lost its claim logs that it lost the task, not an outcome it did not
    record."""
    job, inp = FENCED_CASES[case]
    w = make_worker()
    task = job.enqueue(inp)
    claim = w.claim()
    query(dsn, "UPDATE underway.task SET claim_token = 999 WHERE id = %s", (task.id,))
    caplog.set_level(logging.INFO, logger="underway.worker")

    w.execute(claim)

    events = [r.event for r in caplog.records if getattr(r, "task_id", None) == task.id]
    assert events == ["task_started", "task_lost"]


def test_claim_sets_the_lease(dsn, make_worker):
    """A claim marks the task running, counts the try and sets lease_expires_at to now() plus
    the worker's lease."""
    w = make_worker(lease=42)
    task = jobs_worker.act_job.enqueue({})

    claim = w.claim()

    assert claim is not None and (claim.id, claim.attempt, claim.step) == (task.id, 1, 0)
    state, attempts, token, lease_left = query(
        dsn,
        "SELECT state::text, attempts, claim_token,"
        " extract(epoch FROM lease_expires_at - now())::float8 FROM underway.task WHERE id = %s",
        (task.id,),
    )[0]
    assert (state, attempts, token) == ("running", 1, claim.token)
    assert 40 < lease_left <= 42


def test_reclaim_expired_releases_lapsed_leases(dsn, conn, make_worker):
    """reclaim_expired gives back running tasks whose lease lapsed ('lost', the try counts),
    fails one that had used its last try, and leaves live leases alone."""
    w = make_worker()
    retried, exhausted, live = (jobs_worker.act_job.enqueue({"n": n}) for n in range(3))
    claims = {c.id: c for c in (w.claim(), w.claim(), w.claim())}
    assert set(claims) == {retried.id, exhausted.id, live.id}
    query(
        dsn,
        "UPDATE underway.task SET lease_expires_at = now() - interval '1 second'"
        " WHERE id IN (%s, %s)",
        (retried.id, exhausted.id),
    )
    query(dsn, "UPDATE underway.task SET max_attempts = 1 WHERE id = %s", (exhausted.id,))
    live_before = task_snapshot(dsn, live.id)

    with conn.cursor() as cur:
        released = set(store.reclaim_expired(cur))

    assert released == {retried.id, exhausted.id}
    rows = query(
        dsn,
        "SELECT id, state::text, attempts, claim_token, lease_expires_at, error,"
        " finished_at IS NOT NULL, run_at <= now() FROM underway.task WHERE id IN (%s, %s)"
        " ORDER BY id",
        (retried.id, exhausted.id),
    )
    assert rows == [
        (retried.id, "pending", 1, None, None, LEASE_EXPIRED, False, True),
        (exhausted.id, "failed", 1, None, None, LEASE_EXPIRED, True, True),
    ]
    for task in (retried, exhausted):
        assert attempts_of(dsn, task.id) == [(0, 1, "lost", LEASE_EXPIRED)]
    assert task_snapshot(dsn, live.id) == live_before
    assert attempts_of(dsn, live.id) == []
    assert w.run_once() is True  # the released task is ready again
    assert task_state(dsn, retried.id)[1:3] == ("succeeded", 2)


@pytest.mark.parametrize(
    ("counts", "last_try", "state", "attempts", "outcome"),
    [
        (True, False, "pending", 1, "crashed"),
        (True, True, "failed", 3, "crashed"),
        (False, False, "pending", 0, "interrupted"),
    ],
)
def test_release_task(dsn, conn, make_worker, counts, last_try, state, attempts, outcome):
    """release_task gives a dead worker's task back: a crash keeps the try counted (and fails
    the task at its last try), an interruption returns the try."""
    w = make_worker()
    task = jobs_worker.act_job.enqueue({})
    if last_try:
        query(dsn, "UPDATE underway.task SET attempts = 2 WHERE id = %s", (task.id,))
    claim = w.claim()
    tried = 3 if last_try else 1
    assert claim.attempt == tried

    with conn.cursor() as cur:
        released = store.release_claim(cur, Release(claim.token, "it died", outcome))
    assert Release(claim.token, "it died", outcome).counts is counts

    assert released == [(task.id, state)]
    assert query(
        dsn,
        "SELECT state::text, attempts, claim_token, lease_expires_at, error,"
        " finished_at IS NOT NULL FROM underway.task WHERE id = %s",
        (task.id,),
    ) == [(state, attempts, None, None, "it died", state == "failed")]
    assert attempts_of(dsn, task.id) == [(0, tried, outcome, "it died")]


def test_release_task_with_another_token_changes_nothing(dsn, conn, make_worker):
    """release_task is fenced on the claim token: a stale token releases nothing."""
    w = make_worker()
    task = jobs_worker.act_job.enqueue({})
    claim = w.claim()
    before = task_snapshot(dsn, task.id)

    with conn.cursor() as cur:
        assert store.release_claim(cur, Release(claim.token + 1, "x", "crashed")) == []

    assert task_snapshot(dsn, task.id) == before
    assert task_state(dsn, task.id)[1] == "running"
    assert attempts_of(dsn, task.id) == []


# -- waiting --------------------------------------------------------------------------------


def test_wait_wakes_on_notification(dsn, make_worker):
    """With a 30 s poll interval, an idle wait() ends as soon as a task is enqueued: LISTEN
    wakes it, not polling."""
    w = make_worker(poll_interval=30)
    w.connect()
    enqueued_at = []
    errors = []

    def enqueue_once_waiting():
        try:
            # wait() first asks when the next task is due; once that query is done, the
            # worker is in select() (or about to be), and only a notification can wake it.
            wait_until(
                lambda: scalar(
                    dsn,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s"
                    " AND state = 'idle' AND query LIKE %s",
                    ("underway worker%", "EXECUTE underway_seconds_until_due%"),
                ),
                message="the worker to start waiting",
            )
            enqueued_at.append(time.monotonic())
            jobs_worker.act_job.enqueue({"note": "wake"})
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=enqueue_once_waiting)
    started = time.monotonic()
    thread.start()
    try:
        w.wait()
        returned = time.monotonic()
    finally:
        thread.join(15)
    assert not errors, errors
    assert enqueued_at, "the enqueue thread did not enqueue"
    assert enqueued_at[0] <= returned, "wait() returned before the task was enqueued"
    assert returned - started < 5
    assert w.run_once() is True


def test_wait_wakes_when_a_delayed_task_is_due(dsn, make_worker):
    """With a 30 s poll interval and no notification, wait() ends when the next delayed task
    of its jobs is due."""
    task = jobs_worker.act_job.enqueue({}, delay=1.0)
    w = make_worker(poll_interval=30)
    w.connect()  # LISTEN after the enqueue: its notification is not delivered to the worker
    remaining = due_in(dsn, task.id)
    assert remaining > 0.3

    started = time.monotonic()
    w.wait()
    waited = time.monotonic() - started

    assert remaining - 0.1 <= waited < 3, (remaining, waited)
    wait_until(w.run_once, timeout=3, message="the delayed task to run")
    assert task_state(dsn, task.id)[1] == "succeeded"


# -- a lost connection --------------------------------------------------------------------------


def test_connect_replaces_a_connection_terminated_while_idle(dsn, pg_server, make_worker):
    """After its idle backend is terminated, connect() gives a new, working connection."""
    w = make_worker()
    old = w.connect()
    killed = pg_server.terminate_backends(dbname_of(dsn), application_name_like="underway worker%")
    assert killed == 1

    new = w.connect()

    assert new is not old
    assert old.closed
    with new.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    task = jobs_worker.act_job.enqueue({})
    assert w.run_once() is True
    assert task_state(dsn, task.id)[1] == "succeeded"


def test_run_survives_a_connection_terminated_while_idle(dsn, pg_server, make_worker):
    """A burst run() after the worker's idle backend was terminated reconnects and runs the
    ready task."""
    w = make_worker(burst=True)
    old = w.connect()
    assert pg_server.terminate_backends(dbname_of(dsn), "underway worker%") == 1
    task = jobs_worker.act_job.enqueue({})

    w.run()

    assert old.closed
    assert task_state(dsn, task.id)[1:3] == ("succeeded", 1)
    assert attempts_of(dsn, task.id) == [(0, 1, "succeeded", None)]


def test_task_is_given_back_when_the_connection_dies_under_a_failing_step(
    dsn, pg_server, make_worker
):
    """A step whose worker session is terminated before it raises: after reconnecting, run()
    gives the task back and runs it again at once instead of leaving it held."""
    w = make_worker(burst=True)
    task = jobs_worker.kill_then_raise.enqueue({"dsn": dsn, "kill_on": 1})

    w.run()

    assert task_state(dsn, task.id)[1:3] == ("succeeded", 2)
    outcomes = [o for _, _, o, _ in attempts_of(dsn, task.id)]
    assert len(outcomes) == 2 and outcomes[1] == "succeeded", outcomes


# -- logging --------------------------------------------------------------------------------


def test_logs_one_line_per_event_with_structured_fields(dsn, make_worker, caplog):
    """Start, advance, retry, success and failure each log one record naming the job, task,
    step and attempt, with the same facts as extra fields."""
    caplog.set_level(logging.INFO, logger="underway.worker")
    w = make_worker()
    two = jobs_worker.two_step.enqueue({"value": 1, "fail_times": 1})
    assert w.run_once() is True  # step 0 advances
    assert w.run_once() is True  # step 1 fails, retried
    make_due(dsn, two.id)
    assert w.run_once() is True  # step 1 succeeds
    fatal = jobs_worker.act_job.enqueue({"fatal": "no"})
    assert w.run_once() is True  # fails for good

    expected = {
        two.id: [
            ("task_started", 0, 1, logging.INFO),
            ("task_advanced", 0, 1, logging.INFO),
            ("task_started", 1, 1, logging.INFO),
            ("task_retrying", 1, 1, logging.WARNING),
            ("task_started", 1, 2, logging.INFO),
            ("task_succeeded", 1, 2, logging.INFO),
        ],
        fatal.id: [
            ("task_started", 0, 1, logging.INFO),
            ("task_failed", 0, 1, logging.WARNING),
        ],
    }
    jobs = {two.id: "worker-two-step", fatal.id: "worker-act"}
    for task_id, events in expected.items():
        records = [r for r in caplog.records if getattr(r, "task_id", None) == task_id]
        assert [(r.event, r.step, r.attempt, r.levelno) for r in records] == events
        for r in records:
            assert r.name == "underway.worker"
            assert r.job == jobs[task_id]
            message = r.getMessage()
            assert f"job={jobs[task_id]}" in message
            assert f"task_id={task_id}" in message
            assert f"step={r.step}(" in message
            assert f"attempt={r.attempt}/" in message
            assert r.event.removeprefix("task_") in message
