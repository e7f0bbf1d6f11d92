"""Jobs for the lifecycle, admin and testing-helper tests (``test_lifecycle.py``,
``test_admin.py``, ``test_testing_helpers.py``). Names start with ``lifecycle-``.

Imported by the test process (to enqueue, or to run steps in-process) and by
``python -m underway.supervisor jobs_lifecycle`` (to run them in real workers). Every step
that does something writes one ``lifecycle_effect`` row through ``cx``, so a row proves that
try's transaction committed. A step told to wait (``inp["lock"]``) takes a shared advisory
lock the test holds (the ``gate`` fixture): the test decides when it may finish, and sees it
waiting in ``pg_locks``.

Whether a step fails is read from ``lifecycle_flag`` in the step's own transaction, so a
test can make a step fail and later let it succeed (to re-drive a dead letter, say).
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta
from typing import Any

from jobs_common import sql

from underway import Fatal, Job, RetryPolicy, To

DDL = """
CREATE TABLE IF NOT EXISTS lifecycle_effect (
    id bigserial PRIMARY KEY,
    task_id bigint NOT NULL,
    job text NOT NULL,
    step integer NOT NULL,
    attempt integer NOT NULL,
    note text,
    input jsonb,
    pid integer NOT NULL
);
CREATE TABLE IF NOT EXISTS lifecycle_flag (name text PRIMARY KEY);
"""

#: The dead-letter queue of the jobs below that have one.
DEAD = "lifecycle-dead"

#: Retries at once (almost): tests never wait for a backoff.
QUICK = RetryPolicy(max_attempts=3, initial_interval=0.01, max_interval=0.01)


def record(cx: Any, inp: Any = None, note: str | None = None) -> None:
    """Write this try's effect row in the step's transaction."""
    with cx.cursor() as cur:
        cur.execute(
            "INSERT INTO lifecycle_effect (task_id, job, step, attempt, note, input, pid)"
            " VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s)",
            (cx.task_id, cx.job, cx.step, cx.attempt, note, json.dumps(inp), os.getpid()),
        )


def wait_for_gate(cx: Any, inp: Any) -> None:
    """Wait, inside the step's transaction, until the test releases lock ``inp['lock']``."""
    if isinstance(inp, dict) and inp.get("lock") is not None:
        with cx.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (inp["lock"],))


def flag_set(cx: Any, name: str) -> bool:
    """Whether the test has raised flag ``name`` (read in the step's transaction)."""
    with cx.cursor() as cur:
        cur.execute("SELECT EXISTS (SELECT 1 FROM lifecycle_flag WHERE name = %s)", (name,))
        return bool(cur.fetchone()[0])


# -- two steps: the first may wait on the gate or delay the second ---------------------------

two = Job("lifecycle-two", retry=QUICK)


@two.step
def first(cx: Any, inp: Any) -> To:
    """Record, wait for the gate if told to, go on (now, or after ``inp['delay']`` s)."""
    record(cx, inp, "first")
    wait_for_gate(cx, inp)
    if isinstance(inp, dict) and inp.get("delay"):
        return To.delay(inp["delay"], {"stage": 2})
    return To.next({"stage": 2})


@two.step
def second(cx: Any, inp: Any) -> None:
    """Record, done."""
    record(cx, inp, "second")


# -- one step that records, for races and for "other queues flow" ---------------------------

one = Job("lifecycle-one", retry=QUICK)


@one.step
def only(cx: Any, inp: Any) -> None:
    """Record, done."""
    record(cx, inp, "only")


# -- a long step that polls cx.cancelled ----------------------------------------------------

poll = Job("lifecycle-poll", retry=RetryPolicy(max_attempts=1))


@poll.step
def watch(cx: Any, inp: Any) -> To:
    """Record, then poll ``cx.cancelled`` (inside the step's open transaction) until it says
    so; give up with an error after 30 s."""
    record(cx, inp, "polling")
    deadline = time.monotonic() + 30
    while not cx.cancelled:
        if time.monotonic() > deadline:
            raise RuntimeError("cx.cancelled never became true")
        time.sleep(0.01)
    record(cx, inp, "stopped early")
    return To.next(inp)


@poll.step
def after_watch(cx: Any, inp: Any) -> None:
    """Must never run for a cancelled task."""
    record(cx, inp, "after")


# -- a step that waits on the gate, then fails ----------------------------------------------

fail_block = Job("lifecycle-fail-block", retry=RetryPolicy(max_attempts=5, initial_interval=0.01))


@fail_block.step
def fail_later(cx: Any, inp: Any) -> None:
    """Wait for the gate (first try only), then fail."""
    if cx.attempt == 1:
        wait_for_gate(cx, inp)
    raise RuntimeError(f"failing try {cx.attempt}")


# -- dead-letter queues ---------------------------------------------------------------------

dlq = Job("lifecycle-dlq", retry=QUICK, dead_letter_queue=DEAD)


@dlq.step
def prepare(cx: Any, inp: Any) -> To:
    """Record, go on."""
    record(cx, inp, "prepare")
    return To.next(inp)


