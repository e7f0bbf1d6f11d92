"""underway's adapter: the default mode, the async-commit mode, the two-step job, and a
table holding many finished tasks; plus the count of round trips per no-op task."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions

from .. import probe as bench_probe
from ..harness import Enqueuer, Peer, Probe, Server, python
from .common import count

FILL_FINISHED = """
INSERT INTO underway.task (job, input, state, attempts, run_at, created_at, started_at,
                           finished_at)
SELECT 'bench-noop', to_jsonb(g), 'succeeded', 1, now(), now(), now(), now()
FROM generate_series(1, %(rows)s) AS g;
INSERT INTO underway.attempt (task_id, step, attempt, outcome, started_at)
SELECT id, 0, 1, 'succeeded', started_at FROM underway.task;
"""


def _jobs() -> Any:
    """The bench's job module (imported on first use: it defines jobs in this process)."""
    from ..tasks import underway_jobs

    return underway_jobs


@dataclass
class UnderwayPeer(Peer):
    """underway, run by ``python -m underway.supervisor`` with ``--workers N``."""

    async_commit: bool = False
    two_step: bool = False
    #: Finished (succeeded) tasks, with their attempts, written before the measured ones.
    finished_rows: int = 0
    is_underway: bool = True

    def __post_init__(self) -> None:
        self.key, self.label = "underway", "underway"
        if self.async_commit:
            self.key, self.label = "underway_async", "underway --async-commit"
        elif self.two_step:
            self.key, self.label, self.steps = "underway_twostep", "underway two-step job", 2
        elif self.finished_rows:
            self.key = "underway_finished"
            self.label = f"underway, {self.finished_rows:,} finished rows"
        default = not (self.async_commit or self.two_step or self.finished_rows)
        self.measures = frozenset({"drain", "latency", "enqueue", "rss"} if default else {"drain"})

    def missing(self) -> str | None:
        return None

    def versions(self) -> dict[str, str]:
        import underway

        return {"underway": underway.__version__, "psycopg2": psycopg2.__version__.split()[0]}

    def settings(self, workers: int) -> dict[str, Any]:
        return {
            "processes": workers,
            "connections": workers + 1,
            "command": "python -m underway.supervisor bench.tasks.underway_jobs "
            f"--workers {workers} --burst --no-scheduler --log-level WARNING"
            + (" --async-commit" if self.async_commit else ""),
            "job": "two steps (To.next, then done)" if self.two_step else "one no-op step",
            "finished_rows_before": self.finished_rows,
        }

    def prepare(self, dsn: str) -> None:
        import underway

        underway.run_migrations(dsn)
        if self.finished_rows:
            conn = psycopg2.connect(dsn)
            try:
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(FILL_FINISHED, {"rows": self.finished_rows})
                    # As autovacuum would have, long before a million rows piled up.
                    cur.execute("VACUUM ANALYZE underway.task")
                    cur.execute("VACUUM ANALYZE underway.attempt")
            finally:
                conn.close()

    def prefill(self, dsn: str, indices: list[int]) -> None:
        job = _jobs().two_step if self.two_step else _jobs().noop
        conn = psycopg2.connect(dsn)
        try:
            for k in range(0, len(indices), 5000):
                job.enqueue_many(indices[k : k + 5000], conn=conn)
                conn.commit()
        finally:
            conn.close()

    def worker_commands(self, dsn: str, workers: int, burst: bool) -> list[list[str]]:
        command = python(
            "-m",
            "underway.supervisor",
            "bench.tasks.underway_jobs",
            "--workers",
            str(workers),
            "--no-scheduler",
            "--log-level",
            "WARNING",
            "--dsn",
            dsn,
        )
        if burst:
            command.append("--burst")
        if self.async_commit:
            command.append("--async-commit")
        return [command]

    def remaining(self, dsn: str) -> int:
        return count(
            dsn, "SELECT count(*) FROM underway.task WHERE state IN ('pending', 'running')"
        )

    def ready(self, dsn: str, workers: int) -> bool:
        idle = count(
            dsn,
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name LIKE 'underway worker %' AND state = 'idle'",
        )
        return idle >= workers

    def enqueuer(self, dsn: str) -> Enqueuer:
        return UnderwayEnqueuer(dsn)


class UnderwayEnqueuer(Enqueuer):
    """``job.enqueue(i)`` (commits at once on the process connection) and
    ``job.enqueue_many(batch)``, as an application calls them."""

    def __init__(self, dsn: str) -> None:
        import underway

        underway.configure(dsn=dsn)
        self.job = _jobs().noop

    def one(self, i: int) -> None:
        self.job.enqueue(i)

    def many(self, indices: list[int]) -> None:
        self.job.enqueue_many(indices)

    def close(self) -> None:
        import underway

        underway.configure(dsn=None)


def count_round_trips(server: Server, small: int = 50, large: int = 150) -> dict[str, Any]:
    """Statements (each one round trip: the worker's connection is in autocommit mode and
    sends one query string per ``execute``) that an underway worker sends per no-op task.

    A :class:`underway.worker.Worker` runs in this process in burst mode, over ``small`` and
    then ``large`` tasks, with a cursor that counts ``execute`` calls; the difference divided
    by ``large - small`` leaves out connecting and the final empty claim.
    """
    from underway import service
    from underway.store import QUERIES, prepared_forms
    from underway.worker import Worker

    names = {text: name for name, text in QUERIES.items()}
    names.update({prepared_forms(name)[1]: name for name in QUERIES})  # the worker's EXECUTEs
    sent: list[str] = []

    class CountingCursor(psycopg2.extensions.cursor):
        def execute(self, query: Any, vars: Any = None) -> Any:
            sent.append(names.get(query, str(query).split()[0]))
            return super().execute(query, vars)

    original = service.connect

    def counting_connect(*args: Any, **kwargs: Any) -> Any:
        conn = original(*args, **kwargs)
        conn.cursor_factory = CountingCursor
        return conn

    totals = {}
    per_run: dict[int, list[str]] = {}
    probe = Probe(large)
    os.environ.update(probe.env)
    service.connect = counting_connect
    try:
        for n in (small, large):
            with server.database("underway_rt") as dsn:
                peer = UnderwayPeer()
                peer.prepare(dsn)
                peer.prefill(dsn, list(range(n)))
                sent.clear()
                Worker(dsn, {"bench-noop": _jobs().noop}, burst=True).run()
                totals[n] = len(sent)
                per_run[n] = list(sent)
    finally:
        service.connect = original
        os.environ.pop("BENCH_PROBE", None)
        probe.close()
        bench_probe._view = None  # the mapping of the file just removed
    per_task = (totals[large] - totals[small]) / (large - small)
    per_task_queries = ("claim_task", "complete_task", "advance_task")
    per_task_names = sorted({s for s in per_run[small] if s in per_task_queries})
    return {
        "per_task": per_task,
        "statements_per_task": per_task_names,
        "fixed_per_worker_run": totals[small] - per_task * small,
        "how": "psycopg2 execute() calls on the worker's autocommit connection, counted in "
        f"an in-process burst Worker over {small} and {large} tasks (difference / {large - small})",
    }
