"""RQ's no-op job, run by ``rq worker`` (forking Worker or SimpleWorker)."""

from __future__ import annotations

from bench.probe import mark


def noop(i: int) -> None:
    """The no-op job: only the probe's mark."""
    mark(i)
