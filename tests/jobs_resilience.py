"""Jobs for the resilience tests (issue #15): a step held at a file gate before it touches
the database, so a test can change the server between the step's start and its writes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jobs_faults import record

from underway import Job, RetryPolicy

#: One try only: a try charged by mistake fails the task.
gated = Job("resilience-gated", retry=RetryPolicy(max_attempts=1))


@gated.step
def wait_for_go(cx: Any, inp: dict[str, str]) -> None:
    """Say it started (a file), wait for the test's go (another file), then write an
    effect row through the worker's transaction, which begins only now."""
    Path(inp["started"]).write_text(str(cx.attempt))
    deadline = time.monotonic() + 60
    while not Path(inp["go"]).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    record(cx)
