"""Jobs for ``tests/test_worker.py``, driven in-process by a :class:`underway.worker.Worker`.

Every step records its call in the test's ``effects`` table through ``cx`` (so the row is part of
the step's transaction), then does what its input asks: raise, raise ``Fatal``, enqueue a
follow-up, or return a given kind of value. Names start with ``worker-`` to stay unique.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import psycopg2

from underway import Fatal, Job, RetryPolicy, To


def record(cx: Any, inp: Any, note: str | None = None) -> None:
    """Write one ``effects`` row for this call, through the step's transaction."""
    with cx.cursor() as cur:
        cur.execute(
            "INSERT INTO effects (task_id, job, step, attempt, max_attempts, input, note)"
            " VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s)",
            (cx.task_id, cx.job, cx.step, cx.attempt, cx.max_attempts, json.dumps(inp), note),
        )


def explode(message: str) -> None:
    """Raise; a distinctive name for tracebacks to mention."""
    raise RuntimeError(message)


def behave(cx: Any, inp: dict[str, Any]) -> Any:
    """Act on the switches in ``inp`` (see the module docstring) and return the chosen value."""
    if inp.get("enqueue"):
        cx.enqueue(follow, {"from": cx.task_id})
    if inp.get("fatal"):
        raise Fatal(inp["fatal"])
    if cx.attempt <= inp.get("fail_times", 0):
        explode(f"boom on try {cx.attempt}")
    kind = inp.get("return", "none")
    if kind == "none":
        return None
    if kind == "done":
        return To.done()
    if kind == "next":
        return To.next({"too": "far"})
    if kind == "bad":
        return {"not": {"JSON"}}  # a set: no JSON value
    raise AssertionError(f"unknown return kind {kind!r}")


# -- one step, three tries, backoff 10 s then 20 s ------------------------------------------

act_job = Job(
    "worker-act",
    retry=RetryPolicy(max_attempts=3, initial_interval=10, backoff_coefficient=2),
)


@act_job.step
def act(cx: Any, inp: dict[str, Any]) -> Any:
    record(cx, inp, inp.get("note"))
    return behave(cx, inp)


# -- the target of cx.enqueue ---------------------------------------------------------------

follow = Job("worker-follow")


@follow.step
def followed(cx: Any, inp: Any) -> None:
    record(cx, inp, "follow")


# -- two steps: step 0 passes on a value, step 1 may fail its first tries --------------------

two_step = Job("worker-two-step", retry=RetryPolicy(max_attempts=6, initial_interval=10))


@two_step.step
def first(cx: Any, inp: dict[str, Any]) -> To:
    record(cx, inp)
    return To.next({**inp, "doubled": inp["value"] * 2})


@two_step.step
def second(cx: Any, inp: dict[str, Any]) -> Any:
    record(cx, inp)
    return behave(cx, inp)


# -- capped backoff: 10 s, then 25 s (not 30), then 25 s (not 90) ---------------------------

capped = Job(
    "worker-capped",
    retry=RetryPolicy(max_attempts=4, initial_interval=10, backoff_coefficient=3, max_interval=25),
)


@capped.step
def always_fails(cx: Any, inp: Any) -> None:
    explode("capped")


# -- per-step retry policy: step 0 has the job's 5 tries, step 1 only 2 ---------------------

per_step = Job("worker-per-step", retry=RetryPolicy(max_attempts=5, initial_interval=0))


@per_step.step
def lenient(cx: Any, inp: dict[str, Any]) -> To:
    record(cx, inp)
    if cx.attempt <= inp["step0_failures"]:
        explode(f"step 0 try {cx.attempt}")
    return To.next(inp)


@per_step.step(retry=RetryPolicy(max_attempts=2, initial_interval=0))
def strict(cx: Any, inp: Any) -> None:
    record(cx, inp)
    explode(f"step 1 try {cx.attempt}")


# -- To.delay between steps ------------------------------------------------------------------

delayed = Job("worker-delayed")


@delayed.step
def wait_a_minute(cx: Any, inp: Any) -> To:
    record(cx, inp)
    return To.delay(timedelta(seconds=60), {"after": inp})


@delayed.step
def after_the_wait(cx: Any, inp: Any) -> None:
    record(cx, inp)


# -- never given to the test's workers ------------------------------------------------------

unknown = Job("worker-unknown")


@unknown.step
def never_run(cx: Any, inp: Any) -> None:
    record(cx, inp, "unknown ran")


# -- the connection dies under a failing step -----------------------------------------------

kill_then_raise = Job("worker-kill-then-raise")


@kill_then_raise.step
def kill_own_backend_then_raise(cx: Any, inp: dict[str, Any]) -> None:
    """On try ``kill_on``, terminate this worker's session from another connection, then fail
    the step; on any other try, record the call and succeed."""
    if cx.attempt != inp["kill_on"]:
        record(cx, inp)
        return
    other = psycopg2.connect(inp["dsn"])
    try:
        other.autocommit = True
        with other.cursor() as cur:
            cur.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000))"
                " FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE %s",
                ("underway worker%",),
            )
            (killed,) = cur.fetchone()
    finally:
        other.close()
    if killed != 1:
        raise AssertionError(f"expected to terminate one worker session, terminated {killed}")
    explode("failed after the connection died")
