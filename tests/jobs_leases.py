"""Jobs for the lease tests (``test_leases.py``).

Imported by the test process (to enqueue) and by ``python -m underway.supervisor jobs_leases``
(to run). Like the fault jobs, every try writes one effect row (``jobs_faults.record``: task,
step, attempt and the worker's pid) through the step's own transaction, so the rows that
stay tell which tries committed, and on which worker.

A step then waits for the advisory lock the input names *for its try*: ``{"locks": {"1": k}}``
makes try 1 wait for lock ``k`` (which the test holds, see ``jobs_faults.Gate``) while later
tries go straight on; a key for try 2 makes the rerun wait as well, so that the test decides
when each holder of the task may try to record its outcome.
"""

from __future__ import annotations

from typing import Any

from jobs_faults import record

from underway import Job, RetryPolicy, To


def wait_for_gate(cx: Any, inp: Any) -> None:
    """Wait (in the step's transaction) for the lock the input names for this try, if any."""
    key = inp.get("locks", {}).get(str(cx.attempt))
    if key is not None:
        with cx.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (key,))


gated = Job("leases-gated", retry=RetryPolicy(max_attempts=3, initial_interval=0.05))


@gated.step
def work(cx: Any, inp: Any) -> To:
    """Record, wait for this try's gate, then end as ``inp['then']`` says: ``done`` (the
    default) finishes the run, ``next`` goes on to step 1, ``fail`` raises on try 1 only."""
    record(cx)
    wait_for_gate(cx, inp)
    then = inp.get("then", "done")
    if then == "fail" and cx.attempt == 1:
        raise RuntimeError("the first try fails after its gate")
    if then == "next":
        return To.next(inp)
    return To.done()


@gated.step
def follow(cx: Any, inp: Any) -> None:
    """Step 1 (after ``then: next``): record, done."""
    record(cx)


last_try = Job("leases-last-try", retry=RetryPolicy(max_attempts=1))


@last_try.step
def only_try(cx: Any, inp: Any) -> None:
    """Record, wait for this try's gate; the job has one try only."""
    record(cx)
    wait_for_gate(cx, inp)
