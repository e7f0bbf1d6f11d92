"""The dashboard's guards: HTTP basic auth, CSRF tokens, and headers that keep a page
from running anything but its own script.

- **Basic auth**, when a password is configured: every request but ``/healthz`` needs it;
  any user name is accepted, the password is compared in constant time.
- **CSRF**: a random token per browser session, kept in the session cookie (signed with
  the app's secret key, ``HttpOnly``, ``SameSite=Lax``) and repeated in a hidden field of
  every form. A POST whose field does not match its cookie's token gets 403 and changes
  nothing: another site can make a browser send the cookie, but cannot read the token.
- **Content-Security-Policy**: scripts, styles and images from the dashboard itself only,
  no inline script: even markup that slipped past escaping could not run.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from typing import Any

from flask import Flask, Response, abort, request, session
from flask.sessions import SecureCookieSessionInterface

#: Where the CSRF token sits in the session, and the name of the forms' hidden field.
CSRF_FIELD = "csrf_token"

#: Paths open without a password: a load balancer's probe learns only up or down.
OPEN_PATHS = ("/healthz",)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def password_matches(header: str | None, password: str) -> bool:
    """Whether an ``Authorization: Basic`` header carries ``password`` (any user name)."""
    if not header or header[:6].lower() != "basic ":
        return False
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    _, sep, given = decoded.partition(b":")
    return bool(sep) and hmac.compare_digest(given, password.encode("utf-8"))


def require_password(password: str) -> Response | None:
    """A ``before_request`` check: 401 with a Basic challenge unless the password is given."""
    if request.path in OPEN_PATHS or password_matches(
        request.headers.get("Authorization"), password
    ):
        return None
    return Response(
        "This underway dashboard needs a password (HTTP basic auth, any user name).\n",
        401,
        {"WWW-Authenticate": 'Basic realm="underway", charset="UTF-8"'},
        mimetype="text/plain",
    )


def csrf_token() -> str:
    """This browser session's CSRF token, made on first use."""
    token = session.get(CSRF_FIELD)
    if not isinstance(token, str) or len(token) < 32:
        token = secrets.token_urlsafe(32)
        session[CSRF_FIELD] = token
    return token


def check_csrf() -> None:
    """Abort with 403 unless the form's token matches the session's."""
    expected = session.get(CSRF_FIELD)
    given = request.form.get(CSRF_FIELD, "")
    if not isinstance(expected, str) or not hmac.compare_digest(
        given.encode("utf-8"), expected.encode("utf-8")
    ):
        abort(403, "The form's CSRF token is missing or stale: reload the page and try again.")


def add_security_headers(response: Response) -> Response:
    """An ``after_request`` hook: the headers above, on every response."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def safe_next(value: Any, fallback: str) -> str:
    """Where to go back after an action: a path inside the dashboard, never another site."""
    if (
        isinstance(value, str)
        and value.startswith("/")
        and not value.startswith("//")
        and "\\" not in value
        and all(c.isprintable() for c in value)
        and len(value) < 2000
    ):
        return request.script_root + value
    return fallback


class MountedSessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, with the cookie scoped to where the dashboard is
    mounted (``/underway`` under DispatcherMiddleware), so it never meets the host app's."""

    def get_cookie_path(self, app: Flask) -> str:
        return request.script_root or "/"


def install(app: Flask, password: str | None) -> None:
    """Put the guards on ``app``."""
    app.session_interface = MountedSessionInterface()
    app.config.update(
        SESSION_COOKIE_NAME="underway_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
    )
    if password:
        app.before_request(lambda: require_password(password))
    app.after_request(add_security_headers)
    app.jinja_env.globals["csrf_token"] = csrf_token
