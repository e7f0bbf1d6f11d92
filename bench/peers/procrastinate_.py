"""procrastinate's adapter: N worker processes, each ``concurrency=2`` with the psycopg 3
connector (its documented setup for async tasks; the no-op task is async)."""

from __future__ import annotations

import asyncio
import importlib.metadata
from dataclasses import dataclass
from typing import Any

from ..harness import Enqueuer, Peer, python
from .common import count, module_missing

CONCURRENCY = 2


@dataclass
class ProcrastinatePeer(Peer):
    """procrastinate, one ``App.run_worker_async`` per process."""

    def __post_init__(self) -> None:
        self.key, self.label = "procrastinate", f"procrastinate (concurrency {CONCURRENCY})"

    def missing(self) -> str | None:
        return module_missing("procrastinate", "psycopg", "psycopg_pool")

    def versions(self) -> dict[str, str]:
        return {m: importlib.metadata.version(m) for m in ("procrastinate", "psycopg")}

    def settings(self, workers: int) -> dict[str, Any]:
        return {
            "processes": workers,
            "concurrency_per_process": CONCURRENCY,
            "connector": "PsycopgConnector (psycopg 3, default AsyncConnectionPool)",
            "task": "async def",
            "listen_notify": True,
        }

    def prepare(self, dsn: str) -> None:
        app = _app(dsn)

        async def apply() -> None:
            async with app.open_async():
                await app.schema_manager.apply_schema_async()

        asyncio.run(apply())

    def prefill(self, dsn: str, indices: list[int]) -> None:
        app = _app(dsn)
        task = app.tasks["noop"]

        async def defer() -> None:
            async with app.open_async():
                for k in range(0, len(indices), 1000):
                    await task.batch_defer_async(*({"i": i} for i in indices[k : k + 1000]))

        asyncio.run(defer())

    def worker_commands(self, dsn: str, workers: int, burst: bool) -> list[list[str]]:
        command = python("-m", "bench.tasks.procrastinate_app", "--concurrency", str(CONCURRENCY))
        return [command + (["--burst"] if burst else []) for _ in range(workers)]

    def remaining(self, dsn: str) -> int:
        return count(dsn, "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'")

    def enqueuer(self, dsn: str) -> Enqueuer:
        return ProcrastinateEnqueuer(dsn)


def _app(dsn: str) -> Any:
    from ..tasks.procrastinate_app import make_app

    return make_app(dsn)


class ProcrastinateEnqueuer(Enqueuer):
    """``await task.defer_async(i=...)`` and ``await task.batch_defer_async(...)``."""

    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.app = _app(dsn)
        self.task = self.app.tasks["noop"]
        self.loop.run_until_complete(self.app.open_async())

    async def one(self, i: int) -> None:
        await self.task.defer_async(i=i)

    async def many(self, indices: list[int]) -> None:
        await self.task.batch_defer_async(*({"i": i} for i in indices))

    def close(self) -> None:
        assert self.loop is not None
        self.loop.run_until_complete(self.app.close_async())
        super().close()
