"""huey's no-op task on its PostgreSQL storage (``huey.contrib.sql_huey``, peewee).

The consumer loads ``bench.tasks.huey_app.huey``, which is built from ``$BENCH_DSN``.
"""

from __future__ import annotations

import os
from typing import Any

from huey.contrib.sql_huey import SqlHuey
from peewee import PostgresqlDatabase
from psycopg2.extensions import parse_dsn

from bench.probe import mark


def noop(i: int) -> None:
    """The no-op task: only the probe's mark."""
    mark(i)


def make_huey(dsn: str) -> tuple[SqlHuey, Any]:
    """A huey on ``dsn`` (tables created if missing) and its no-op task."""
    params = parse_dsn(dsn)
    database = PostgresqlDatabase(params.pop("dbname"), **params)
    instance = SqlHuey("bench", database=database)
    return instance, instance.task()(noop)


huey: SqlHuey | None = None
if os.environ.get("BENCH_DSN"):
    huey, _task = make_huey(os.environ["BENCH_DSN"])
