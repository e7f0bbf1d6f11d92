"""``conn=`` with SQLAlchemy: a Connection (in ``engine.begin()`` or commit-as-you-go), a
Session and a ``scoped_session`` all put the task in their current transaction, so it
commits with it and vanishes with its rollback; other drivers are refused with a TypeError.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from underway import Job, Task

from .helpers import query, scalar

pytest.importorskip("sqlalchemy")
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, scoped_session, sessionmaker

job = Job("sqlalchemy-conn")


@job.step
def only(cx: Any, inp: Any) -> None:
    """Never run: these tests only enqueue."""


@pytest.fixture
def engine(dsn: str) -> Iterator[Engine]:
    """A psycopg2 engine on the test database, with a ``note`` table to write beside tasks.

    Built with ``creator`` because the DSN may be a URI whose unix-socket host is a query
    parameter."""
    eng = create_engine("postgresql+psycopg2://", creator=lambda: psycopg2.connect(dsn))
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE note (id serial PRIMARY KEY, body text)"))
    yield eng
    eng.dispose()


def tasks(dsn: str) -> list[int]:
    """Ids of the committed tasks (the database is fresh: all are ``job``'s), as seen from
    another connection."""
    return [row[0] for row in query(dsn, "SELECT id FROM underway.task ORDER BY id")]


def notes(dsn: str) -> int:
    """How many ``note`` rows are committed."""
    return scalar(dsn, "SELECT count(*) FROM note")


NOTE = text("INSERT INTO note (body) VALUES ('hello')")


def test_connection_in_engine_begin(dsn: str, engine: Engine) -> None:
    """In ``engine.begin()`` the task is invisible until the block commits, and it commits in
    the same database transaction as the block's own write (same xmin)."""
    with engine.begin() as conn:
        conn.execute(NOTE)
        task = job.enqueue({"n": 1}, conn=conn)
        assert isinstance(task, Task)
        assert tasks(dsn) == []
    assert tasks(dsn) == [task.id]
    xmins = query(dsn, "SELECT xmin::text FROM note UNION ALL SELECT xmin::text FROM underway.task")
    assert len(xmins) == 2 and xmins[0] == xmins[1]

    with pytest.raises(RuntimeError), engine.begin() as conn:
        job.enqueue({"n": 2}, conn=conn)
        conn.execute(NOTE)
        raise RuntimeError("roll back")
    assert tasks(dsn) == [task.id]
    assert notes(dsn) == 1


def test_connection_commit_as_you_go(dsn: str, engine: Engine) -> None:
    """Without an explicit begin, ``conn.commit()`` commits the task; ``rollback()``, or
    closing the connection without a commit, leaves none. A transaction begun by an earlier
    statement is the one the task joins."""
    with engine.connect() as conn:
        first = job.enqueue({"n": 1}, conn=conn)  # the first thing on the connection
        assert tasks(dsn) == []
        conn.commit()
        assert tasks(dsn) == [first.id]

        conn.execute(NOTE)
        job.enqueue({"n": 2}, conn=conn)
        conn.rollback()
        assert tasks(dsn) == [first.id]
        assert notes(dsn) == 0

        second = job.enqueue({"n": 3}, conn=conn)  # after a commit and a rollback
        conn.commit()
        assert tasks(dsn) == [first.id, second.id]

        job.enqueue({"n": 4}, conn=conn)
    assert tasks(dsn) == [first.id, second.id]  # closed without commit: rolled back


def test_session(dsn: str, engine: Engine) -> None:
    """A Session: the task joins the session's transaction (begun by the enqueue if need be),
    commits with ``session.commit()`` and is gone after ``session.rollback()`` or a close."""
    with Session(engine) as session:
        first = job.enqueue({"n": 1}, conn=session)  # nothing else has run in this session
        assert tasks(dsn) == []
        session.commit()
        assert tasks(dsn) == [first.id]

        session.execute(NOTE)
        job.enqueue({"n": 2}, conn=session)
        session.rollback()
        assert tasks(dsn) == [first.id]
        assert notes(dsn) == 0

        session.execute(NOTE)
        second = job.enqueue({"n": 3}, conn=session)
        session.commit()
        assert tasks(dsn) == [first.id, second.id]
        assert notes(dsn) == 1

        job.enqueue({"n": 4}, conn=session)
    assert tasks(dsn) == [first.id, second.id]  # closed without commit: rolled back


def test_scoped_session(dsn: str, engine: Engine) -> None:
    """A ``scoped_session`` (as Flask-SQLAlchemy's ``db.session``) works like its Session:
    committed with ``commit()``, rolled back by ``rollback()`` and by ``remove()``."""
    db = scoped_session(sessionmaker(engine))
    try:
        first = job.enqueue({"n": 1}, conn=db)
        assert tasks(dsn) == []
        db.commit()
        assert tasks(dsn) == [first.id]

        job.enqueue({"n": 2}, conn=db)
        db.rollback()
        job.enqueue({"n": 3}, conn=db)
        db.remove()  # the end of a request: what was not committed is rolled back
        assert tasks(dsn) == [first.id]

        db.execute(NOTE)
        second = job.enqueue({"n": 4}, conn=db)  # a new session after remove()
        db.commit()
        assert tasks(dsn) == [first.id, second.id]
        assert notes(dsn) == 1
    finally:
        db.remove()


@pytest.mark.parametrize("kind", ["connection", "session"])
def test_enqueue_many(dsn: str, engine: Engine, kind: str) -> None:
    """``enqueue_many`` on a Connection or Session: all tasks commit together, or none."""
    with engine.connect() as conn, Session(engine) as session:
        target: Any = conn if kind == "connection" else session
        batch = job.enqueue_many([{"n": n} for n in range(5)], conn=target)
        assert tasks(dsn) == []
        target.commit()
        assert tasks(dsn) == [t.id for t in batch]

        job.enqueue_many([{"n": n} for n in range(5, 8)], conn=target)
        target.rollback()
        assert tasks(dsn) == [t.id for t in batch]


def test_savepoint(dsn: str, engine: Engine) -> None:
    """Inside ``begin_nested()`` the task is in the savepoint: rolling it back drops the task
    while the outer transaction still commits."""
    with engine.begin() as conn:
        kept = job.enqueue({"n": 1}, conn=conn)
        with conn.begin_nested() as savepoint:
            job.enqueue({"n": 2}, conn=conn)
            savepoint.rollback()
    assert tasks(dsn) == [kept.id]


def make_other_engine(kind: str, dsn: str) -> Engine:
    """An engine on sqlite, or on psycopg 3 (SQLAlchemy 2.1's default driver for a plain
    ``postgresql://`` URL; skipped if not installed)."""
    if kind == "sqlite":
        return create_engine("sqlite://")
    psycopg = pytest.importorskip("psycopg")
    return create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))


