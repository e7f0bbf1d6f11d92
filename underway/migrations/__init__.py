"""Schema migrations: numbered SQL files applied in order, each recorded in
``underway.migration``, all under one advisory lock so concurrent runs are safe.

Run them from code with :func:`underway.run_migrations`, or from a shell::

    python -m underway.migrations --dsn postgresql://app@db/app
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..db import connect, resolve_dsn

# pg_advisory_lock key shared by every process migrating an underway schema.
MIGRATION_LOCK_KEY = 0x756E64657277  # "underw" in ASCII

BOOTSTRAP_SQL = """
CREATE SCHEMA IF NOT EXISTS underway;
CREATE TABLE IF NOT EXISTS underway.migration (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""

_FILE_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file of this package."""

    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with this version, oldest first."""
    found = []
    for path in sorted(Path(__file__).parent.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    return found


def run_migrations(dsn: str | None = None) -> list[int]:
    """Bring the database's ``underway`` schema up to date; returns the versions applied.

    Idempotent, and safe when several processes run it at once: they queue on an advisory
    lock, and each migration commits in one transaction with its record.
    """
    conn = connect(resolve_dsn(dsn), application_name="underway migrations")
    applied: list[int] = []
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
            try:
                cur.execute(BOOTSTRAP_SQL)
                cur.execute("SELECT version FROM underway.migration")
                done = {row[0] for row in cur.fetchall()}
                for migration in migrations():
                    if migration.version in done:
                        continue
                    cur.execute("BEGIN")
                    try:
                        cur.execute(migration.sql)
                        cur.execute(
                            "INSERT INTO underway.migration (version, name) VALUES (%s, %s)",
                            (migration.version, migration.name),
                        )
                        cur.execute("COMMIT")
                    except BaseException:
                        cur.execute("ROLLBACK")
                        raise
                    applied.append(migration.version)
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    finally:
        conn.close()
    return applied


def main(argv: list[str] | None = None) -> int:
    """``python -m underway.migrations``: apply pending migrations and say which."""
    parser = argparse.ArgumentParser(
        prog="python -m underway.migrations", description=run_migrations.__doc__
    )
    parser.add_argument("--dsn", help="database to migrate (default: $DATABASE_URL)")
    args = parser.parse_args(argv)
    try:
        applied = run_migrations(args.dsn)
    except Exception as exc:
        print(f"underway: migration failed: {exc}".strip(), file=sys.stderr)
        return 1
    if applied:
        print(f"underway: applied migrations {', '.join(map(str, applied))}")
    else:
        print("underway: schema is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