@dlq.step
def deliver(cx: Any, inp: Any) -> None:
    """Fail while flag ``inp['flag']`` (default 'deliver') is raised, or Fatal when told to
    (with the flag raised); else record, done."""
    if flag_set(cx, inp.get("flag", "deliver")):
        if inp.get("fatal"):
            raise Fatal("cannot deliver, ever")
        raise RuntimeError(f"cannot deliver yet (try {cx.attempt})")
    record(cx, inp, "deliver")


no_dlq = Job("lifecycle-no-dlq", retry=QUICK)


@no_dlq.step
def always_fails(cx: Any, inp: Any) -> None:
    """Fail, every time."""
    raise RuntimeError("no dead-letter queue for me")


crash = Job(
    "lifecycle-crash",
    retry=RetryPolicy(max_attempts=2, initial_interval=0.01),
    dead_letter_queue=DEAD,
)


@crash.step
def crash_on_last_try(cx: Any, inp: Any) -> None:
    """Fail the first try; SIGKILL the worker on the last one, before anything commits."""
    if cx.attempt < cx.max_attempts:
        raise RuntimeError("first try fails")
    os.kill(os.getpid(), signal.SIGKILL)


single_try = Job("lifecycle-single-try", retry=RetryPolicy(max_attempts=1), dead_letter_queue=DEAD)


@single_try.step
def single(cx: Any, inp: Any) -> None:
    """Record, done (tests claim it and let the lease lapse instead of running it)."""
    record(cx, inp, "single")


# -- job keys -------------------------------------------------------------------------------

keyed = Job("lifecycle-keyed", retry=QUICK)


@keyed.step
def keyed_first(cx: Any, inp: Any) -> To:
    """Record; go on to the second step (an hour later when ``inp['wait']``)."""
    record(cx, inp, "keyed-first")
    if isinstance(inp, dict) and inp.get("wait"):
        return To.delay(timedelta(hours=1), {"stage": "second", "from": inp})
    return To.next({"stage": "second", "from": inp})


@keyed.step
def keyed_second(cx: Any, inp: Any) -> None:
    """Record, done."""
    record(cx, inp, "keyed-second")


# -- queues ---------------------------------------------------------------------------------

shared_a = Job("lifecycle-shared-a", queue="lifecycle-shared")
shared_b = Job("lifecycle-shared-b", queue="lifecycle-shared")


@shared_a.step
def run_a(cx: Any, inp: Any) -> None:
    record(cx, inp, "a")


@shared_b.step
def run_b(cx: Any, inp: Any) -> None:
    record(cx, inp, "b")


# -- retention ------------------------------------------------------------------------------

kept = Job("lifecycle-kept", keep_for=timedelta(hours=1), retry=RetryPolicy(max_attempts=1))


@kept.step
def kept_step(cx: Any, inp: Any) -> None:
    """Fail when told to, else record."""
    if isinstance(inp, dict) and inp.get("fail"):
        raise RuntimeError("told to fail")
    record(cx, inp, "kept")


# -- for the testing helpers ----------------------------------------------------------------

flaky = Job("lifecycle-flaky", retry=RetryPolicy(max_attempts=4, initial_interval=3600))


@flaky.step
def flaky_step(cx: Any, inp: Any) -> None:
    """Record, then fail the first ``inp['fail_times']`` tries (the record rolls back)."""
    record(cx, inp, "flaky")
    if cx.attempt <= inp.get("fail_times", 0):
        raise ValueError(f"flaky failure on try {cx.attempt}")


def explode_distinctively(message: str) -> None:
    """Raise; a name for tracebacks to show."""
    raise KeyError(message)


doomed = Job("lifecycle-doomed", retry=RetryPolicy(max_attempts=3, initial_interval=3600))


@doomed.step
def doomed_step(cx: Any, inp: Any) -> None:
    """Fail every try, from a function of its own."""
    explode_distinctively(f"doomed on try {cx.attempt}")


delayed = Job("lifecycle-delayed")


@delayed.step
def delayed_first(cx: Any, inp: Any) -> To:
    """Record; the next step runs in a day."""
    record(cx, inp, "delayed-first")
    return To.delay(timedelta(days=1), inp)


@delayed.step
def delayed_second(cx: Any, inp: Any) -> To:
    """Record; the last step runs in an hour."""
    record(cx, inp, "delayed-second")
    return To.delay(3600, inp)


@delayed.step
def delayed_third(cx: Any, inp: Any) -> None:
    record(cx, inp, "delayed-third")


forever = Job("lifecycle-forever")


@forever.step
def again(cx: Any, inp: Any) -> None:
    """Enqueue another run of this job, forever."""
    cx.enqueue(forever, inp + 1)


# -- what the tests read back -------------------------------------------------------------


def effects(dsn: str, task_id: int) -> list[tuple[Any, ...]]:
    """(step, attempt, note) of every committed step call of a task, in order."""
    return sql(
        dsn,
        "SELECT step, attempt, note FROM lifecycle_effect WHERE task_id = %s ORDER BY id",
        (task_id,),
    )


def attempts(dsn: str, task_id: int) -> list[tuple[Any, ...]]:
    """(step, attempt, outcome) of every recorded try of a task, oldest first."""
    return sql(
        dsn,
        "SELECT step, attempt, outcome FROM underway.attempt WHERE task_id = %s ORDER BY id",
        (task_id,),
    )
