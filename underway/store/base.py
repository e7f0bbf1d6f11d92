"""The store: the one module that speaks SQL to underway's schema.

Every query lives in ``queries.sql``, named and described; this module loads them and
gives each a typed function, so the rest of the package calls ``store.claim_task(cur,
...)`` and gets a :class:`~underway.records.Claim` back, never a tuple to unpack by
position. Rows are mapped into records by column name: a query whose columns drift from
its record fails loudly at the first call. The transaction verbs (begin with a deadline,
commit, rollback, listen, notify) live here too.

Functions take a cursor, so that they run in whatever transaction the caller is in: the
worker's step, an application's own (``conn=``), or an autocommit connection.

This module holds what every part of the store shares: the query loader, the channels,
running a named query, mapping rows into records, decoding stored JSON, and the
transaction verbs.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg2.errors
from psycopg2.extensions import TRANSACTION_STATUS_IDLE

from ..errors import SchemaMissing, UndecodableInput
from ..records import (
    Undecodable,
)

Cursor = Any
"""A psycopg2 cursor (``psycopg2.extensions.cursor``)."""

R = TypeVar("R")

TASK_CHANNEL = "underway"
"""The channel that wakes idle workers: a task was enqueued, became due or was released,
or a queue was resumed. The schema's triggers and ``underway.enqueue`` notify it too."""

SCHEDULE_CHANNEL = "underway_schedule"
"""The channel that tells schedulers a schedule was stored, changed or removed."""

ABORT_CHANNEL = "underway_abort"
"""The channel that tells supervisors to end a running step now (payload: the task id)."""

RESULT_CHANNEL = "underway_result"
"""The channel on which an awaited task announces its end (payload: the task id); the
schema's state trigger notifies it."""

CHANNELS = (TASK_CHANNEL, SCHEDULE_CHANNEL, ABORT_CHANNEL, RESULT_CHANNEL)

_HEADER = re.compile(r"^-- name: (\S+)\n", re.MULTILINE)


def load_queries(text: str) -> dict[str, str]:
    """Split a queries file into ``{name: sql}``; comment lines are left out of the SQL."""
    parts = _HEADER.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        lines = [line for line in body.splitlines() if not line.startswith("--")]
        queries[name] = "\n".join(lines).strip()
    return queries


_QUERIES_FILE = Path(__file__).parent.parent / "queries.sql"
QUERIES = load_queries(_QUERIES_FILE.read_text(encoding="utf-8"))
"""Every query by name, as ``queries.sql`` holds them."""


PREPARED = frozenset(
    {"claim_task", "complete_task", "advance_task", "fail_task", "seconds_until_due"}
)
"""The worker's per-task queries. On a connection that keeps a ``prepared`` set (the
worker's, :class:`underway.db.PreparingConnection`) each is parsed and planned once per
session, with PREPARE, and then sent as EXECUTE with its values: planning the same
statement again for every task cost a third of the server's time per task."""

_PARAMETER = re.compile(r"%\((\w+)\)s")


@functools.cache
def prepared_forms(name: str) -> tuple[str, str]:
    """The PREPARE statement of query ``name`` and the EXECUTE that runs it, whose
    ``%(name)s`` placeholders psycopg2 fills in order."""
    sql = QUERIES[name]
    names = list(dict.fromkeys(_PARAMETER.findall(sql)))
    body = _PARAMETER.sub(lambda m: f"${names.index(m.group(1)) + 1}", sql).replace("%%", "%")
    values = ", ".join(f"%({n})s" for n in names)
    return (
        f"PREPARE underway_{name} AS {body}",
        f"EXECUTE underway_{name}" + (f" ({values})" if names else ""),
    )


def prepare_all(cur: Cursor) -> None:
    """Prepare every per-task query on this session, outside any transaction; a statement
    of the same name the session already holds (a pooler in session mode may hand over a
    session it did not reset) is replaced."""
    for name in sorted(PREPARED):
        _prepare(cur, name)


def _prepare(cur: Cursor, name: str) -> None:
    statement = f"underway_{name}"
    cur.execute("SELECT 1 FROM pg_prepared_statements WHERE name = %s", (statement,))
    if cur.fetchone():
        cur.execute(f"DEALLOCATE {statement}")
    cur.execute(prepared_forms(name)[0])
    cur.connection.prepared.add(name)


def _execute(cur: Cursor, name: str, params: Mapping[str, Any] | None) -> None:
    """Send query ``name``: as EXECUTE of a statement prepared on this session when the
    connection keeps prepared statements, else as text. Statements are prepared outside
    transactions only, so that preparing can never cost a step its transaction."""
    prepared = getattr(cur.connection, "prepared", None)
    idle = cur.connection.info.transaction_status == TRANSACTION_STATUS_IDLE
    if prepared is None or name not in PREPARED or (name not in prepared and not idle):
        cur.execute(QUERIES[name], params)
        return
    if name not in prepared:
        _prepare(cur, name)
    try:
        cur.execute(prepared_forms(name)[1], params)
    except psycopg2.errors.InvalidSqlStatementName:
        # A step deallocated it. Outside a transaction, prepare it again and go on; inside,
        # the step's transaction is lost with the statement: the worker fails the try.
        prepared.discard(name)
        if not idle:
            raise
        _prepare(cur, name)
        cur.execute(prepared_forms(name)[1], params)


