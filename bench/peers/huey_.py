"""huey's adapter: its PostgreSQL storage (``huey.contrib.sql_huey.SqlHuey`` on peewee's
``PostgresqlDatabase``), one consumer with N worker processes (``-k process -w N``), at the
consumer's default polling (0.1 s, backing off to 10 s while idle)."""

from __future__ import annotations

import importlib.metadata
import signal
from dataclasses import dataclass
from typing import Any

from ..harness import Enqueuer, Peer, python
from .common import count, module_missing


@dataclass
class HueyPeer(Peer):
    """huey on PostgreSQL; its consumer has no burst mode, so the harness stops it."""

    def __post_init__(self) -> None:
        self.key, self.label = "huey", "huey (SqlHuey, process workers)"
        self.bursts = False
        self.stop_signal = signal.SIGTERM

    def missing(self) -> str | None:
        return module_missing("huey", "peewee")

    def versions(self) -> dict[str, str]:
        return {m: importlib.metadata.version(m) for m in ("huey", "peewee")}

    def settings(self, workers: int) -> dict[str, Any]:
        return {
            "consumer": f"huey_consumer bench.tasks.huey_app.huey -k process -w {workers}",
            "storage": "huey.contrib.sql_huey.SqlHuey, peewee PostgresqlDatabase (psycopg2)",
            "polling": "consumer defaults: delay 0.1 s, backoff 1.15, max 10 s",
            "batch_enqueue": "none in huey",
        }

    def prepare(self, dsn: str) -> None:
        _huey(dsn)  # creates the tables

    def prefill(self, dsn: str, indices: list[int]) -> None:
        huey, task = _huey(dsn)
        with huey.storage.database.atomic():  # one transaction: this is not timed
            for i in indices:
                task(i)
        huey.storage.close()

    def worker_commands(self, dsn: str, workers: int, burst: bool) -> list[list[str]]:
        return [
            python(
                "-m",
                "huey.bin.huey_consumer",
                "bench.tasks.huey_app.huey",
                "-k",
                "process",
                "-w",
                str(workers),
                "-q",
            )
        ]

    def remaining(self, dsn: str) -> int:
        return count(dsn, "SELECT count(*) FROM task WHERE queue = 'bench'")

    def enqueuer(self, dsn: str) -> Enqueuer:
        return HueyEnqueuer(dsn)


def _huey(dsn: str) -> tuple[Any, Any]:
    from ..tasks.huey_app import make_huey

    return make_huey(dsn)


class HueyEnqueuer(Enqueuer):
    """Calling the task, ``task(i)``, enqueues it (one INSERT, autocommit)."""

    batched = False

    def __init__(self, dsn: str) -> None:
        self.huey, self.task = _huey(dsn)

    def one(self, i: int) -> None:
        self.task(i)

    def close(self) -> None:
        self.huey.storage.close()
