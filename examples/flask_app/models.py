"""The Flask example's tables: users, and the outbox that the welcome-email step writes to.

Plain SQLAlchemy 2.0 declarative models. ``init_db()`` creates them, and underway's own
schema, so one command prepares a fresh database.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine, ForeignKey, create_engine, func, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import underway


class Base(DeclarativeBase):
    """The declarative base of the example's models."""


class User(Base):
    """A signed-up user; the unique email makes a second sign-up with it fail."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(unique=True)
    name: Mapped[str]


class Outbox(Base):
    """An email ready to go. Written by the worker in the same transaction that completes
    the task, so each welcome email is here exactly once; a mailer would drain it."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    recipient: Mapped[str]
    subject: Mapped[str]
    body: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


def make_engine(database_url: str) -> Engine:
    """An engine for a ``postgresql://`` URL on the psycopg2 driver, which underway's
    ``conn=`` needs (SQLAlchemy 2.1 picks psycopg 3 for a plain ``postgresql://``)."""
    return create_engine(make_url(database_url).set(drivername="postgresql+psycopg2"))


def init_db(database_url: str) -> None:
    """Create underway's schema and the app's tables; safe to run again."""
    underway.run_migrations(database_url)
    engine = make_engine(database_url)
    Base.metadata.create_all(engine)
    engine.dispose()