@pytest.mark.parametrize("kind", ["sqlite", "psycopg3"])
def test_other_drivers_are_refused(dsn: str, kind: str) -> None:
    """A Connection or Session on another driver raises a TypeError naming the psycopg2
    driver, and nothing is enqueued."""
    other = make_other_engine(kind, dsn)
    try:
        with other.connect() as conn, pytest.raises(TypeError, match="psycopg2"):
            job.enqueue({"n": 1}, conn=conn)
        with Session(other) as session, pytest.raises(TypeError, match="psycopg2"):
            job.enqueue_many([{"n": 1}], conn=session)
    finally:
        other.dispose()
    assert tasks(dsn) == []


@pytest.mark.parametrize("kind", ["engine", "sessionmaker"])
def test_engine_or_sessionmaker_is_refused_with_type_error(
    dsn: str, engine: Engine, kind: str
) -> None:
    """Passing the Engine or the sessionmaker instead of a Connection or Session (an easy
    slip) is a TypeError that says what ``conn`` must be."""
    given: Any = engine if kind == "engine" else sessionmaker(engine)
    with pytest.raises(TypeError, match="conn must be"):
        job.enqueue({"n": 1}, conn=given)
    assert tasks(dsn) == []


def test_other_driver_message_names_the_driver_given(dsn: str) -> None:
    """The message names the driver actually found (``sqlite3``), so the fix is obvious."""
    other = create_engine("sqlite://")
    try:
        with other.connect() as conn, pytest.raises(TypeError, match="sqlite3"):
            job.enqueue({"n": 1}, conn=conn)
    finally:
        other.dispose()
