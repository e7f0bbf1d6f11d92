"""pgqueuer's adapter: N worker processes, each one ``QueueManager`` with an async no-op
entrypoint; the psycopg 3 driver at the default batch size, or asyncpg with batches of 50."""

from __future__ import annotations

import asyncio
import importlib.metadata
from dataclasses import dataclass
from typing import Any

from ..harness import Enqueuer, Peer, python
from .common import count, module_missing


@dataclass
class PgQueuerPeer(Peer):
    """pgqueuer with one driver and batch size."""

    driver: str = "psycopg"
    #: Jobs dequeued per query; None keeps pgqueuer's default.
    batch_size: int | None = None

    def __post_init__(self) -> None:
        batch = f"batch {self.batch_size}" if self.batch_size else "default batch"
        self.key = f"pgqueuer_{self.driver}"
        self.label = f"pgqueuer ({self.driver}, {batch})"

    def missing(self) -> str | None:
        return module_missing("pgqueuer", "psycopg" if self.driver == "psycopg" else "asyncpg")

    def versions(self) -> dict[str, str]:
        return {m: importlib.metadata.version(m) for m in ("pgqueuer", self.driver)}

    def settings(self, workers: int) -> dict[str, Any]:
        return {
            "processes": workers,
            "driver": self.driver,
            "batch_size": self.batch_size or f"default ({_default_batch_size()})",
            "entrypoint": "async def, default concurrency",
        }

    def prepare(self, dsn: str) -> None:
        asyncio.run(self._with_queries(dsn, lambda q: q.install()))

    def prefill(self, dsn: str, indices: list[int]) -> None:
        async def enqueue(queries: Any) -> None:
            for k in range(0, len(indices), 1000):
                await _enqueue_many(queries, indices[k : k + 1000])

        asyncio.run(self._with_queries(dsn, enqueue))

    async def _with_queries(self, dsn: str, use: Any) -> None:
        from pgqueuer import Queries

        from ..tasks.pgqueuer_app import connect

        driver = await connect(self.driver, dsn)
        try:
            await use(Queries(driver))
        finally:
            await _close(driver)

    def worker_commands(self, dsn: str, workers: int, burst: bool) -> list[list[str]]:
        command = python("-m", "bench.tasks.pgqueuer_app", "--driver", self.driver)
        if self.batch_size:
            command += ["--batch-size", str(self.batch_size)]
        return [command + (["--burst"] if burst else []) for _ in range(workers)]

    def remaining(self, dsn: str) -> int:
        return count(dsn, "SELECT count(*) FROM pgqueuer")

    def enqueuer(self, dsn: str) -> Enqueuer:
        return PgQueuerEnqueuer(self.driver, dsn)


def _default_batch_size() -> Any:
    import inspect

    from pgqueuer import QueueManager

    return inspect.signature(QueueManager.run).parameters["batch_size"].default


async def _enqueue_many(queries: Any, indices: list[int]) -> None:
    payloads = [str(i).encode() for i in indices]
    await queries.enqueue(["noop"] * len(indices), payloads, [0] * len(indices))


async def _close(driver: Any) -> None:
    connection = getattr(driver, "_connection", None) or getattr(driver, "connection", None)
    if connection is not None:
        await connection.close()


class PgQueuerEnqueuer(Enqueuer):
    """``await queries.enqueue("noop", payload)``, and the list form for batches."""

    def __init__(self, driver: str, dsn: str) -> None:
        from pgqueuer import Queries

        from ..tasks.pgqueuer_app import connect

        self.loop = asyncio.new_event_loop()
        self.driver = self.loop.run_until_complete(connect(driver, dsn))
        self.queries = Queries(self.driver)

    async def one(self, i: int) -> None:
        await self.queries.enqueue("noop", str(i).encode())

    async def many(self, indices: list[int]) -> None:
        await _enqueue_many(self.queries, indices)

    def close(self) -> None:
        assert self.loop is not None
        self.loop.run_until_complete(_close(self.driver))
        super().close()