def _run(cur: Cursor, name: str, params: Mapping[str, Any] | None = None) -> None:
    """Run the named query; a missing schema becomes :class:`SchemaMissing`, which says
    what to do. On a connection with a deadline (:class:`underway.db.BoundedConnection`),
    wait for the result no longer than it allows."""
    try:
        _execute(cur, name, params)
        settle = getattr(cur.connection, "settle", None)
        if settle is not None:
            settle()
    except (psycopg2.errors.UndefinedTable, psycopg2.errors.InvalidSchemaName) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise SchemaMissing(
            f"the database has no underway schema ({first_line}): "
            "run underway.run_migrations(dsn) first"
        ) from exc


@functools.cache
def _field_names(record: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(record))


def _as(record: type[R], cur: Cursor, row: Sequence[Any], **extra: Any) -> R:
    """A record from a row, by column name; ``extra`` supplies fields the row lacks."""
    values = dict(zip([column.name for column in cur.description], row), **extra)
    wanted = _field_names(record)
    if not wanted <= values.keys():
        raise RuntimeError(
            f"query result lacks {sorted(wanted - values.keys())} for {record.__name__}: "
            "queries.sql and records.py disagree"
        )
    return record(**{name: values[name] for name in wanted})


def _one(record: type[R], cur: Cursor, **extra: Any) -> R | None:
    row = cur.fetchone()
    return None if row is None else _as(record, cur, row, **extra)


def _all(record: type[R], cur: Cursor) -> list[R]:
    return [_as(record, cur, row) for row in cur.fetchall()]


def _scalar(cur: Cursor) -> Any:
    row = cur.fetchone()
    return None if row is None else row[0]


def decode(text: str | None, what: str) -> Any:
    """A stored JSON value from its text; :class:`UndecodableInput` (naming ``what``) for
    JSON that PostgreSQL took but Python cannot hold: a number of thousands of digits, or
    nesting thousands deep."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UndecodableInput(f"{what} cannot be decoded: {type(exc).__name__}: {exc}") from None


def _shown(text: str | None) -> Any:
    """A stored JSON value for operators' eyes: decoded, or its start when undecodable."""
    try:
        return decode(text, "value")
    except UndecodableInput:
        assert text is not None
        return Undecodable(text[:200])


def begin(cur: Cursor, statement_timeout_ms: int | None = None) -> None:
    """Begin a transaction; with a timeout, none of its statements may run longer."""
    if statement_timeout_ms is None:
        cur.execute("BEGIN")
    else:
        cur.execute(f"BEGIN; SET LOCAL statement_timeout = {int(statement_timeout_ms)}")


def begin_step(cur: Cursor, statement_timeout_ms: int | None) -> None:
    """Begin a step's transaction, marked so that :func:`in_step_transaction` can tell it
    from one the step began itself after ending ours."""
    timeout = (
        ""
        if statement_timeout_ms is None
        else f"; SET LOCAL statement_timeout = {int(statement_timeout_ms)}"
    )
    cur.execute(f"BEGIN; SET LOCAL underway.step_transaction = 'on'{timeout}")


def in_step_transaction(cur: Cursor) -> bool:
    """Whether the open transaction is still the one :func:`begin_step` began."""
    cur.execute("SELECT current_setting('underway.step_transaction', true) = 'on'")
    return bool(cur.fetchone()[0])


def commit(cur: Cursor) -> None:
    """Commit the transaction :func:`begin` opened."""
    cur.execute("COMMIT")


def rollback(cur: Cursor) -> None:
    """Roll back the transaction :func:`begin` opened."""
    cur.execute("ROLLBACK")


def listen(cur: Cursor, channel: str) -> None:
    """Subscribe the session to ``channel`` (one of :data:`CHANNELS`)."""
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}")
    cur.execute(f"LISTEN {channel}")
    settle = getattr(cur.connection, "settle", None)
    if settle is not None:
        settle()


def notify(cur: Cursor, channel: str = TASK_CHANNEL) -> None:
    """Wake the sessions listening on ``channel``, when the transaction commits."""
    _run(cur, "notify", {"channel": channel})


def set_async_commit(cur: Cursor) -> None:
    """Make the session's commits return before they reach the disk."""
    cur.execute("SET synchronous_commit = off")


def schema_version(cur: Cursor) -> int | None:
    """The newest migration applied; raises ``UndefinedTable`` without a schema."""
    cur.execute(QUERIES["schema_version"])
    settle = getattr(cur.connection, "settle", None)
    if settle is not None:
        settle()
    return _scalar(cur)


def session(cur: Cursor) -> tuple[int, float]:
    """This session's backend pid and start time (seconds since the epoch)."""
    _run(cur, "session")
    row = cur.fetchone()
    return row[0], row[1]


def clock(cur: Cursor) -> datetime:
    """The database's clock, which all hosts share."""
    _run(cur, "clock")
    return _scalar(cur)
