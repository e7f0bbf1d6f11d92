"""Small helpers the adapters share."""

from __future__ import annotations

import importlib.util

import psycopg2


def module_missing(*modules: str) -> str | None:
    """``"not installed: x, y"`` for the modules that cannot be imported, else None."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(absent)} (pip install -e '.[bench]')" if absent else None


def count(dsn: str, query: str) -> int:
    """The single integer ``query`` returns."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            row = cur.fetchone()
            return int(row[0]) if row else 0
    finally:
        conn.close()
