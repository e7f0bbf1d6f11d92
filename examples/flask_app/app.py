"""A Flask app whose sign-up enqueues a welcome email in the same transaction as the user.

The SQLAlchemy session is passed to ``enqueue(conn=...)``: the task is written on the
session's connection, so it commits with the new user or not at all. A sign-up that rolls
back (a taken email, an error later in the request) sends nothing. Run it from this
directory::

    export DATABASE_URL=postgresql://app@localhost/app
    flask --app app init-db
    gunicorn --workers 4 'app:create_app()'          # the web app, sync workers
    python -m underway.supervisor jobs --workers 2   # the background workers
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, request
from jobs import welcome
from models import User, init_db, make_engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import scoped_session, sessionmaker


def create_app(database_url: str | None = None) -> Flask:
    """The app, on ``database_url`` (default: ``$DATABASE_URL``, a ``postgresql://`` URL)."""
    app = Flask(__name__)
    database_url = database_url or os.environ["DATABASE_URL"]
    engine = make_engine(database_url)
    db = scoped_session(sessionmaker(engine))

    @app.teardown_appcontext
    def remove_session(exc: BaseException | None) -> None:
        """End the request's session: what it did not commit is rolled back."""
        db.remove()

    @app.post("/signup")
    def signup() -> tuple[dict[str, Any], int]:
        """Create a user and enqueue their welcome email, in one transaction."""
        data = request.get_json()
        user = User(email=data["email"], name=data["name"])
        db.add(user)
        try:
            db.flush()  # INSERT now: assigns user.id, or fails if the email is taken
        except IntegrityError:
            db.rollback()
            return {"error": "email already registered"}, 409
        welcome.enqueue({"user_id": user.id}, conn=db)  # in the session's transaction
        if data.get("fail"):  # stands in for anything failing later in the request
            raise RuntimeError("sign-up failed after enqueueing the email")
        db.commit()  # the user and the task, together
        return {"id": user.id}, 201

    @app.cli.command("init-db")
    def init_db_command() -> None:
        """Create underway's schema and the app's tables."""
        init_db(database_url)

    return app
