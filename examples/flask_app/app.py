"""A Flask app whose sign-up enqueues a welcome email in the same transaction as the user.

The SQLAlchemy session is passed to ``enqueue(conn=...)``: the task is written on the
session's connection, so it commits with the new user or not at all. A sign-up that rolls
back (a taken email, an error later in the request) sends nothing. Run it from this
directory::

    export DATABASE_URL=postgresql://app@localhost/app
    flask --app app init-db
    gunicorn --workers 4 'app:create_app()'          # the web app, sync workers
    python -m underway.supervisor jobs --workers 2   # the background workers

The app also serves underway's dashboard at ``/underway``, mounted with werkzeug's
``DispatcherMiddleware``. It is read-only unless ``UNDERWAY_WEB_PASSWORD`` is set, and
then asks for that password: put your own login in front of it in a real app.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, request
from jobs import welcome
from models import User, init_db, make_engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import scoped_session, sessionmaker
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import underway.web


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

    mount_dashboard(app, database_url)
    return app


def mount_dashboard(app: Flask, database_url: str) -> None:
    """Serve underway's dashboard at /underway, beside the app's own routes. With several
    gunicorn workers, give them one UNDERWAY_WEB_SECRET_KEY so any of them accepts the
    dashboard's forms."""
    password = os.environ.get("UNDERWAY_WEB_PASSWORD") or None
    dashboard = underway.web.create_app(
        dsn=database_url, read_only=password is None, password=password
    )
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/underway": dashboard})  # type: ignore[method-assign]
