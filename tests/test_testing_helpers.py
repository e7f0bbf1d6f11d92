"""``underway.testing``: ``run_inline`` and ``drain`` run tasks in the test's own process
against a real database, with a real worker's transactions, retries at once and delays
skipped; ``TaskFailed`` reports a task that failed for good.

The last test is written the way a project would test its own job (a fixture migrating a
fresh database, then ``run_inline``): it is the example the README quotes.
"""

from __future__ import annotations

import jobs_lifecycle as jl
import psycopg2
import pytest
from jobs_lifecycle import attempts, effects

import underway
from underway import Job, RetryPolicy, TaskState, To, UnderwayError, admin
from underway.task import task_info
from underway.testing import TaskFailed, drain, run_inline

from .helpers import query, scalar, wait_until


@pytest.fixture
def ldsn(dsn):
    """The test database, with the tables the lifecycle jobs write to."""
    query(dsn, jl.DDL)
    return dsn


# -- run_inline -----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_run_inline_runs_every_step_delays_skipped(ldsn):
    """run_inline runs a job whose steps are a day and an hour apart (To.delay) to the end at
    once; each step's write is committed (seen from another connection) and its try
    recorded."""
    task = run_inline(jl.delayed, {"n": 1})
    assert task.job == "lifecycle-delayed"
    assert task.status() is TaskState.SUCCEEDED
    assert effects(ldsn, task.id) == [
        (0, 1, "delayed-first"),
        (1, 1, "delayed-second"),
        (2, 1, "delayed-third"),
    ]
    assert attempts(ldsn, task.id) == [
        (0, 1, "succeeded"),
        (1, 1, "succeeded"),
        (2, 1, "succeeded"),
    ]


@pytest.mark.timeout(30)
def test_run_inline_retries_at_once_and_rolls_back_failed_tries(ldsn):
    """A step failing its first 3 of 4 tries (backoff: an hour) is retried at once and
    succeeds; the writes of the failed tries were rolled back, only the last one's
    committed."""
    task = run_inline(jl.flaky, {"fail_times": 3})
    assert task.status() is TaskState.SUCCEEDED
    assert attempts(ldsn, task.id) == [
        (0, 1, "failed"),
        (0, 2, "failed"),
        (0, 3, "failed"),
        (0, 4, "succeeded"),
    ]
    assert effects(ldsn, task.id) == [(0, 4, "flaky")]


@pytest.mark.timeout(30)
def test_run_inline_commits_each_step_on_its_own(ldsn):
    """Step 0 succeeds and step 1 fails for good: step 0's write stays committed (each step
    is its own transaction, as in a worker); with raise_on_failure=False the task is
    returned, failed, in its dead-letter queue."""
    query(ldsn, "INSERT INTO lifecycle_flag VALUES ('deliver')")
    task = run_inline(jl.dlq, {"n": 1}, raise_on_failure=False)
    assert task.status() is TaskState.FAILED
    assert effects(ldsn, task.id) == [(0, 1, "prepare")]
    assert [d.id for d in admin.dead_letters(jl.DEAD)] == [task.id]


@pytest.mark.timeout(30)
def test_task_failed_carries_the_last_error_and_its_traceback(ldsn):
    """A task failing every try raises TaskFailed (an UnderwayError) after all 3 tries; its
    message names the task and job and holds the last try's error and traceback."""
    with pytest.raises(TaskFailed) as caught:
        run_inline(jl.doomed, {"n": 1})
    assert isinstance(caught.value, UnderwayError)
    message = str(caught.value)
    task_id = scalar(ldsn, "SELECT id FROM underway.task")
    assert message.startswith(
        f"task {task_id} of job 'lifecycle-doomed' failed: KeyError: 'doomed on try 3'"
    )
    assert "Traceback (most recent call last)" in message
    assert "in explode_distinctively" in message
    assert attempts(ldsn, task_id) == [(0, 1, "failed"), (0, 2, "failed"), (0, 3, "failed")]


