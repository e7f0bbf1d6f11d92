"""Jobs for the tests of issue #13's API (``test_results.py``, ``test_limits.py``,
``test_api.py``): results, run_at, honest cancellation and abort, retry of failed tasks,
rate and concurrency limits, retry filters. Names start with ``api-``.

Imported by the test process (to enqueue, or to run steps in-process) and by
``python -m underway.supervisor jobs_api`` (to run them in real workers). This module
imports no other test job module, so a supervisor for it runs these jobs only.

Steps that do something write an ``api_effect`` row through ``cx`` (it commits with the
step), or, where the row must be seen while the step still runs, through a short
connection of their own (the DSN travels in the input, as ``inp["dsn"]``).
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from datetime import datetime, timedelta
from typing import Any

import psycopg2
from jobs_common import sql

from underway import Fatal, Job, RetryPolicy, To

DDL = """
CREATE TABLE IF NOT EXISTS api_effect (
    id bigserial PRIMARY KEY,
    task_id bigint NOT NULL,
    job text NOT NULL,
    step integer NOT NULL,
    attempt integer NOT NULL,
    note text,
    input jsonb,
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS api_flag (name text PRIMARY KEY);
"""

#: Where the tasks of ``api-flaky-dlq`` go when they fail for good.
DEAD = "api-dead"

#: Retries at once (almost): tests never wait for a backoff.
QUICK = RetryPolicy(max_attempts=2, initial_interval=0.01, max_interval=0.01)

#: The concurrency group two jobs share, and its limit.
GROUP = "api-group"
GROUP_LIMIT = 2

#: The rate-limited queue, and its limit (per second).
RATED_QUEUE = "api-rated"
RATE = 10


def record(cx: Any, inp: Any = None, note: str | None = None) -> None:
    """Write this try's effect row in the step's transaction."""
    with cx.cursor() as cur:
        cur.execute(
            "INSERT INTO api_effect (task_id, job, step, attempt, note, input, pid)"
            " VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s)",
            (cx.task_id, cx.job, cx.step, cx.attempt, note, json.dumps(inp), os.getpid()),
        )


def record_now(cx: Any, dsn: str, note: str) -> None:
    """Write an effect row at once, on a short connection of the step's own (seen while the
    step still runs, and kept whatever becomes of the step)."""
    sql(
        dsn,
        "INSERT INTO api_effect (task_id, job, step, attempt, note, pid)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (cx.task_id, cx.job, cx.step, cx.attempt, note, os.getpid()),
    )


def wait_for_gate(cx: Any, inp: Any) -> None:
    """Wait, inside the step's transaction, until the test releases lock ``inp['lock']``."""
    if isinstance(inp, dict) and inp.get("lock") is not None:
        with cx.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (inp["lock"],))


def flag_set(cx: Any, name: str) -> bool:
    """Whether the test has raised flag ``name`` (read in the step's transaction)."""
    with cx.cursor() as cur:
        cur.execute("SELECT EXISTS (SELECT 1 FROM api_flag WHERE name = %s)", (name,))
        return bool(cur.fetchone()[0])


class NotJson:
    """A value json.dumps refuses."""


def bad_value(kind: str) -> Any:
    """A value that cannot be stored as JSON, of the kind asked for."""
    return {"object": NotJson(), "nan": float("nan"), "nul": "a\x00b"}[kind]


# -- results --------------------------------------------------------------------------------

echo = Job("api-echo", retry=RetryPolicy(max_attempts=1))


@echo.step
def echo_back(cx: Any, inp: Any) -> Any:
    """The last (only) step returns its input as a plain value: the task's result."""
    record(cx, inp, "echo")
    return inp


chain = Job("api-chain", retry=RetryPolicy(max_attempts=1))


@chain.step
def chain_first(cx: Any, inp: Any) -> Any:
    """A plain value from a middle step: the next step's input."""
    record(cx, inp, "first")
    return {"n": inp["n"] + 1, "seen": ["first"]}


@chain.step
def chain_second(cx: Any, inp: Any) -> Any:
    """Stop early with To.done(value) when told to; else a plain value goes on."""
    record(cx, inp, "second")
    if inp["n"] > 10:
        return To.done({"stopped_at": "second", "n": inp["n"]})
    return {"n": inp["n"] * 10, "seen": [*inp["seen"], "second"]}


@chain.step
def chain_third(cx: Any, inp: Any) -> Any:
    """The last step's plain value is the result."""
    record(cx, inp, "third")
    return {"result": inp["n"] + 1, "seen": [*inp["seen"], "third"]}


done = Job("api-done", retry=RetryPolicy(max_attempts=1))


@done.step
def done_with(cx: Any, inp: Any) -> To:
    """To.done(value): the value is the result; To.done() (no value) is a None result."""
    record(cx, inp, "done")
    return To.done(inp.get("value")) if "value" in inp else To.done()


nothing = Job("api-nothing")


@nothing.step
def returns_none(cx: Any, inp: Any) -> None:
    """Returns None: done, with no result."""
    record(cx, inp, "nothing")


