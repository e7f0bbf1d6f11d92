"""The store's queries for the supervisor's upkeep: leases, dead workers' sessions,
aborts, the supervisor registry, statistics and retention."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .base import (
    TASK_CHANNEL,
    Cursor,
    _run,
)


def renew_leases(cur: Cursor, tokens: Sequence[int], lease: float) -> None:
    """Extend the leases of the tasks claimed with ``tokens``."""
    if tokens:
        _run(cur, "renew_leases", {"tokens": list(tokens), "lease": lease})


def reclaim_expired(cur: Cursor) -> list[int]:
    """Release running tasks whose lease lapsed (a batch of them); returns their ids."""
    _run(cur, "reclaim_expired", {"channel": TASK_CHANNEL})
    return [row[0] for row in cur.fetchall()]


def abort_requested(cur: Cursor, tokens: Sequence[int]) -> list[int]:
    """Which tasks claimed with ``tokens`` an operator asked to abort."""
    if not tokens:
        return []
    _run(cur, "abort_requested", {"tokens": list(tokens)})
    return [row[0] for row in cur.fetchall()]


def end_session(cur: Cursor, pid: int, started: float) -> None:
    """End the server session with this backend pid and start time (a dead worker's)."""
    _run(cur, "end_session", {"pid": pid, "started": started})


def register_jobs(cur: Cursor, jobs: Iterable[Mapping[str, Any]]) -> None:
    """Store jobs' defaults in ``underway.job``, for enqueue from SQL and the scheduler."""
    _run(cur, "register_jobs", {"jobs": json.dumps(list(jobs))})


def set_concurrency_limits(cur: Cursor, limits: Mapping[str, int]) -> None:
    """Store the limits of concurrency groups, by name."""
    if limits:
        groups = [{"name": k, "max_concurrency": v} for k, v in limits.items()]
        _run(cur, "set_concurrency_limits", {"groups": json.dumps(groups)})


def heartbeat(
    cur: Cursor,
    supervisor_id: str,
    host: str,
    pid: int,
    jobs: Sequence[str],
    workers: list,
    alive_for: float,
) -> None:
    """Record that a supervisor is alive (for ``alive_for`` seconds unless it beats again),
    and what its workers run now."""
    _run(
        cur,
        "heartbeat",
        {
            "id": supervisor_id,
            "host": host,
            "pid": pid,
            "jobs": list(jobs),
            "workers": json.dumps(workers),
            "alive_for": alive_for,
        },
    )


def sign_off(cur: Cursor, supervisor_id: str) -> None:
    """Remove a stopping supervisor's row."""
    _run(cur, "sign_off", {"id": supervisor_id})


def prune_supervisors(cur: Cursor) -> None:
    """Forget supervisors silent for a day."""
    _run(cur, "prune_supervisors")


def count_finished(cur: Cursor, tally: Sequence[Mapping[str, Any]]) -> None:
    """Add finished tries to the per-minute statistics."""
    if tally:
        _run(cur, "count_finished", {"tally": json.dumps(list(tally), default=str)})


def purge_expired(cur: Cursor, batch: int) -> int:
    """Delete up to ``batch`` finished tasks past their retention; returns how many."""
    _run(cur, "purge_expired", {"batch": batch})
    return cur.rowcount


def prune_statistics(cur: Cursor) -> None:
    """Forget per-minute statistics older than a day."""
    _run(cur, "prune_statistics")


def prune_ticks(cur: Cursor, batch: int) -> int:
    """Forget up to ``batch`` fired ticks no scheduler needs; returns how many."""
    _run(cur, "prune_ticks", {"batch": batch})
    return cur.rowcount
