"""A worker's count of finished tries per minute, queue and job, added to the database's
per-minute statistics in one statement every few seconds: the throughput chart, at no
cost per task."""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any

FLUSH_INTERVAL = 5.0
"""Seconds between two flushes of a busy worker's tally."""

_COLUMNS = {"succeeded": "succeeded", "failed": "failed", "retrying": "retried"}


class Tally:
    """Finished tries counted in memory until :meth:`take`."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[datetime, str, str, str]] = Counter()
        self._last_flush = time.monotonic()

    def count(self, queue: str, job: str, event: str) -> None:
        """Count one try that ended in ``event`` (only the end of a task, or a retry)."""
        column = _COLUMNS.get(event)
        if column is not None:
            minute = datetime.now(timezone.utc).replace(second=0, microsecond=0)
            self._counts[(minute, queue, job, column)] += 1

    def __bool__(self) -> bool:
        return bool(self._counts)

    def due(self) -> bool:
        """Whether it is time to flush."""
        return bool(self._counts) and time.monotonic() - self._last_flush >= FLUSH_INTERVAL

    def take(self) -> list[dict[str, Any]]:
        """The counts as rows for ``store.count_finished``, emptying the tally."""
        rows: dict[tuple[datetime, str, str], dict[str, Any]] = {}
        for (minute, queue, job, column), n in self._counts.items():
            row = rows.setdefault(
                (minute, queue, job),
                {
                    "minute": minute.isoformat(),
                    "queue": queue,
                    "job": job,
                    "succeeded": 0,
                    "failed": 0,
                    "retried": 0,
                },
            )
            row[column] += n
        self._counts.clear()
        self._last_flush = time.monotonic()
        return list(rows.values())
