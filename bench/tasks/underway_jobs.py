"""underway's no-op jobs and two-step job, run by ``python -m underway.supervisor``.

``bench-steady`` is the no-op job of the steady-load run (``bench/scale.py``): its finished
tasks are kept for ``$BENCH_KEEP_FOR`` seconds only (default 60), so retention and
autovacuum reach a steady state within the run, as they do in production over ``keep_for``.

The two-step job's second step marks its probe slot ``$BENCH_TOTAL`` places after the first
step's, so the drain span covers both steps of every run.
"""

from __future__ import annotations

import os
from typing import Any

from bench.probe import mark
from underway import Job, To

TOTAL = int(os.environ.get("BENCH_TOTAL", "0"))

noop = Job("bench-noop")
two_step = Job("bench-two-step")
steady = Job("bench-steady", keep_for=float(os.environ.get("BENCH_KEEP_FOR", "60")))


@noop.step
def run(cx: Any, i: int) -> None:
    """The no-op step: only the probe's mark."""
    mark(i)


@steady.step
def tick(cx: Any, i: int) -> None:
    """The steady-load no-op step: only the probe's mark."""
    mark(i)


@two_step.step
def first(cx: Any, i: int) -> To:
    """Step one: mark, and hand the index on to step two."""
    mark(i)
    return To.next(i)


@two_step.step
def second(cx: Any, i: int) -> None:
    """Step two: mark the run's second slot."""
    mark(TOTAL + i)