bad_output = Job("api-bad-output", retry=RetryPolicy(max_attempts=3, initial_interval=0.01))


@bad_output.step
def maybe_bad_middle(cx: Any, inp: Any) -> Any:
    """Return a value JSON cannot hold when told (``where == 'middle'``)."""
    if inp["where"] == "middle":
        return bad_value(inp["kind"])
    return inp


@bad_output.step
def maybe_bad_last(cx: Any, inp: Any) -> Any:
    """Return a value JSON cannot hold as the result."""
    return bad_value(inp["kind"])


last_to_next = Job("api-last-to-next", retry=RetryPolicy(max_attempts=3))


@last_to_next.step
def only_step_goes_on(cx: Any, inp: Any) -> To:
    """The last step asks for a next step: a mistake, fatal at once."""
    return To.next(inp)


def explode_for_the_traceback(message: str) -> None:
    """Raise; a name for tracebacks to show."""
    raise RuntimeError(message)


fails = Job("api-fails", retry=RetryPolicy(max_attempts=2, initial_interval=0.01))


@fails.step
def failing_step(cx: Any, inp: Any) -> None:
    """Fail every try, from a function of its own."""
    explode_for_the_traceback(f"no luck on try {cx.attempt}")


kept = Job("api-kept", keep_for=timedelta(hours=1))


@kept.step
def kept_step(cx: Any, inp: Any) -> Any:
    """Return a result that is kept for an hour."""
    return {"kept": inp}


gated = Job("api-gated", retry=RetryPolicy(max_attempts=1))


@gated.step
def gated_first(cx: Any, inp: Any) -> Any:
    """Record, wait for the gate ``inp['lock']``, go on."""
    record(cx, inp, "gated-first")
    wait_for_gate(cx, inp)
    return {"from": "first", "second_lock": inp.get("second_lock")}


@gated.step
def gated_last(cx: Any, inp: Any) -> Any:
    """Record, wait for the gate ``inp['second_lock']``, return the result."""
    record(cx, inp, "gated-last")
    wait_for_gate(cx, {"lock": inp.get("second_lock")})
    return {"finished": True}


own_row = Job("api-own-row", retry=RetryPolicy(max_attempts=1))


@own_row.step
def locks_own_row(cx: Any, inp: Any) -> Any:
    """Lock the task's own row in the step's transaction, wait for the gate, return a value:
    the task row stays locked until the worker commits the step's outcome."""
    with cx.cursor() as cur:
        cur.execute("SELECT 1 FROM underway.task WHERE id = %s FOR UPDATE", (cx.task_id,))
    wait_for_gate(cx, inp)
    return {"value": inp["value"]}


spawner = Job("api-spawner", retry=RetryPolicy(max_attempts=1))


@spawner.step
def spawn_at(cx: Any, inp: Any) -> Any:
    """Enqueue an api-echo task at an absolute time, in the step's transaction."""
    when = datetime.fromisoformat(inp["run_at"])
    task = cx.enqueue(echo, {"spawned": True}, run_at=when)
    return task.id


# -- abort: steps stuck where Python cannot reach them -----------------------------------


stuck_sql = Job("api-stuck-sql")


@stuck_sql.step
def sleep_in_the_database(cx: Any, inp: Any) -> None:
    """Wait 10 minutes in ``SELECT pg_sleep(600)`` on a connection of the step's own."""
    conn = psycopg2.connect(inp["dsn"], application_name=f"api-stuck {cx.task_id}")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_sleep(600)")
    record(cx, inp, "woke up")


stuck_c = Job("api-stuck-c")


@stuck_c.step
def sleep_in_c(cx: Any, inp: Any) -> None:
    """Say so, then sleep 10 minutes in libc's sleep(), where no Python code runs."""
    record_now(cx, inp["dsn"], "sleeping in C")
    libc = ctypes.CDLL(None)
    libc.sleep(600)
    record(cx, inp, "woke up")


stuck_once = Job("api-stuck-once", retry=RetryPolicy(max_attempts=1), dead_letter_queue=DEAD)


@stuck_once.step
def sleep_in_c_once(cx: Any, inp: Any) -> None:
    """As ``api-stuck-c``, for a task with a single try."""
    record_now(cx, inp["dsn"], "sleeping in C")
    ctypes.CDLL(None).sleep(600)
    record(cx, inp, "woke up")


# -- retry of failed tasks ------------------------------------------------------------------

flaky = Job("api-flaky", retry=QUICK)


@flaky.step
def flaky_prepare(cx: Any, inp: Any) -> Any:
    """Record, go on."""
    record(cx, inp, "prepare")
    return {"prepared": inp}


@flaky.step
def flaky_deliver(cx: Any, inp: Any) -> Any:
    """Fail while flag 'deliver' is raised; else record and return a result."""
    if flag_set(cx, "deliver"):
        raise RuntimeError(f"cannot deliver yet (try {cx.attempt})")
    record(cx, inp, "deliver")
    return {"delivered": inp}