@pytest.mark.timeout(30)
def test_run_inline_without_raising_returns_the_failed_task(ldsn):
    """raise_on_failure=False returns the task, failed, instead of raising."""
    task = run_inline(jl.doomed, {"n": 1}, raise_on_failure=False)
    assert task.status() is TaskState.FAILED
    assert len(attempts(ldsn, task.id)) == 3


@pytest.mark.timeout(30)
def test_run_inline_with_an_explicit_dsn(ldsn):
    """With dsn= it works when no database is configured at all, and the task it returns
    answers from that database too."""
    underway.configure(dsn=None)
    task = run_inline(jl.one, {"n": 1}, dsn=ldsn)
    conn = psycopg2.connect(ldsn)
    try:
        assert task_info(task.id, conn=conn).state is TaskState.SUCCEEDED
    finally:
        conn.close()
    assert task.status() is TaskState.SUCCEEDED
    assert task.result(timeout=10) is None  # what its step returned, read from ldsn
    with pytest.raises(TaskFailed, match="doomed on try 3"):
        run_inline(jl.doomed, {"n": 2}, dsn=ldsn)
    failed = run_inline(jl.doomed, {"n": 3}, dsn=ldsn, raise_on_failure=False)
    failed.retry()
    assert failed.status() is TaskState.PENDING


# -- drain ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_drain_returns_the_number_of_steps_run(ldsn):
    """drain() runs every ready task of every job defined and returns how many steps (tries)
    ran: 2 two-step tasks and a one-step task make 5; then there is nothing left."""
    tasks = [*jl.two.enqueue_many([{"n": 1}, {"n": 2}]), jl.one.enqueue({"n": 3})]
    assert drain() == 5
    assert [t.status() for t in tasks] == ["succeeded"] * 3
    assert drain() == 0


@pytest.mark.timeout(30)
def test_drain_of_some_jobs_leaves_the_others(ldsn):
    """drain([job]) runs only that job's tasks."""
    mine = jl.one.enqueue({"n": 1})
    other = jl.two.enqueue({"n": 2})
    assert drain([jl.one]) == 1
    assert [mine.status(), other.status()] == ["succeeded", "pending"]


@pytest.mark.timeout(30)
def test_drain_runs_delayed_tasks_unless_told_not_to(ldsn):
    """run_delayed=False stops when only delayed steps or retries are left; the default
    makes them due at once and runs them."""
    staged = jl.delayed.enqueue({"n": 1})
    later = jl.one.enqueue({"n": 2}, delay=3600)
    retried = jl.flaky.enqueue({"fail_times": 1})
    assert drain(run_delayed=False) == 2  # staged's first step, retried's failed try
    assert [staged.status(), later.status(), retried.status()] == ["pending"] * 3
    assert scalar(ldsn, "SELECT step FROM underway.task WHERE id = %s", (staged.id,)) == 1
    assert drain(run_delayed=False) == 0
    assert drain() == 4  # staged's last two steps, later, retried's second try
    assert [staged.status(), later.status(), retried.status()] == ["succeeded"] * 3


@pytest.mark.timeout(30)
def test_drain_leaves_paused_queues_alone(ldsn):
    """Tasks of a paused queue, ready or delayed, are not run, and drain still returns."""
    admin.pause("lifecycle-one")
    jl.one.enqueue({"n": 1})
    jl.one.enqueue({"n": 2}, delay=3600)
    assert drain() == 0
    assert scalar(ldsn, "SELECT count(*) FROM underway.task WHERE state = 'pending'") == 2


@pytest.mark.timeout(30)
def test_drain_gives_up_at_the_limit_for_a_self_enqueueing_job(ldsn):
    """A job that enqueues itself forever: drain raises RuntimeError after exactly ``limit``
    steps, saying why."""
    jl.forever.enqueue(0)
    with pytest.raises(RuntimeError, match="drain ran 25 steps and tasks keep coming"):
        drain([jl.forever], limit=25)
    assert query(ldsn, "SELECT state::text, count(*) FROM underway.task GROUP BY 1 ORDER BY 1") == [
        ("pending", 1),
        ("succeeded", 25),
    ]


