"""The Flask example's background work: one welcome email per new user.

Workers run it beside the web server, from this directory::

    python -m underway.supervisor jobs --workers 2
"""

from __future__ import annotations

from typing import Any

from underway import Context, Job

welcome = Job("signup-welcome-email")


@welcome.step
def send_welcome_email(cx: Context, inp: dict[str, Any]) -> None:
    """Send the email, here by writing it to the outbox through the worker's transaction:
    the row commits together with the task's completion, so a retried or crashed try never
    sends it twice."""
    with cx.cursor() as cur:
        cur.execute("SELECT email, name FROM users WHERE id = %s", (inp["user_id"],))
        email, name = cur.fetchone()
        cur.execute(
            "INSERT INTO outbox (user_id, recipient, subject, body) VALUES (%s, %s, %s, %s)",
            (inp["user_id"], email, "Welcome!", f"Hello {name}, thanks for signing up."),
        )
