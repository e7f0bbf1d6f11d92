"""Jobs for tests/test_enqueue.py. They are only enqueued, never run by a worker."""

from __future__ import annotations

import os

from underway import Job, RetryPolicy, To

#: A two-step job whose first step overrides the job's retry policy: a new task's
#: ``max_attempts`` must come from that first step (7), not the job (3) or the default (5).
basic = Job("enqueue-basic", retry=RetryPolicy(max_attempts=3))


@basic.step(retry=RetryPolicy(max_attempts=7))
def first(cx, inp):
    return To.next(inp)


@basic.step
def second(cx, inp):
    return To.done()


#: A job with a default priority of its own.
prioritised = Job("enqueue-prioritised", priority=5)


@prioritised.step
def only(cx, inp):
    return None


def enqueue_range(start: int, count: int = 50) -> int:
    """Enqueue ``count`` tasks of ``basic`` one at a time, inputs ``{"n": start + i}``, on
    the process connection; return this process's pid (run in multiprocessing workers)."""
    for n in range(start, start + count):
        basic.enqueue({"n": n, "pid": os.getpid()})
    return os.getpid()