@pytest.mark.timeout(30)
def test_drain_of_exactly_limit_steps_does_not_raise(ldsn):
    """Two steps to run with limit=2: all the work is done and none keeps coming, so drain
    returns 2."""
    task = jl.two.enqueue({"n": 1})
    assert drain([jl.two], limit=2) == 2
    assert task.status() is TaskState.SUCCEEDED


@pytest.mark.timeout(30)
@pytest.mark.parametrize("paused", ["ready", "delayed"])
def test_drain_at_the_limit_is_not_fooled_by_paused_tasks(ldsn, paused):
    """Exactly ``limit`` steps ran and all that is left is a task in a paused queue (ready,
    or delayed): nothing keeps coming, so drain returns instead of raising."""
    admin.pause("lifecycle-one")
    held = jl.one.enqueue({"n": 1}, delay=3600 if paused == "delayed" else None)
    task = jl.two.enqueue({"n": 2})
    assert drain(limit=2) == 2
    assert [task.status(), held.status()] == ["succeeded", "pending"]


# -- how a project tests its own job (quoted by the README) ---------------------------------

welcome = Job("lifecycle-welcome-email")


@welcome.step
def write_email(cx, inp):
    with cx.cursor() as cur:
        cur.execute(
            "INSERT INTO outbox (user_id, subject) VALUES (%s, %s)",
            (inp["user_id"], "Welcome!"),
        )
    return To.next(inp)


@welcome.step
def mark_sent(cx, inp):
    with cx.cursor() as cur:
        cur.execute("UPDATE outbox SET sent = true WHERE user_id = %s", (inp["user_id"],))


@pytest.fixture
def db(empty_dsn):
    """A fresh database with underway's schema and the app's table (``empty_dsn`` is a new,
    empty database; a project would create its own)."""
    underway.configure(dsn=empty_dsn)
    underway.run_migrations()
    conn = psycopg2.connect(empty_dsn)
    with conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE outbox (user_id int PRIMARY KEY, subject text,"
            " sent boolean NOT NULL DEFAULT false)"
        )
    conn.close()
    return empty_dsn


@pytest.mark.timeout(30)
def test_welcome_email_is_written_once_and_marked_sent(db):
    """The user's view: run_inline runs both steps; the app's table shows their writes."""
    task = run_inline(welcome, {"user_id": 42})
    assert task.status() == "succeeded"
    conn = psycopg2.connect(db)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT user_id, subject, sent FROM outbox")
        assert cur.fetchall() == [(42, "Welcome!", True)]
    conn.close()


quick_retry = Job("testing-quick-retry", retry=RetryPolicy(max_attempts=2, initial_interval=0.05))


@quick_retry.step
def fail_the_first_try(cx, inp):
    """Fail the first try; its retry falls due 0.05 s later."""
    if cx.attempt == 1:
        raise RuntimeError("first try")
    return "second try"


@pytest.mark.timeout(30)
def test_run_inline_runs_a_retry_that_fell_due_meanwhile(dsn, monkeypatch):
    """A slow machine: the retry's short backoff runs out between the claim that found
    nothing due and the look for delayed tasks, which then finds none either. The task is
    due, so it still runs (it used to be left pending, and run_inline returned it so)."""
    import underway.testing as testing

    make_due = testing._make_delayed_due

    def once_the_retry_is_due(worker):
        wait_until(
            lambda: (
                not scalar(
                    dsn,
                    "SELECT count(*) FROM underway.task WHERE run_at > now() AND state = 'pending'",
                )
            ),
            timeout=10,
            message="the retry to fall due",
        )
        return make_due(worker)

    monkeypatch.setattr(testing, "_make_delayed_due", once_the_retry_is_due)
    task = run_inline(quick_retry)
    assert task.status() is TaskState.SUCCEEDED
    assert task.result(timeout=0) == "second try"
