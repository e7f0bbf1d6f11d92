"""The enqueue reference: a bare psycopg2 loop inserting into a table equivalent to
``underway.task`` (``LIKE underway.task INCLUDING ALL``: same columns, defaults, identity,
checks and indexes, but no NOTIFY trigger): the plain INSERT of a job name and a JSON input
that an application would write by hand."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg2

from ..harness import Enqueuer, Peer
from .common import count

INSERT = """
INSERT INTO bench_ref.task (job, input) VALUES (%s, %s::jsonb) RETURNING id
"""

EQUIVALENT_TABLE = """
CREATE SCHEMA bench_ref;
CREATE TABLE bench_ref.task (LIKE underway.task INCLUDING ALL);
"""


@dataclass
class BarePsycopg2(Peer):
    """``cur.execute(INSERT ...)`` then ``conn.commit()`` (psycopg2's default transaction
    mode: BEGIN, INSERT, COMMIT, three round trips), or with ``autocommit`` the INSERT alone
    (one round trip, one commit)."""

    autocommit: bool = False

    def __post_init__(self) -> None:
        self.measures = frozenset({"enqueue"})
        if self.autocommit:
            self.key, self.label = "psycopg2_autocommit", "bare psycopg2 autocommit INSERT"
        else:
            self.key, self.label = "psycopg2_commit", "bare psycopg2 INSERT + commit()"

    def missing(self) -> str | None:
        return None

    def versions(self) -> dict[str, str]:
        return {"psycopg2": psycopg2.__version__.split()[0]}

    def settings(self, workers: int) -> dict[str, Any]:
        return {
            "table": "LIKE underway.task INCLUDING ALL (no trigger)",
            "autocommit": self.autocommit,
            "round_trips_per_enqueue": 1 if self.autocommit else 3,
        }

    def prepare(self, dsn: str) -> None:
        import underway

        underway.run_migrations(dsn)  # for the task_state type the table's columns use
        conn = psycopg2.connect(dsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(EQUIVALENT_TABLE)
        finally:
            conn.close()

    def prefill(self, dsn: str, indices: list[int]) -> None:
        raise NotImplementedError("the reference only enqueues")

    def worker_commands(self, dsn: str, workers: int, burst: bool) -> list[list[str]]:
        raise NotImplementedError("the reference has no workers")

    def remaining(self, dsn: str) -> int:
        return count(dsn, "SELECT count(*) FROM bench_ref.task WHERE state = 'pending'")

    def enqueuer(self, dsn: str) -> Enqueuer:
        return BareEnqueuer(dsn, self.autocommit)


class BareEnqueuer(Enqueuer):
    """The loop an application would write by hand."""

    batched = False

    def __init__(self, dsn: str, autocommit: bool) -> None:
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = autocommit
        self.cur = self.conn.cursor()

    def one(self, i: int) -> None:
        self.cur.execute(INSERT, ("bench-noop", json.dumps(i)))
        self.cur.fetchone()
        if not self.conn.autocommit:
            self.conn.commit()

    def close(self) -> None:
        self.conn.close()
