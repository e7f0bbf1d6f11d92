"""procrastinate's no-op task, and its worker: ``python -m bench.tasks.procrastinate_app``.

The task is ``async`` (procrastinate runs sync tasks in threads; async is its cheapest path).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from procrastinate import App, PsycopgConnector

from bench.probe import mark


async def noop(i: int) -> None:
    """The no-op task: only the probe's mark."""
    mark(i)


def make_app(dsn: str) -> App:
    """A procrastinate app on ``dsn`` (psycopg 3 connector, default pool) with the task."""
    app = App(connector=PsycopgConnector(conninfo=dsn))
    app.task(name="noop")(noop)
    return app


async def work(concurrency: int, burst: bool) -> None:
    """Run one worker on ``$BENCH_DSN``; with ``burst`` it stops once no job is left."""
    app = make_app(os.environ["BENCH_DSN"])
    async with app.open_async():
        await app.run_worker_async(concurrency=concurrency, wait=not burst)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--burst", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(work(args.concurrency, args.burst))
