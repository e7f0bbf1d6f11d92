"""Prometheus metrics, when enabled (the ``[metrics]`` extra): what workers count per job
and step, and what the supervisor counts of its workers.

Until :func:`enable` is called these functions do nothing, at no cost per task.
"""

from __future__ import annotations

_enabled = False


def task_started(job: str, waited: float) -> None:
    """A try began, ``waited`` seconds after its task was due (its pickup latency)."""


def task_finished(job: str, step: str, event: str, duration: float) -> None:
    """A try of ``step`` ended in ``event`` (succeeded, advanced, retrying, failed, ...)
    after ``duration`` seconds."""


def worker_restarted() -> None:
    """The supervisor started a worker again after one died."""


def serve(port: int, dsn: str) -> None:
    """Serve the metrics of this supervisor and its workers over HTTP on ``port``, from
    this process, before the workers are forked."""
    raise NotImplementedError("metrics need the [metrics] extra")


def exposition(dsn: str | None = None) -> tuple[bytes, str]:
    """The Prometheus text exposition: this process's (and its workers') counters, if
    enabled, and each queue's depth and lag, read from the database now. Returns the body
    and its content type."""
    from . import admin

    lines = [
        "# HELP underway_queue_depth Tasks of a queue by state.",
        "# TYPE underway_queue_depth gauge",
    ]
    summaries = admin.queues()
    for q in summaries:
        for state in ("pending", "running", "failed"):
            lines.append(
                f'underway_queue_depth{{queue="{q.queue}",state="{state}"}} {getattr(q, state)}'
            )
    lines += [
        "# HELP underway_queue_lag_seconds How long the oldest ready task of a queue has waited.",
        "# TYPE underway_queue_lag_seconds gauge",
    ]
    lines += [f'underway_queue_lag_seconds{{queue="{q.queue}"}} {q.lag or 0}' for q in summaries]
    return ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4; charset=utf-8"
