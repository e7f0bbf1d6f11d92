"""pgqueuer's no-op entrypoint, and its worker: ``python -m bench.tasks.pgqueuer_app``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from pgqueuer import AsyncpgDriver, PsycopgDriver, Queries, QueueManager
from pgqueuer.models import Job
from pgqueuer.types import QueueExecutionMode
from psycopg2.extensions import parse_dsn

from bench.probe import mark


async def connect(driver: str, dsn: str) -> Any:
    """A pgqueuer driver on ``dsn``: ``psycopg`` (async, autocommit) or ``asyncpg``."""
    if driver == "psycopg":
        import psycopg

        return PsycopgDriver(await psycopg.AsyncConnection.connect(dsn, autocommit=True))
    import asyncpg

    params = parse_dsn(dsn)
    params["database"] = params.pop("dbname")
    return AsyncpgDriver(await asyncpg.connect(**params))


async def work(driver: str, batch_size: int | None, burst: bool) -> None:
    """Run one queue manager (pgqueuer's worker loop, without its cron scheduler) on
    ``$BENCH_DSN``; with ``burst`` it drains and stops."""
    qm = QueueManager(Queries(await connect(driver, os.environ["BENCH_DSN"])))

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        mark(int(job.payload or b"0"))

    options: dict[str, Any] = {}
    if batch_size:
        options["batch_size"] = batch_size
    mode = QueueExecutionMode.drain if burst else QueueExecutionMode.continuous
    await qm.run(mode=mode, **options)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--driver", choices=["psycopg", "asyncpg"], default="psycopg")
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--burst", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(work(args.driver, args.batch_size or None, args.burst))
