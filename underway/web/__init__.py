"""underway's dashboard: a small Flask app to see queues, tasks, failures, schedules and
supervisors, and to retry, cancel, pause, resume and re-drive.

Run it on its own (``python -m underway.web``, bound to 127.0.0.1 unless a password is
set), or mount the app :func:`create_app` returns inside your own, behind your own
authentication::

    from werkzeug.middleware.dispatcher import DispatcherMiddleware
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/underway": create_app(dsn=...)})

Pages are rendered on the server and work without JavaScript; the one script only adds
auto-refresh, chart tooltips and confirmations.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

import psycopg2
from flask import Flask, current_app, render_template
from jinja2 import StrictUndefined
from werkzeug.exceptions import HTTPException

from .. import __version__
from ..db import redact_dsn, resolve_dsn
from ..display import now
from . import actions, display, security, views
from .pool import Pool
from .state import Settings, release, settings

__all__ = ["PASSWORD_ENV", "SECRET_KEY_ENV", "create_app"]

#: The environment variable holding the dashboard's password (HTTP basic auth).
PASSWORD_ENV = "UNDERWAY_WEB_PASSWORD"
#: The environment variable holding the key that signs its session cookie, for when
#: several processes serve one dashboard (gunicorn --workers N).
SECRET_KEY_ENV = "UNDERWAY_WEB_SECRET_KEY"

HERE = Path(__file__).resolve().parent


def create_app(
    dsn: str | None = None,
    *,
    read_only: bool = False,
    password: str | None = None,
    secret_key: str | bytes | None = None,
) -> Flask:
    """The dashboard as a Flask app, reading ``dsn`` (default: the configured DSN, else
    ``$DATABASE_URL``). Nothing connects until the first request.

    :param read_only: hide every action, and refuse their POSTs with 403.
    :param password: require HTTP basic auth with this password (any user name) on every
        page but ``/healthz``. Leave it out when your own app authenticates in front.
    :param secret_key: signs the session cookie that holds the CSRF token and the flash
        messages. Default: ``$UNDERWAY_WEB_SECRET_KEY``; else, with a password, a key
        derived from it (so that every process serving the dashboard agrees); else a
        random key per process.
    """
    target = resolve_dsn(dsn)
    app = Flask(__name__, static_folder="static", template_folder="templates")
    app.secret_key = secret_key or os.environ.get(SECRET_KEY_ENV) or _derived_key(password)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    app.jinja_env.undefined = StrictUndefined
    app.extensions["underway"] = Settings(
        dsn=target, read_only=read_only, pool=Pool(target), database=_where(target)
    )
    security.install(app, password)
    display.install(app)
    app.register_blueprint(views.bp)
    app.register_blueprint(actions.bp)
    app.teardown_request(release)
    app.context_processor(_page_globals)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(psycopg2.OperationalError, _database_error)
    app.register_error_handler(psycopg2.InterfaceError, _database_error)
    return app


def _derived_key(password: str | None) -> bytes:
    """A session key from the password (the same in every process), else a random one."""
    if not password:
        return secrets.token_bytes(32)
    return hashlib.pbkdf2_hmac("sha256", password.encode(), b"underway.web session", 100_000)


_ASSETS_VERSION = hashlib.sha256(
    b"".join(p.read_bytes() for p in sorted((HERE / "static").iterdir()))
).hexdigest()[:10]


def _page_globals() -> dict[str, Any]:
    found = settings()
    return {
        "read_only": found.read_only,
        "database": found.database,
        "version": __version__,
        "assets": _ASSETS_VERSION,
        "now": now(),
        "refresh_ms": int(1000 * current_app.config.get("UNDERWAY_REFRESH_SECONDS", 5)),
        "page": "",
    }


def _where(dsn: str) -> str:
    """``dbname@host`` of a DSN, for the top bar; the DSN redacted when it cannot be read."""
    try:
        parts = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "?"
    host = parts.get("host") or "localhost"
    if host.startswith("/"):
        host = "local socket"
    name = parts.get("dbname") or parts.get("user") or "?"
    return redact_dsn(f"{name} on {host}")


def _http_error(exc: HTTPException) -> Any:
    code = exc.code or 500
    return render_template("error.html", code=code, title=exc.name, message=exc.description), code


def _database_error(exc: Exception) -> Any:
    message = redact_dsn(" ".join(str(exc).split())) or type(exc).__name__
    return (
        render_template("error.html", code=503, title="Database unavailable", message=message),
        503,
    )
