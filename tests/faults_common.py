"""Helpers shared by the supervisor and fault tests: supervisors for the fault jobs, and
waiting until workers are idle or blocked on a test-held lock."""

from __future__ import annotations

from jobs_faults import idle_listening_workers, lock_waiters

from .helpers import Supervisor, wait_until

MODULE = "jobs_faults"
IDLE = ["--poll-interval", "30"]


def supervisor(dsn: str, *args: str, workers: int = 2) -> Supervisor:
    """A supervisor for the fault jobs (not yet started)."""
    return Supervisor([MODULE], dsn, ["--workers", str(workers), *IDLE, *args])


def wait_idle(dsn: str, workers: int, timeout: float = 15.0) -> None:
    """Wait until ``workers`` workers are idle in their LISTEN wait."""
    wait_until(
        lambda: len(idle_listening_workers(dsn)) == workers,
        timeout=timeout,
        message=f"{workers} idle listening workers",
    )


def wait_blocked(dsn: str, key: int, count: int = 1, timeout: float = 10.0) -> list[int]:
    """Wait until ``count`` steps wait on lock ``key``; return their workers' pids."""
    return wait_until(
        lambda: (pids := lock_waiters(dsn, key)) and len(pids) == count and pids,
        timeout=timeout,
        message=f"{count} steps waiting on lock {key}",
    )
