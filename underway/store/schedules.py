"""The store's queries for cron schedules: storing them, and firing each tick exactly
once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ..records import (
    StoredSchedule,
)
from .base import (
    Cursor,
    _all,
    _run,
    _scalar,
    _shown,
)


def store_schedule(cur: Cursor, params: Mapping[str, Any]) -> None:
    """Store a job's schedule, or replace the one of the same name."""
    _run(cur, "store_schedule", params)


def remove_schedule(cur: Cursor, job: str, name: str) -> bool:
    """Remove a job's schedule; returns whether there was one."""
    _run(cur, "remove_schedule", {"job": job, "name": name})
    return bool(cur.rowcount)


def load_schedules(cur: Cursor, jobs: Sequence[str]) -> list[StoredSchedule]:
    """The schedules of ``jobs``, ordered by job and name."""
    _run(cur, "load_schedules", {"jobs": sorted(jobs)})
    return _all(StoredSchedule, cur)


def fire_tick(
    cur: Cursor, job: str, name: str, fire_at: datetime, priority: int, max_attempts: int
) -> int | None:
    """Enqueue one tick of a schedule, exactly once; returns the task's id, or ``None`` when
    the tick was fired before (by anyone) or the schedule changed meanwhile."""
    _run(
        cur,
        "fire_tick",
        {
            "job": job,
            "name": name,
            "fire_at": fire_at,
            "priority": priority,
            "max_attempts": max_attempts,
        },
    )
    return _scalar(cur)


def skip_tick(cur: Cursor, job: str, name: str, fire_at: datetime) -> None:
    """Record a missed tick as passed over, so it is neither fired nor reported again."""
    _run(cur, "skip_tick", {"job": job, "name": name, "fire_at": fire_at})


def schedules(cur: Cursor) -> list[dict[str, Any]]:
    """Every stored schedule as a row: job, name, expression, input, catch_up,
    updated_at, last_fire."""
    _run(cur, "schedules")
    names = [column.name for column in cur.description]
    rows = [dict(zip(names, row)) for row in cur.fetchall()]
    for row in rows:
        row["input"] = _shown(row["input"])
    return rows
