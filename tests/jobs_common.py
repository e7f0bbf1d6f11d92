"""What the test job modules share. Worker subprocesses import those modules, so this one
loads nothing beyond psycopg2: no pytest, no psutil."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg2


def sql(
    dsn: str, statement: str, params: Sequence[Any] | Mapping[str, Any] | None = None
) -> list[tuple[Any, ...]]:
    """Run one statement on its own short autocommit connection; return its rows as tuples."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return list(cur.fetchall()) if cur.description is not None else []
    finally:
        conn.close()
