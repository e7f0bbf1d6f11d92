"""The SQL underway sends, loaded by name from ``queries.sql``.

Keeping every query in one file lets a reader review the whole database contract at once;
Python code refers to a query by its name, e.g. ``QUERIES["claim_task"]``.
"""

from __future__ import annotations

import re
from pathlib import Path

_HEADER = re.compile(r"^-- name: (\S+)\n", re.MULTILINE)


def load_queries(text: str) -> dict[str, str]:
    """Split a queries file into ``{name: sql}``; comment lines are left out of the SQL."""
    parts = _HEADER.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        lines = [line for line in body.splitlines() if not line.startswith("--")]
        queries[name] = "\n".join(lines).strip()
    return queries


QUERIES = load_queries((Path(__file__).parent / "queries.sql").read_text(encoding="utf-8"))
