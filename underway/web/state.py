"""What a dashboard app knows (its database, whether it is read-only), and the one
connection each request borrows from its pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app, g

from .pool import Pool


@dataclass
class Settings:
    """One dashboard's configuration, kept in ``app.extensions["underway"]``."""

    dsn: str
    read_only: bool
    pool: Pool
    #: Where the database is, without the password: shown in the top bar.
    database: str


def settings() -> Settings:
    """The current app's dashboard settings."""
    return current_app.extensions["underway"]  # type: ignore[no-any-return]


def db() -> Any:
    """This request's connection (autocommit), borrowed on first use."""
    if "underway_conn" not in g:
        g.underway_conn = settings().pool.get()
    return g.underway_conn


def release(_exc: BaseException | None = None) -> None:
    """A ``teardown_request`` hook: give the request's connection back to the pool."""
    conn = g.pop("underway_conn", None)
    if conn is not None:
        settings().pool.put(conn)
