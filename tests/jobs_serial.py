"""Jobs for ``tests/test_serial.py``: two jobs whose tasks share serial queues, and a plain one.

Imported by the test process (to enqueue, and to run in-process workers in threads) and by
``python -m underway.supervisor jobs_serial``. Names start with ``serial-``.

Every step records its run in ``serial_run`` through the step's own transaction (so a row
exists only for a try that committed), with:

- ``started``/``finished``: ``clock_timestamp()`` when the step began and ended;
- ``overlap``: whether another step of the same serial queue was inside its transaction at
  the same moment. Each step takes a transaction-level advisory lock named after its serial
  queue with ``pg_try_advisory_xact_lock`` as its first statement; the lock is held until the
  step's transaction (its writes *and* its outcome) commits, so a second task of the queue
  claimed before the first one's outcome committed finds it taken;
- ``peak``: in-process only, the most steps of the queue this process ran at once.

A step may be told to fail its first tries (``fail_tries``), to wait for an advisory lock the
test holds (``lock``), or to sleep (``sleep``).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

from jobs_common import sql

from underway import Job, RetryPolicy, To

DDL = """
CREATE TABLE IF NOT EXISTS serial_run (
    id bigserial PRIMARY KEY,
    task_id bigint NOT NULL,
    job text NOT NULL,
    step integer NOT NULL,
    queue text,
    seq integer,
    attempt integer NOT NULL,
    pid integer NOT NULL,
    overlap boolean NOT NULL,
    peak integer NOT NULL,
    started timestamptz NOT NULL,
    finished timestamptz NOT NULL
)
"""

#: The first key of the advisory locks that detect overlapping steps of a serial queue (the
#: second is the hash of the queue's name).
DETECTOR = 4747

# Steps running right now in this process, by serial queue (for in-process workers).
_active: Counter[str] = Counter()
_active_lock = threading.Lock()

#: A failed try is retried after 30 s: long enough to see what its queue does meanwhile.
RETRY = RetryPolicy(max_attempts=3, initial_interval=30)


def prepare(dsn: str) -> None:
    """Create the table the steps record their runs in."""
    sql(dsn, DDL)


def run(cx: Any, inp: Any) -> None:
    """Record one run of a task of a serial queue (or of none), doing what ``inp`` says."""
    queue = inp.get("queue")
    with cx.cursor() as cur:
        cur.execute(
            "SELECT clock_timestamp(),"
            " %(queue)s::text IS NULL OR pg_try_advisory_xact_lock(%(key)s, hashtext(%(queue)s))",
            {"queue": queue, "key": DETECTOR},
        )
        started, alone = cur.fetchone()
    with _active_lock:
        _active[queue] += 1
        peak = _active[queue]
    try:
        if cx.attempt <= inp.get("fail_tries", 0):
            raise RuntimeError(f"failing try {cx.attempt} on purpose")
        if "lock" in inp:
            with cx.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (inp["lock"],))
        time.sleep(inp.get("sleep", 0))
        with _active_lock:
            peak = max(peak, _active[queue])
        with cx.cursor() as cur:
            cur.execute(
                "INSERT INTO serial_run (task_id, job, step, queue, seq, attempt, pid, overlap,"
                " peak, started, finished)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, clock_timestamp())",
                (
                    cx.task_id,
                    cx.job,
                    cx.step,
                    queue,
                    inp.get("seq"),
                    cx.attempt,
                    os.getpid(),
                    not alone,
                    peak,
                    started,
                ),
            )
    finally:
        with _active_lock:
            _active[queue] -= 1


serial_a = Job("serial-a", retry=RETRY)
serial_a.step(run)

serial_b = Job("serial-b", retry=RETRY)
serial_b.step(run)

plain = Job("serial-plain")
plain.step(run)


two_steps = Job("serial-two-steps")


@two_steps.step
def first_step(cx: Any, inp: Any) -> To:
    """Record the run of step 0 and go straight on to step 1 (no delay)."""
    run(cx, inp)
    return To.next(inp)


two_steps.step(run)