flaky_dlq = Job("api-flaky-dlq", retry=QUICK, dead_letter_queue=DEAD)


@flaky_dlq.step
def dlq_prepare(cx: Any, inp: Any) -> Any:
    """Record, go on."""
    record(cx, inp, "prepare")
    return {"prepared": inp}


@flaky_dlq.step
def dlq_deliver(cx: Any, inp: Any) -> Any:
    """Fail while flag 'deliver' is raised; else record and return a result."""
    if flag_set(cx, "deliver"):
        raise RuntimeError(f"cannot deliver yet (try {cx.attempt})")
    record(cx, inp, "deliver")
    return {"delivered": inp}


# -- retry filters -------------------------------------------------------------------------

picky = Job(
    "api-picky",
    retry=RetryPolicy(max_attempts=3, initial_interval=0.01, retry_on=(ConnectionError,)),
)


@picky.step
def raise_what_told(cx: Any, inp: Any) -> Any:
    """Raise the exception named in the input on every try but the last; then succeed."""
    record(cx, inp, "try")
    if cx.attempt < cx.max_attempts:
        kind = {
            "ConnectionRefusedError": ConnectionRefusedError,
            "ConnectionError": ConnectionError,
            "ValueError": ValueError,
            "Fatal": Fatal,
        }[inp["raise"]]
        raise kind(f"{inp['raise']} on try {cx.attempt}")
    return "made it"


# -- rate and concurrency limits ------------------------------------------------------------

rated = Job("api-rated", queue=RATED_QUEUE, rate_limit=f"{RATE}/s")


@rated.step
def rated_step(cx: Any, inp: Any) -> None:
    """Record, done."""
    record(cx, inp, "rated")


free = Job("api-free")


@free.step
def free_step(cx: Any, inp: Any) -> None:
    """Record, done (an unlimited queue)."""
    record(cx, inp, "free")


def measured(cx: Any, inp: Any) -> None:
    """Record the start and the end of the step's work at once (own connection, clock time),
    sleeping ``inp['sleep']`` seconds between (``inp['then_sleep']`` on later tries)."""
    record_now(cx, inp["dsn"], "start")
    time.sleep(inp["sleep"] if cx.attempt == 1 else inp.get("then_sleep", inp["sleep"]))
    record_now(cx, inp["dsn"], "end")


group_a = Job("api-group-a", concurrency_group=GROUP, max_concurrency=GROUP_LIMIT)
group_b = Job("api-group-b", concurrency_group=GROUP, max_concurrency=GROUP_LIMIT)
group_a.step(measured)
group_b.step(measured)

solo = Job("api-solo", max_concurrency=3)


@solo.step
def solo_step(cx: Any, inp: Any) -> None:
    """Record, done (a job limited to 3 at once on its own)."""
    record(cx, inp, "solo")


def effects(dsn: str, task_id: int) -> list[tuple[Any, ...]]:
    """(step, attempt, note) of every committed step call of a task, in order."""
    return sql(
        dsn,
        "SELECT step, attempt, note FROM api_effect WHERE task_id = %s ORDER BY id",
        (task_id,),
    )


def effect_inputs(dsn: str, task_id: int) -> list[tuple[Any, ...]]:
    """(note, input) of every committed step call of a task, in order."""
    return sql(dsn, "SELECT note, input FROM api_effect WHERE task_id = %s ORDER BY id", (task_id,))


def attempts(dsn: str, task_id: int) -> list[tuple[Any, ...]]:
    """(step, attempt, outcome) of every recorded try of a task, oldest first."""
    return sql(
        dsn,
        "SELECT step, attempt, outcome FROM underway.attempt WHERE task_id = %s ORDER BY id",
        (task_id,),
    )


# -- for the tests, in the test process -----------------------------------------------------

#: The jobs an in-process worker may run: none that blocks, sleeps for long or is limited.
IN_PROCESS = (
    echo,
    chain,
    done,
    nothing,
    bad_output,
    last_to_next,
    fails,
    kept,
    spawner,
    flaky,
    flaky_dlq,
    picky,
)


def run_all(worker: Any, dsn: str) -> int:
    """Run the worker's ready tasks until none is left, making retries and delayed steps due
    at once (moved an hour back, so a task is moved once per wait). Returns the steps run."""
    ran = 0
    while True:
        while worker.run_once():
            ran += 1
        moved = sql(
            dsn,
            "UPDATE underway.task SET run_at = now() - interval '1 hour'"
            " WHERE state = 'pending' AND job = ANY(%s) AND run_at > now() - interval '1 hour'"
            " AND coalesce(queue, job) NOT IN (SELECT queue FROM underway.paused_queue)"
            " RETURNING id",
            (worker.job_names,),
        )
        if not moved:
            return ran


def state(dsn: str, task_id: int) -> str | None:
    """The task's state, as text; None once it is gone."""
    rows = sql(dsn, "SELECT state::text FROM underway.task WHERE id = %s", (task_id,))
    return rows[0][0] if rows else None
